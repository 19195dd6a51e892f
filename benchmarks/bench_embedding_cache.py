"""Frozen-backbone training: heads on stored embeddings vs the backbone run on the fly.

Same config (a frozen ResNet-18 at 64x64, the same neck and heads, same seed); the reference is
`train.embeddings=online` (the frozen backbone's forward pass in every step and evaluation), ours
is `train.embeddings=cache` run twice: cold (embeds every image once, then trains) and warm (a
later run or sweep trial reusing the stored embeddings). Both give the same metrics (tested in
tests/train/test_embeddings.py). Times are process CPU seconds of whole `train_run`s (data decode,
training, evaluation, checkpoints) with one intra-op thread: on a shared machine wall-clock time
mostly measures the neighbours.

    .venv/bin/python benchmarks/bench_embedding_cache.py [--images 1024] [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_index import write_synthetic_index  # noqa: E402

from geoloc.config import load_config  # noqa: E402
from geoloc.runfolder.layout import RunPaths  # noqa: E402
from geoloc.train.run import train_run  # noqa: E402


def timed_run(cfg, run_dir: Path) -> tuple[float, float, pd.DataFrame]:
    cpu, wall = time.process_time(), time.perf_counter()
    run = train_run(cfg, run_dir=run_dir, progress=False)
    metrics = pd.read_csv(RunPaths(run).metrics_csv)
    return time.process_time() - cpu, time.perf_counter() - wall, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_synthetic_index(root / "data", args.images, 64, n_val=args.images // 4)
        base = {"name": "bench", "arch": args.arch, "freeze_backbone": True, "augment": False,
                "epochs": args.epochs, "batch_size": 64, "image_size": 64, "device": "cpu",
                "tracking.enabled": False, "index_dir": str(index)}  # fmt: skip
        online = timed_run(load_config(None, base), root / "online")
        cached = {**base, "embeddings": "cache"}
        cold = timed_run(load_config(None, cached), root / "cold")
        warm = timed_run(load_config(None, cached), root / "warm")
    same = online[2].drop(columns="epoch_time_s").equals(warm[2].drop(columns="epoch_time_s"))
    print(f"frozen {args.arch}, {args.images} train + {args.images // 4} val images at 64x64, "
          f"{args.epochs} epochs, {args.threads} thread(s)")  # fmt: skip
    print(f"{'run':<28} {'CPU s':>7} {'wall s':>7} {'vs online':>9}")
    for name, (cpu, wall, _) in (("online (backbone each step)", online),
                                 ("cache, cold (embeds once)", cold),
                                 ("cache, warm (reuses)", warm)):  # fmt: skip
        print(f"{name:<28} {cpu:>7.1f} {wall:>7.1f} {online[0] / cpu:>8.1f}x")
    print(f"metrics identical to the online run: {same}")


if __name__ == "__main__":
    main()
