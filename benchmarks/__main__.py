"""Run the benchmarks: `python -m benchmarks [NAME ...] [-- ARGS]` (`make bench` runs all).

Each `benchmarks/bench_*.py` is a standalone script that times geoloc against a plain
reference doing the same work and prints the ratio; this runner only lists and starts them.
`python -m benchmarks gpu [ARGS]` runs the GPU check (`gpu_check.py`, needs CUDA; not part of
`make bench`). `python -m benchmarks scale [--n N] [--epochs E] ...` runs the whole pipeline at N
images (`bench_scale.py`; `make bench` runs it at its default N = 10^5).
`python -m benchmarks figures [--seeds ...] [--quick]` (`make figures`) reruns the figures README
and docs quote and rewrites their blocks (`figures.py`; not part of `make bench`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    if argv[:1] == ["gpu"]:
        return subprocess.call([sys.executable, str(HERE / "gpu_check.py"), *argv[1:], *extra])
    if argv[:1] == ["figures"]:
        return subprocess.call([sys.executable, str(HERE / "figures.py"), *argv[1:], *extra])
    if argv[:1] == ["scale"]:
        return subprocess.call([sys.executable, str(HERE / "bench_scale.py"), *argv[1:], *extra])
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv in (["-l"], ["--list"]):
        print("\n".join(p.stem for p in scripts))
        return 0
    if argv:
        wanted = {a.removesuffix(".py") for a in argv}
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        scripts = [p for p in scripts if p.stem in wanted]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *extra])
        print(f"--- {script.stem}: exit {code}, {time.perf_counter() - start:.1f} s", flush=True)
        if code:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
