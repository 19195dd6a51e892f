"""`geoloc s3 push` of a run directory: `geoloc.storage.s3.push` vs a plain upload loop.

    .venv/bin/python benchmarks/bench_s3_push.py [--files 200] [--kb 32] [--big-mb 8]

Makes a run-like folder (`--files` small files of `--kb` KiB, like plots/tables, plus one
`--big-mb` MiB checkpoint) and pushes it to moto's S3 server, started in a child process on a
loopback port (client and server share the machine's CPUs: absolute numbers are loopback
numbers, the ratios are what matters; a real store adds latency per request, which favours
fewer requests and more files in flight). Times, each on a fresh prefix unless said otherwise:

- first push: `storage.push` (sha256 per file, `--workers` files in flight, multipart above
  the threshold) vs the plain reference, a sequential `client.upload_file` per file;
- re-push of the unchanged folder: `storage.push` again (one listing; single-part files are
  matched by their MD5 ETag, multipart ones by one HEAD for the sha256 metadata; nothing
  uploaded) vs the plain reference, which uploads everything again.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geoloc.storage import s3 as storage  # noqa: E402


def make_run(root: Path, files: int, kb: int, big_mb: int) -> int:
    """The folder to push; returns its size in bytes."""
    rng_bytes = os.urandom
    for i in range(files):
        path = root / "artifacts" / f"part{i % 5}" / f"file{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng_bytes(kb * 1024))
    if big_mb:
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        (root / "checkpoints" / "last.pt").write_bytes(rng_bytes(big_mb * 1024 * 1024))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def plain_upload(client: object, root: Path, bucket: str, prefix: str) -> None:
    """What one writes first: upload every file, one after the other."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        client.upload_file(str(path), bucket, key)  # type: ignore[attr-defined]


def _serve(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    """Child process: moto's S3 server on a free loopback port, until terminated."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    ports.put(server.get_host_and_port()[1])
    threading.Event().wait()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--kb", type=int, default=32)
    ap.add_argument("--big-mb", type=int, default=8)
    ap.add_argument("--workers", type=int, default=storage.DEFAULT_WORKERS)
    args = ap.parse_args()

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    ctx = mp.get_context("fork")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    endpoint = f"http://127.0.0.1:{ports.get(timeout=60)}"
    client = storage.create_client(endpoint)
    bucket = "bench"
    client.create_bucket(Bucket=bucket)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            size = make_run(run, args.files, args.kb, args.big_mb)
            n = args.files + (1 if args.big_mb else 0)

            def push(prefix: str) -> storage.TransferReport:
                url = f"s3://{bucket}/{prefix}"
                return storage.push(run, url, endpoint_url=endpoint, workers=args.workers)

            t_push = timed(lambda: push("geoloc"))
            t_plain = timed(lambda: plain_upload(client, run, bucket, "plain"))
            report = push("geoloc")
            assert report.skipped == n and report.uploaded == 0, report
            t_repush = timed(lambda: push("geoloc"))
            t_plain_again = timed(lambda: plain_upload(client, run, bucket, "plain"))
    finally:
        server.terminate()
        server.join()

    print(f"run folder: {n} files, {size / 1e6:.1f} MB; moto on loopback; {os.cpu_count()} CPUs")
    print(f"{'case':<32}{'geoloc (s)':>12}{'plain (s)':>12}{'speed-up':>10}")
    for name, ours, plain in (
        ("first push", t_push, t_plain),
        ("re-push, nothing changed", t_repush, t_plain_again),
    ):
        print(f"{name:<32}{ours:>12.2f}{plain:>12.2f}{plain / ours:>9.1f}x")


if __name__ == "__main__":
    main()
