"""The whole pipeline at N images, each stage as the user runs it: wall time, memory, bytes.

    python -m benchmarks scale [--n 100000] [--epochs 1] [--work DIR] [--stage-timeout 3600]

synth -> ingest -> index (r7 under r6) -> train (streamed split) -> rerank -> report ->
MLflow sync (SQLite store) -> aggregate -> `geoloc predict` on 200 photos. Every stage is the
`geoloc` CLI in its own subprocess (data, runs and the MLflow store under the work folder).
Per stage the table gives the wall seconds, the peak RSS of the largest process and of the
whole process tree at once (psutil polls the tree every 0.2 s, so a worker living less than
that can be missed), and the bytes on disk afterwards in the data folder, the run folder and the
MLflow artifact store. It ends with the run's test metrics after rerank beside two baselines
that ignore the image: the most frequent train cell, and the geographic median of the training
coordinates (the one point with the least total distance to them).

Each stage leaves a marker under `<work>/stages/`; a killed benchmark run again with the same
work folder skips finished stages and reruns the one it was in (the `geoloc` commands resume
their own journals; training continues from `checkpoints/last.pt`). A stage that fails or runs
past `--stage-timeout` is recorded as such and the stages that do not need it still run.
The work folder defaults to `.benchmarks/scale-n<N>/` in the repository (git-ignored); with
`--doc` the table is also written into docs/scale.md under a heading for this N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
KILL_ENV = "GEOLOC_BENCH_KILL_IN"  # tests: SIGKILL the benchmark 2 s into this stage
PREDICT_PHOTOS = 200
STAGES = ("synth", "ingest", "index", "train", "rerank", "report", "mlflow", "aggregate",
          "predict")  # fmt: skip
NEEDS = {"ingest": "synth", "index": "ingest", "train": "index"} | dict.fromkeys(
    ("rerank", "report", "mlflow", "aggregate", "predict"), "train"
)


@dataclass
class Row:
    """One stage's result, as its marker file stores it."""

    stage: str
    status: str = "pending"  # running, ok, failed (exit N), timeout, skipped (...)
    seconds: float = 0.0
    peak_mb: float = 0.0  # the largest single process
    tree_mb: float = 0.0  # all processes of the stage at one moment
    procs: int = 0
    data_mb: float = 0.0
    run_mb: float = 0.0
    mlflow_mb: float = 0.0
    attempts: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


class Bench:
    """The work folder: data, runs, MLflow store, logs and stage markers of one benchmark."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.data, self.runs = work / "data", work / "runs"
        self.stages, self.logs = work / "stages", work / "logs"
        for d in (self.data, self.runs, self.stages, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def marker(self, stage: str) -> Path:
        return self.stages / f"{STAGES.index(stage)}-{stage}.json"

    def load(self, stage: str) -> Row:
        p = self.marker(stage)
        return Row(**json.loads(p.read_text())) if p.is_file() else Row(stage)

    def save(self, row: Row) -> None:
        tmp = self.marker(row.stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(row), indent=1))
        os.replace(tmp, self.marker(row.stage))

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "GEOLOC_DATA_DIR": str(self.data),
                "GEOLOC_RUNS_DIR": str(self.runs), "PYTHONPATH": path,
                "MLFLOW_TRACKING_URI": f"sqlite:///{self.work / 'mlflow.db'}"}  # fmt: skip

    def run_dir(self) -> Path | None:
        found = sorted(p.parent for p in self.runs.glob("*/config.json"))
        return found[-1] if found else None

    def sizes(self) -> tuple[float, float, float]:
        mlflow = _tree_mb(self.work / "mlruns") + _tree_mb(self.work / "mlartifacts")
        return _tree_mb(self.data), _tree_mb(self.runs), mlflow


def _tree_mb(folder: Path) -> float:
    if not folder.exists():
        return 0.0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _geoloc(*argv: str) -> list[str]:
    return [sys.executable, "-m", "geoloc", *argv]


def commands(b: Bench, stage: str) -> list[list[str]]:
    """The CLI command(s) of a stage, as a user would type them."""
    a, w = b.args, str(b.args.workers)
    synth = b.data / "raw" / "synth"
    if stage == "synth":
        return [_geoloc("data", "synth", "--n", str(a.n), "--size", str(a.size), "--layout",
                        "osv5m", "--workers", w)]  # fmt: skip
    if stage == "ingest":
        return [_geoloc("data", "ingest", str(synth), "--workers", w, "--set",
                        f"max_side={a.size}")]  # fmt: skip
    if stage == "index":
        sets = ["resolution=7", "parent_resolution=6", "split=sequence",
                f"min_images_per_class={a.min_per_class}", f"max_side={a.size}"]  # fmt: skip
        return [_geoloc("index", "build", *_sets(sets))]
    run = b.run_dir()
    if stage == "train":
        if run is not None and (run / "checkpoints" / "last.pt").is_file():
            return [_geoloc("train", "--resume", str(run))]
        if run is not None:  # killed before its first checkpoint: nothing to keep
            shutil.rmtree(run)
        sets = ["model.arch=multiscale_cnn", "model.width=16", "model.embed_dim=128",
                f"train.image_size={a.size}", f"train.epochs={a.epochs}",
                "train.batch_size=256", "train.num_workers=0", "train.warmup_epochs=0",
                "train.lr=0.003", "train.cache_mb=0", "train.device=cpu",
                "train.checkpoint_every_steps=50",  # a killed benchmark resumes mid-epoch
                "rerank.enabled=false", "tracking.enabled=false", f"name=scale-n{a.n}"]  # fmt: skip
        return [_geoloc("train", "--config", "r7", *_sets(sets))]
    assert run is not None
    if stage == "rerank":
        return [_geoloc("rerank", str(run))]
    if stage == "report":
        return [_geoloc("report", str(run))]
    if stage == "mlflow":
        return [_geoloc("mlflow", "sync", str(run))]
    if stage == "aggregate":
        return [_geoloc("aggregate", "--runs-dir", str(b.runs))]
    photos = _predict_photos(b, synth)
    return [_geoloc("predict", str(photos), "--run", str(run), "--out",
                    str(b.work / "predictions.csv"), "--device", "cpu")]  # fmt: skip


def _sets(pairs: list[str]) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def _predict_photos(b: Bench, synth: Path) -> Path:
    """A folder of links to the first 200 synthetic photos (test ones first)."""
    folder = b.work / "predict_photos"
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir()
    images = synth / "images"
    found = sorted((images / "test").glob("*.jpg")) + sorted((images / "train").glob("*.jpg"))
    for src in found[:PREDICT_PHOTOS]:
        (folder / src.name).symlink_to(src)
    return folder


def measure(cmd: list[str], b: Bench, row: Row, log_path: Path) -> str:
    """Run `cmd`, polling its process tree's memory; its final status."""
    kill_in = os.environ.get(KILL_ENV) == row.stage
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=b.env(), cwd=b.work, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        top = psutil.Process(proc.pid)
        seen: set[int] = set()
        status = None
        while status is None:
            try:
                tree = [top, *top.children(recursive=True)]
                rss = []
                for p in tree:
                    try:
                        rss.append(p.memory_info().rss / 2**20)
                        seen.add(p.pid)
                    except psutil.Error:
                        pass
                row.peak_mb = max(row.peak_mb, max(rss, default=0.0))
                row.tree_mb = max(row.tree_mb, sum(rss))
            except psutil.Error:
                pass
            if kill_in and time.perf_counter() - t0 > 2.0:  # a hard kill of everything
                os.killpg(proc.pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            code = proc.poll()
            if code is not None:
                status = "ok" if code == 0 else f"failed (exit {code})"
            elif time.perf_counter() - t0 > b.args.stage_timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"timeout ({b.args.stage_timeout:.0f} s)"
            else:
                time.sleep(0.2)
    row.seconds += time.perf_counter() - t0
    row.procs = max(row.procs, len(seen))
    return status


def run_stage(b: Bench, stage: str) -> Row:
    row = b.load(stage)
    if b.args.retry and row.status not in ("ok", "pending", "running"):
        row.note, row.status = f"retried after {row.status}", "pending"
    if row.status not in ("pending", "running"):
        return row  # finished in an earlier invocation
    need = NEEDS.get(stage)
    if need and b.load(need).status != "ok":
        row.status = f"skipped ({need} {b.load(need).status})"
        b.save(row)
        return row
    if row.status == "running":
        row.note = "resumed after a kill"
    row.status, row.attempts = "running", row.attempts + 1
    b.save(row)
    print(f"[scale] {stage} ...", flush=True)
    log_path = b.logs / f"{stage}.log"
    status = "ok"
    for cmd in commands(b, stage):
        status = measure(cmd, b, row, log_path)
        if status != "ok":
            break
    row.status = status
    row.data_mb, row.run_mb, row.mlflow_mb = b.sizes()
    b.save(row)
    print(f"[scale] {stage}: {status}, {row.seconds:.1f} s, peak {row.peak_mb:.0f} MB "
          f"(tree {row.tree_mb:.0f} MB)", flush=True)  # fmt: skip
    return row


def quality(b: Bench) -> dict[str, dict[str, float]]:
    """Test metrics after rerank, and the two image-blind baselines on the same test split."""
    import numpy as np
    import pandas as pd

    from geoloc.geo import haversine_km
    from geoloc.geo.metrics import geo_metrics_from_errors

    index = b.data / "index"
    if not (index / "splits.parquet").is_file():
        return {}
    splits = pd.read_parquet(index / "splits.parquet", columns=["image_id", "split",
                                                                  "label_cell"])  # fmt: skip
    images = pd.read_parquet(index / "images.parquet", columns=["image_id", "lat", "lon"])
    df = splits.merge(images, on="image_id")
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    out: dict[str, dict[str, float]] = {}
    run = b.run_dir()
    summary = run / "summary.json" if run else None
    if summary and summary.is_file():
        doc = json.loads(summary.read_text())
        before = {k.removeprefix("test_"): v for k, v in (doc.get("test") or {}).items()}
        if before:
            out["model before rerank"] = {**before, "acc_top1": before.get("top1"),
                                          "acc_top5": before.get("top5")}  # fmt: skip
        rerank = doc.get("rerank") or {}
        if rerank.get("metrics"):  # the rerank table has no top-5
            m = rerank["metrics"]
            out[f"model after rerank ({rerank.get('variant')})"] = {**m, "acc_top1": m.get("top1")}
    if len(train) == 0 or len(test) == 0:
        return out
    counts = train["label_cell"].value_counts()
    top = list(counts.index[:5])
    import h3

    lat0, lon0 = h3.cell_to_latlng(top[0])
    freq = geo_metrics_from_errors(haversine_km(test["lat"].to_numpy(), test["lon"].to_numpy(),
                                                np.full(len(test), lat0),
                                                np.full(len(test), lon0)))  # fmt: skip
    truth = test["label_cell"].to_numpy()
    freq.update(acc_top1=float(np.mean(truth == top[0])),
                acc_top5=float(np.isin(truth, top).mean()))  # fmt: skip
    out["prior: most frequent train cell"] = freq
    lat1, lon1 = _geographic_median(train["lat"].to_numpy(), train["lon"].to_numpy())
    med = geo_metrics_from_errors(haversine_km(test["lat"].to_numpy(), test["lon"].to_numpy(),
                                               np.full(len(test), lat1),
                                               np.full(len(test), lon1)))  # fmt: skip
    out["prior: geographic median of train"] = med
    return out


def _geographic_median(lat, lon, iters: int = 200, sample: int = 50_000):
    """The point on the sphere with the least summed great-circle distance (Weiszfeld in 3-D,
    projected back each step) over at most `sample` training coordinates."""
    import numpy as np

    rng = np.random.default_rng(0)
    if len(lat) > sample:
        pick = rng.choice(len(lat), sample, replace=False)
        lat, lon = lat[pick], lon[pick]
    la, lo = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)
    m = xyz.mean(axis=0)
    m /= np.linalg.norm(m) or 1.0
    for _ in range(iters):
        arc = np.arccos(np.clip(xyz @ m, -1.0, 1.0))
        w = 1.0 / np.maximum(arc, 1e-9)
        nxt = (xyz * w[:, None]).sum(axis=0)
        nxt /= np.linalg.norm(nxt) or 1.0
        if np.allclose(nxt, m, atol=1e-12):
            break
        m = nxt
    return float(np.degrees(np.arcsin(m[2]))), float(np.degrees(np.arctan2(m[1], m[0])))


def _fmt_acc(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _fmt_km(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(b: Bench, rows: list[Row], metrics: dict[str, dict[str, float]]) -> str:
    a = b.args
    lines = [
        f"N = {a.n:,} synthetic images ({a.size} px), {a.epochs} epoch(s), "
        f"{a.workers} workers; {os.cpu_count()} CPUs; commit {_commit()}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; stage limit {a.stage_timeout:.0f} s",
        "",
        "| stage | status | wall s | peak RSS MB (largest process) | peak RSS MB (tree) | "
        "processes | data MB | run MB | MLflow MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r.status + (f"; {r.note}" if r.note else "")
        lines.append(f"| {r.stage} | {status} | {r.seconds:.1f} | {r.peak_mb:,.0f} | "
                     f"{r.tree_mb:,.0f} | {r.procs} | {r.data_mb:,.1f} | {r.run_mb:,.1f} | "
                     f"{r.mlflow_mb:,.1f} |")  # fmt: skip
    total = sum(r.seconds for r in rows)
    lines.append(f"| **total** | | {total:.1f} | {max(r.peak_mb for r in rows):,.0f} | "
                 f"{max(r.tree_mb for r in rows):,.0f} | | | | |")  # fmt: skip
    lines += ["", "| test split | top-1 | top-5 | median km | P90 km |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in metrics.items():
        lines.append(f"| {name} | {_fmt_acc(m.get('acc_top1'))} | {_fmt_acc(m.get('acc_top5'))} "
                     f"| {_fmt_km(m.get('median_km'))} | {_fmt_km(m.get('p90_km'))} |")  # fmt: skip
    if not metrics:
        lines.append("| (no test metrics: index or rerank missing) | - | - | - | - |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_doc(doc: Path, n: int, text: str) -> None:
    """Put `text` under `### N = n` in `doc`, replacing that section if present."""
    head = f"### N = {n:,}"
    old = doc.read_text() if doc.is_file() else "# Scale\n"
    start = old.find(head)
    if start < 0:
        new = old.rstrip("\n") + f"\n\n{head}\n\n{text}"
    else:
        # the section ends at the next heading of its level or above (### , ## , # )
        after = re.search(r"\n#{1,3} ", old[start + len(head):])
        end = start + len(head) + after.start() if after else -1
        new = old[:start] + f"{head}\n\n{text}" + (old[end:] if end >= 0 else "")
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="synthetic images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-per-class", type=int, default=3, help="index min_images_per_class")
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (default .benchmarks/scale-n<N>/ in the repository)")
    ap.add_argument("--stage-timeout", type=float, default=3600.0, help="seconds per stage")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated stages to run (default: all, in pipeline order)")
    ap.add_argument("--retry", action="store_true",
                    help="run again the stages that failed, timed out or were skipped")
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    ap.add_argument("--doc", type=Path, nargs="?", const=REPO / "docs" / "scale.md",
                    default=None, help="also write the table into this file (docs/scale.md)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = (args.work or REPO / ".benchmarks" / f"scale-n{args.n}").resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    if unknown := wanted - set(STAGES):
        print(f"unknown stage(s): {', '.join(sorted(unknown))}; known: {', '.join(STAGES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    b = Bench(work, args)
    rows = [run_stage(b, stage) for stage in STAGES if stage in wanted]
    text = table(b, rows, quality(b))
    (work / "table.md").write_text(text)
    print(text)
    if args.doc:
        write_doc(args.doc, args.n, text)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
