"""Rerun the measurements README and docs quote, and rewrite the blocks they own (issue 27.4).

    python -m benchmarks figures [--seeds 0 1 2] [--quick] [--docs DIR] [--no-write] [--rerank]
    make figures

What `make demo` does, once per seed: demo images -> ingest -> index (the `demo` presets),
train the `demo` run preset with `seed=<s>` (tracking off), rerank and report through the
composer, then every rerank variant on the shift split (`geoloc data demo --placement
uniform-land --n 2000`, as `geoloc evaluate --name shift`). The numbers quoted are the mean ±
sample standard deviation over the seeds (min-max beside them in the quality table).

Cached per seed: each seed trains into `$GEOLOC_RUNS_DIR/figures-<size>-seed<s>/`, reused when its
summary says `completed`, its config.json equals the config asked for and its dataset
fingerprint equals the index's; a run killed half-way resumes from its checkpoint, one with
another config or data is trained again. So a rerun after a crash, or after a change to the
rendering, retrains nothing it does not have to. Rerank is post-hoc: a run whose training
config and data match but whose `rerank` section differs is only reranked again (and the
shift split evaluated again), and `--rerank` does that for every seed after a change to the
post-hoc code (rerank, calibration, OOD); the stamp then names both commits.

Blocks are rewritten in place between `<!-- figures:<name> begin -->` and
`<!-- figures:<name> end -->` (BLOCKS below says which file holds which); everything outside
the markers is left byte for byte. Each block is stamped with the commit and dirty flag of the
code the runs recorded, the date they finished and the seeds and threads.

`--quick` is the test's size (600 images, r1 classes, 1 epoch); it writes only under `--docs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("geoloc.figures")

SHIFT_NAME = "shift"
BLOCKS = {"demo-quality": ("docs/quality.md",), "demo-goals": ("docs/quality.md",),
          "make-demo": ("README.md", "docs/orchestration.md")}  # fmt: skip


@dataclass(frozen=True)
class Size:
    """How big each seed's run is: `demo` is `make demo`'s, `quick` the test's."""

    label: str
    demo_n: int
    shift_n: int
    run_overrides: tuple[str, ...]
    index_overrides: dict[str, Any] | None  # None: the `demo` index preset as it is
    min_population: int = 15000


DEMO = Size("demo", 12000, 2000, (), None)
QUICK = Size(
    "quick", 600, 60, ("epochs=1",),
    dict(resolution=1, parent_resolution=0, split="geographic", split_resolution=2,
         min_images_per_class=5, max_side=64, workers=1),
    min_population=200_000,
)  # fmt: skip


# data and runs ---------------------------------------------------------------------------


def prepare_data(size: Size) -> tuple[Any, Path, str]:
    """The demo index and the shift folder under $GEOLOC_DATA_DIR (each stage a no-op when its
    outputs are already there); returns the paths, the shift folder and the index fingerprint."""
    from geoloc.compose.stage_cache import index_key
    from geoloc.config import IndexConfig, load_config
    from geoloc.data.demo import make_demo
    from geoloc.data.index import build_index
    from geoloc.data.ingest import ingest
    from geoloc.paths import DataPaths

    paths = DataPaths.default()
    index_cfg = load_config("demo", size.index_overrides, model=IndexConfig)
    make_demo(paths.demo, n=size.demo_n, seed=0, min_population=size.min_population)
    ingest("demo", paths, index_cfg)
    # the index is rebuilt when its inputs (manifest, config) changed or its files do not match
    # the fingerprint labels.json records (a build killed half-way)
    key, key_path = index_key(paths, index_cfg), paths.state / "figures-index.key"
    fingerprint = _index_fingerprint_if_built(paths)
    if fingerprint is None or not key_path.is_file() or key_path.read_text() != key:
        build_index(paths, index_cfg)
        fingerprint = _index_fingerprint_if_built(paths)
        key_path.write_text(key)
    shift = paths.raw / "demo-shift"
    make_demo(shift, n=size.shift_n, seed=0, placement="uniform-land")
    assert fingerprint is not None
    return paths, shift, fingerprint


def _index_fingerprint_if_built(paths: Any) -> str | None:
    """The index's fingerprint when labels.json records the one its files hash to, else None
    (no index, or one left half-built)."""
    from geoloc.data.index import index_fingerprint

    try:
        recorded = json.loads(paths.labels.read_text()).get("fingerprint")
        return recorded if recorded and recorded == index_fingerprint(paths) else None
    except Exception:  # noqa: BLE001 - any unreadable index is rebuilt
        return None


def seed_config(size: Size, seed: int) -> Any:
    from geoloc.config import load_config

    return load_config("demo", [f"seed={seed}", "tracking.enabled=false", *size.run_overrides])


def run_dir_of(size: Size, seed: int) -> Path:
    from geoloc.paths import runs_dir

    return runs_dir() / f"figures-{size.label}-seed{seed}"


def _training_part(cfg: Any) -> dict[str, Any]:
    """What training reads: the whole config but its post-hoc `rerank` section."""
    return cfg.model_dump(mode="json", exclude={"rerank"})


def _reranked_with(run_dir: Path) -> dict[str, Any] | None:
    """The rerank section `--rerank` last reranked this run with (`figures.json`), or None."""
    path = run_dir / "figures.json"
    return (json.loads(path.read_text()) or {}).get("rerank") if path.is_file() else None


def cached(run_dir: Path, cfg: Any, fingerprint: str, rerank: bool = False) -> str:
    """`done` (reuse), `rerank` (trained with this config and data, but reranked with another
    rerank section, or `rerank` asked: rerank is post-hoc, no retraining), `resume` (same config
    and data, killed before the end) or `new`."""
    from geoloc.config import load_config

    summary_path, config_path = run_dir / "summary.json", run_dir / "config.json"
    if not (summary_path.is_file() and config_path.is_file()):
        return "new"
    try:
        summary = json.loads(summary_path.read_text())
        saved = load_config(config_path)
    except Exception:  # noqa: BLE001 - an unreadable run is trained again
        return "new"
    if (_training_part(saved) != _training_part(cfg)
            or (summary.get("dataset") or {}).get("fingerprint") != fingerprint):  # fmt: skip
        return "new"
    tables = run_dir / "artifacts" / "tables"
    done = summary.get("status") == "completed" and (summary.get("rerank") or {}).get("variant")
    if done and (tables / f"rerank_eval_{SHIFT_NAME}.csv").is_file():
        used = _reranked_with(run_dir) or saved.rerank.model_dump(mode="json")
        return "rerank" if rerank or used != cfg.rerank.model_dump(mode="json") else "done"
    return "resume" if (run_dir / "checkpoints" / "last.pt").is_file() else "new"


def train_seed(
    size: Size, seed: int, fingerprint: str, shift: Path, rerank: bool = False
) -> Path:
    """One seed's run, trained, reranked and evaluated on the shift split unless cached
    (`rerank`: rerank a cached trained run again with this code, without retraining)."""
    from geoloc.locks import file_lock

    cfg, run_dir = seed_config(size, seed), run_dir_of(size, seed)
    # seeds may train in parallel (`--seeds 1` and `--seeds 2` at once); one seed never twice
    with file_lock(run_dir.parent / f".{run_dir.name}.lock"):
        return _train_locked(cfg, run_dir, seed, fingerprint, shift, rerank)


def _train_locked(
    cfg: Any, run_dir: Path, seed: int, fingerprint: str, shift: Path, rerank: bool
) -> Path:
    from geoloc.compose.training import rerank_and_publish, run_training
    from geoloc.infer.folder_eval import evaluate_folder
    from geoloc.runfolder.summary import code_version

    state = cached(run_dir, cfg, fingerprint, rerank)
    if state == "done":
        log.info("seed %d: reusing %s", seed, run_dir)
        return run_dir
    t0 = time.perf_counter()
    timing = json.loads((run_dir / "figures.json").read_text()) if state == "rerank" else {}
    if state == "new":
        shutil.rmtree(run_dir, ignore_errors=True)
        run_training(cfg, run_dir=run_dir, progress=False)
    elif state == "resume":  # killed: training continues from last.pt, or starts again at rerank
        run_training(cfg, resume=run_dir, progress=False)
    else:  # trained: rerank is post-hoc, the checkpoints stay as they are
        rerank_and_publish(run_dir, cfg=cfg.rerank)
    evaluate_folder(run_dir, [shift], name=SHIFT_NAME, progress=False)
    wall = round(time.perf_counter() - t0, 1)
    if state == "rerank":  # the training time stays the one measured when it trained
        timing |= {"rerank_wall_s": wall, "rerank": cfg.rerank.model_dump(mode="json"),
                   "rerank_commit": code_version().get("git_commit")}  # fmt: skip
    else:
        timing = {"wall_s": wall, "resumed": state == "resume",
                  "rerank": cfg.rerank.model_dump(mode="json")}  # fmt: skip
    (run_dir / "figures.json").write_text(json.dumps(timing) + "\n")
    log.info("seed %d: %s (%s) in %.0f s", seed, run_dir, state, wall)
    return run_dir


# what a run says ------------------------------------------------------------------------

METRICS: tuple[tuple[str, str, int], ...] = (
    ("median_km", "median km", 1), ("p90_km", "P90 km", 0), ("p95_km", "P95 km", 0),
    ("top1", "top-1", 3), ("geoscore", "GeoScore", 0),
    ("radius_coverage", "90% radius coverage", 3), ("radius_median_km", "median radius km", 0),
    ("coverage", "90% set coverage", 3), ("set_size", "set size (cells)", 2),
)  # fmt: skip
COLUMNS = (("test", "base"), ("test", "chosen"), (SHIFT_NAME, "chosen"))
COLUMN_TITLES = ("test: model alone", "test: after rerank", "shift: after rerank")


@dataclass(frozen=True)
class SeedResult:
    seed: int
    run_dir: Path
    variant: str
    rows: dict[tuple[str, str], dict[str, float]]  # (split, base|chosen) -> metric -> value
    commit: str | None
    dirty: bool | None
    finished: str
    threads: int | None
    wall_s: float | None  # the last (re)start's wall time (`figures.json`)
    resumed: bool
    num_classes: int | None
    rerank_commit: str | None = None  # set when `--rerank` reranked the trained run again


def read_seed(seed: int, run_dir: Path) -> SeedResult:
    """A seed's numbers as its run recorded them. Test after rerank: summary.json `rerank`; the
    model alone: summary.json `test` (what `make demo`'s digest shows as the model's), its radius
    and set rows from rerank_eval.csv's `base` variant (the model's own calibrated
    probabilities; `test` has none); the shift split: rerank_eval_shift.csv's served row (the
    chosen variant, or its `ood` row: the answer, radius and sets predict gives, as summary.json's
    `rerank` metrics are)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    variant = summary["rerank"]["variant"]
    tables = run_dir / "artifacts" / "tables"
    base = pd.read_csv(tables / "rerank_eval.csv").set_index("variant").loc["base"]
    shift = pd.read_csv(tables / f"rerank_eval_{SHIFT_NAME}.csv").set_index("variant")
    test = summary.get("test") or {}
    # what predict serves: the chosen variant, with the OOD step on top when the run has one
    from geoloc.infer.ood import OOD_VARIANT

    served = OOD_VARIANT if OOD_VARIANT in shift.index else variant
    rows = {
        ("test", "base"): {k: float(test.get(f"test_{k}", base[k])) for k, _, _ in METRICS},
        ("test", "chosen"): {k: float(summary["rerank"]["metrics"][k]) for k, _, _ in METRICS},
        (SHIFT_NAME, "chosen"): {k: float(shift.loc[served, k]) for k, _, _ in METRICS},
    }
    timing_path = run_dir / "figures.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    code = summary.get("code") or {}
    return SeedResult(
        seed, run_dir, variant, rows, code.get("git_commit"), code.get("git_dirty"),
        str(summary.get("updated_at") or "")[:10],
        (summary.get("determinism") or {}).get("threads"), timing.get("wall_s"),
        bool(timing.get("resumed")), (summary.get("dataset") or {}).get("num_classes"),
        timing.get("rerank_commit"),
    )  # fmt: skip


def values(results: list[SeedResult], column: tuple[str, str], key: str) -> list[float]:
    return [r.rows[column][key] for r in results]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_num(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def fmt_pm(xs: list[float], digits: int) -> str:
    m, s = mean_std(xs)
    return f"{fmt_num(m, digits)} ± {fmt_num(s, digits)}"


# rendering --------------------------------------------------------------------------------


def stamp(results: list[SeedResult]) -> str:
    """Where the numbers came from: commit(s), dirty flag, date, seeds, threads."""
    commits = sorted({(r.commit or "unknown")[:10] for r in results})
    dirty = any(r.dirty for r in results)
    dirty_s = "yes" if dirty else ("unknown" if any(r.dirty is None for r in results) else "no")
    threads = sorted({str(r.threads) for r in results})
    again = sorted({r.rerank_commit[:10] for r in results if r.rerank_commit})
    if again:  # trained at one commit, the post-hoc stages rerun at another
        commits = [f"{', '.join(commits)}, reranked at {', '.join(again)}"]
    return (f"<sub>Written by `make figures` (`python -m benchmarks figures`) from runs of commit "
            f"{', '.join(commits)} (dirty: {dirty_s}), finished {max(r.finished for r in results)}"
            f"; seeds {', '.join(str(r.seed) for r in results)}, {'/'.join(threads)} torch "
            f"threads; mean ± sample std over seeds.</sub>")  # fmt: skip


def render_demo_quality(results: list[SeedResult]) -> str:
    """docs/quality.md's table: every metric, model alone and after rerank, test and shift."""
    head = "| metric | " + " | ".join(COLUMN_TITLES) + " | test after rerank, min-max |"
    lines = [stamp(results), "", head, "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for key, label, digits in METRICS:
        cells = [fmt_pm(values(results, col, key), digits) for col in COLUMNS]
        chosen = values(results, ("test", "chosen"), key)
        span = f"{fmt_num(min(chosen), digits)}-{fmt_num(max(chosen), digits)}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {span} |")
    lines += ["", "Model alone: the best checkpoint's test evaluation (summary.json `test`); its "
              "radius and set rows are rerank's `base` variant (the model's calibrated "
              "probabilities). Shift: crops uniform over land (`geoloc data demo --placement "
              "uniform-land`), the variant val chose.",
              "", "| seed | variant chosen on val | test median / P90 km, GeoScore after rerank "
              "| wall time (train, rerank, report, shift) |",
              "| ---: | --- | --- | ---: |"]  # fmt: skip
    for r in results:
        c = r.rows["test", "chosen"]
        wall = "unknown" if r.wall_s is None else f"{r.wall_s / 60:.1f} min"
        wall += " (resumed)" if r.resumed else ""
        lines.append(f"| {r.seed} | {r.variant} | {c['median_km']:,.1f} / {c['p90_km']:,.0f}, "
                     f"{c['geoscore']:,.0f} | {wall} |")  # fmt: skip
    return "\n".join(lines)


def render_make_demo(results: list[SeedResult]) -> str:
    """README's and orchestration.md's sentence: what `make demo` shows, over seeds."""

    def pm(column: tuple[str, str], key: str, digits: int) -> str:
        return fmt_pm(values(results, column, key), digits)

    test, base = ("test", "chosen"), ("test", "base")
    variants = ", ".join(f"{r.variant} (seed {r.seed})" for r in results)
    return "\n".join([
        stamp(results), "",
        f"`make demo`'s test split, as mean ± std over {len(results)} seeds of the `demo` preset "
        f"(`make demo` itself trains seed 0): median error {pm(base, 'median_km', 1)} km from the "
        f"model alone and {pm(test, 'median_km', 1)} km after reranking (P90 "
        f"{pm(test, 'p90_km', 0)} km, P95 {pm(test, 'p95_km', 0)} km, top-1 {pm(test, 'top1', 3)}, "
        f"GeoScore {pm(test, 'geoscore', 0)}; model alone: P90 {pm(base, 'p90_km', 0)} km, "
        f"GeoScore {pm(base, 'geoscore', 0)}); its 90% error radius covers "
        f"{pm(test, 'radius_coverage', 3)} of test images with a median radius of "
        f"{pm(test, 'radius_median_km', 0)} km. Variant chosen on val: {variants}.",
    ])  # fmt: skip


GOALS: tuple[tuple[str, Callable[[SeedResult], float], Callable[[float], bool], str], ...] = (
    ("GeoScore >= 4,600", lambda r: r.rows["test", "chosen"]["geoscore"], lambda v: v >= 4600,
     "{:,.0f}"),
    ("P90 <= 400 km", lambda r: r.rows["test", "chosen"]["p90_km"], lambda v: v <= 400,
     "{:,.0f} km"),
    ("median <= 60 km", lambda r: r.rows["test", "chosen"]["median_km"], lambda v: v <= 60,
     "{:,.1f} km"),
    ("90% radius coverage in 0.88-0.92", lambda r: r.rows["test", "chosen"]["radius_coverage"],
     lambda v: 0.88 <= v <= 0.92, "{:.3f}"),
    ("median radius <= 0.5x test P90", lambda r: r.rows["test", "chosen"]["radius_median_km"]
     / r.rows["test", "chosen"]["p90_km"], lambda v: v <= 0.5, "{:.2f}x"),
    ("90% cell sets <= 10% of classes", lambda r: r.rows["test", "chosen"]["set_size"]
     / (r.num_classes or float("nan")), lambda v: v <= 0.1, "{:.1%}"),
)  # fmt: skip


def render_demo_goals(results: list[SeedResult]) -> str:
    """The `make demo` goals, after rerank on test, per seed and whether every seed meets them."""
    lines = [stamp(results), "", "| goal | mean ± std | per seed (" + ", ".join(
        str(r.seed) for r in results) + ") | met on every seed? |", "| --- | ---: | --- | --- |"]
    for goal, value, met, form in GOALS:
        xs = [value(r) for r in results]
        m, sd = mean_std(xs)
        ok = sum(met(x) for x in xs)
        verdict = "yes" if ok == len(xs) else f"**no** ({ok} of {len(xs)})"
        lines.append(f"| {goal} | {form.format(m)} ± {form.format(sd)} | "
                     f"{' / '.join(form.format(x) for x in xs)} | {verdict} |")  # fmt: skip
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[list[SeedResult]], str]] = {
    "demo-quality": render_demo_quality,
    "demo-goals": render_demo_goals,
    "make-demo": render_make_demo,
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- figures:{name} begin -->", f"<!-- figures:{name} end -->"


def replace_block(text: str, name: str, body: str, where: str = "text") -> str:
    """`text` with the block `name` holding `body`; everything outside the markers unchanged."""
    from geoloc.errors import GeolocError

    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise GeolocError(f"{where}: needs exactly one '{begin}' and one '{end}' "
                          f"(found {text.count(begin)} and {text.count(end)})")  # fmt: skip
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise GeolocError(f"{where}: '{end}' comes before '{begin}'")
    return text[:start] + "\n" + body.strip("\n") + "\n" + text[stop:]


def rewrite_docs(docs_root: Path, results: list[SeedResult]) -> list[Path]:
    """Every block of BLOCKS rewritten under `docs_root` (atomic; all checked before any write)."""
    from geoloc.atomic import write_text

    texts: dict[Path, str] = {}
    for name, files in BLOCKS.items():
        body = RENDERERS[name](results)
        for rel in files:
            path = docs_root / rel
            old = texts.get(path, path.read_text(encoding="utf-8"))
            texts[path] = replace_block(old, name, body, where=str(path))
    for path, text in texts.items():
        write_text(path, text)
    return list(texts)


# command -----------------------------------------------------------------------------------


def parse(argv: Iterable[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds (>= 3 for the docs; default 0 1 2)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (600 images, r1 classes, 1 epoch), for the test")  # fmt: skip
    ap.add_argument("--docs", type=Path, default=None,
                    help="root holding README.md and docs/ (default: the repository; "
                    "--quick writes only where this is given)")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="train and print, rewrite nothing")
    ap.add_argument("--rerank", action="store_true",
                    help="rerank cached trained runs again with this code (post-hoc stages "
                    "changed; no retraining)")  # fmt: skip
    return ap.parse_args(list(argv))


def main(argv: Iterable[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    size = QUICK if args.quick else DEMO
    from geoloc.errors import GeolocError

    seeds = list(dict.fromkeys(args.seeds))
    docs = args.docs if args.docs is not None else (None if args.quick else REPO)
    if docs == REPO and not args.no_write and len(seeds) < 3:
        print("figures: README and docs quote >= 3 seeds; give more --seeds, or --no-write",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        _, shift, fingerprint = prepare_data(size)
        results = [read_seed(s, train_seed(size, s, fingerprint, shift, args.rerank))
                   for s in seeds]  # fmt: skip
        for name, render in RENDERERS.items():
            print(f"\n<!-- figures:{name} -->\n{render(results)}")
        if docs is not None and not args.no_write:
            for path in rewrite_docs(docs, results):
                print(f"rewrote {path}")
    except GeolocError as exc:
        print(f"figures: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
