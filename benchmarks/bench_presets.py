"""What an epoch of each training preset costs on the demo data, on CPU.

The presets (`geoloc/presets/run/*.yaml`) are timed on the demo index's shape: 64x64 images,
471 classes under 238 parents, 9,481 train and 1,186 val images per epoch (`make demo`'s index).
Each preset trains `--images` synthetic images (head, loss and parent head as the preset says)
and evaluates `--val` images; the per-image CPU times are scaled to a demo epoch. The margin
hard-negative term (off in every preset) is not in this timing: it needs the previous epoch's
prototypes, and on the demo it adds ~12% to an epoch (docs/training.md). The reference
is the configuration the `geosoft` preset had before it was sized for CPUs (MultiScaleCNN width
32, embedding 256, batch 128: `--param width=32 --param batch_size=128
--param 'overrides={"embed_dim": 256}'` on the deployment).

Time is process CPU time with one intra-op thread: on a shared machine wall-clock time mostly
measures the neighbours. One thread's seconds bound the wall time of an idle 2-core machine
from above (the second core only helps); the wall time of this run is printed for reference.

    .venv/bin/python benchmarks/bench_presets.py [--images 1024] [--val 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_index import write_synthetic_index  # noqa: E402

from geoloc.compute import seed_everything  # noqa: E402
from geoloc.config import RunConfig, load_config  # noqa: E402
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader  # noqa: E402
from geoloc.geo import LabelSpace  # noqa: E402
from geoloc.train.optim import build_optimizer, build_scheduler, steps_per_epoch  # noqa: E402
from geoloc.train.run import build_model_and_loss  # noqa: E402
from geoloc.train.steps import evaluate, train_one_epoch  # noqa: E402

DEMO_TRAIN, DEMO_VAL, DEMO_CLASSES, DEMO_PARENTS = 9_481, 1_186, 471, 238
REFERENCE = "geosoft, large (before)"


def presets() -> dict[str, RunConfig]:
    off = {"tracking.enabled": False}
    return {
        "demo": load_config("demo", off),
        "ce": load_config("ce", off),
        "geosoft": load_config("geosoft", off),
        REFERENCE: load_config(
            "geosoft", {**off, "model.width": 32, "model.embed_dim": 256, "train.batch_size": 128}
        ),
    }


def time_preset(cfg: RunConfig, index: Path, label_space: LabelSpace) -> tuple[float, float, float]:
    """(CPU s per train image, CPU s per val image, wall s) of one epoch of `cfg`."""
    seed_everything(0)
    train_set = GeoDataset(index, "train", build_transforms(cfg.train, True), cache=True,
                           progress=False)  # fmt: skip
    val_set = GeoDataset(index, "val", build_transforms(cfg.train, False), cache=True,
                         progress=False)  # fmt: skip
    model, criterion = build_model_and_loss(cfg, label_space, index / "splits.parquet")
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps_per_epoch(len(train_set), cfg.train))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    bs = cfg.train.batch_size
    warm = make_loader(train_set, bs, shuffle=True, seed=1)
    train_one_epoch(model, warm, criterion, opt, sched, scaler, torch.device("cpu"), epoch=1,
                    parent_loss_weight=cfg.train.parent_loss_weight, max_steps=2,
                    num_rows=len(train_set), progress=False)  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    loader = make_loader(train_set, bs, shuffle=True, seed=0)
    train_one_epoch(model, loader, criterion, opt, sched, scaler, torch.device("cpu"), epoch=2,
                    parent_loss_weight=cfg.train.parent_loss_weight, num_rows=len(train_set),
                    progress=False)  # fmt: skip
    train_cpu = time.process_time() - cpu
    cpu = time.process_time()
    evaluate(model, make_loader(val_set, bs, shuffle=False, seed=0), criterion, label_space,
             torch.device("cpu"), parent_loss_weight=cfg.train.parent_loss_weight,
             hier_topk_parents=cfg.train.hier_topk_parents, progress=False)  # fmt: skip
    val_cpu = time.process_time() - cpu
    return train_cpu / len(train_set), val_cpu / len(val_set), time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="synthetic train images timed")
    parser.add_argument("--val", type=int, default=256, help="synthetic val images timed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = write_synthetic_index(Path(tmp) / "data", args.images, DEMO_CLASSES, args.val,
                                      num_parents=DEMO_PARENTS)
        label_space = LabelSpace.from_json(index / "labels.json")
        for name, cfg in presets().items():
            per_train, per_val, wall = time_preset(cfg, index, label_space)
            rows[name] = (cfg, per_train * DEMO_TRAIN + per_val * DEMO_VAL, wall)
    ref = rows[REFERENCE][1]
    print(f"one demo epoch ({DEMO_TRAIN:,} train + {DEMO_VAL:,} val images, 64x64, "
          f"{DEMO_CLASSES} classes), CPU seconds with {args.threads} thread(s), "
          f"scaled from {args.images:,} + {args.val:,} timed images")  # fmt: skip
    print(f"{'preset':<26}{'width':>6}{'embed':>6}{'batch':>6}{'CPU s/epoch':>13}"
          f"{'vs reference':>14}{'wall s (timed part)':>21}")  # fmt: skip
    for name, (cfg, seconds, wall) in rows.items():
        print(f"{name:<26}{cfg.model.width:>6}{cfg.model.embed_dim:>6}{cfg.train.batch_size:>6}"
              f"{seconds:>13.1f}{seconds / ref:>14.2f}{wall:>21.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
