"""Training throughput: geoloc's loop against a plain PyTorch loop doing the same work.

Same model (MultiScaleCNN of the demo preset), same cached dataset and transforms, same batch
size, same optimizer. The plain loop is the textbook `for x, y in loader: loss.backward()`; ours
adds what a run needs: GeoSoft + parent loss, hard-negative epoch composition, per-row prediction
tracking, NaN guard, LR schedule and a checkpoint every epoch. Validation is left out of both
(it is extra work, not overhead). Epochs alternate between the loops and the median is reported.
Throughput is measured on process CPU time with one intra-op thread by default: on a shared
machine wall-clock time mostly measures the neighbours (it is printed too, for reference).

    .venv/bin/python benchmarks/bench_train_throughput.py [--images 1024] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_index import write_synthetic_index  # noqa: E402

from geoloc.compute import seed_everything
from geoloc.config import load_config  # noqa: E402
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader  # noqa: E402
from geoloc.geo import LabelSpace  # noqa: E402
from geoloc.model import create_model  # noqa: E402
from geoloc.train.checkpoint import save_checkpoint
from geoloc.train.loop import FitState, epoch_order
from geoloc.train.optim import build_optimizer, build_scheduler, steps_per_epoch
from geoloc.train.run import build_model_and_loss
from geoloc.train.steps import train_one_epoch


def plain_epoch(model, loader, optimizer) -> tuple[int, float]:
    """The reference: cross-entropy on the child head, nothing else."""
    model.train()
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for images, labels, _, _ in loader:
        loss = F.cross_entropy(model(images)["logits"], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += labels.shape[0]
    return seen, time.process_time() - cpu, time.perf_counter() - start


EpochTiming = tuple[int, float, float, np.ndarray]  # images, CPU s, wall s, train predictions


def geoloc_epoch(model, train_set, cfg, label_space, criterion, optimizer, scheduler, scaler,
                 epoch_index, pool_pred, ckpt_dir) -> EpochTiming:  # fmt: skip
    """Our epoch minus validation: composition, train_one_epoch, checkpoint."""
    start, cpu = time.perf_counter(), time.process_time()
    order = epoch_order(train_set.labels, epoch_index, cfg.seed, pool_pred, train_set.labels,
                        cfg.hardneg)  # fmt: skip
    loader = make_loader(train_set, cfg.train.batch_size, shuffle=False, seed=epoch_index,
                         sampler=order.tolist())  # fmt: skip
    result = train_one_epoch(
        model, loader, criterion, optimizer, scheduler, scaler, torch.device("cpu"),
        epoch=epoch_index + 1, parent_loss_weight=cfg.train.parent_loss_weight,
        num_rows=len(train_set), progress=False,
    )  # fmt: skip
    best, extra = FitState(
        epoch=epoch_index + 1, pool_pred_labels=result.pred_labels
    ).to_checkpoint()
    save_checkpoint(
        ckpt_dir / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        epoch=epoch_index + 1, config=cfg.model_dump(mode="json"), label_space=label_space,
        best=best, history=[], extra=extra,
    )  # fmt: skip
    return result.images, time.process_time() - cpu, time.perf_counter() - start, result.pred_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="train images")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = {"batch_size": args.batch_size, "hardneg.enabled": True, "hardneg.mode": "oversample",
            "hardneg.pool_split": "train",
            "hardneg.start_epoch": 1, "tracking.enabled": False}  # fmt: skip
    variants = {
        "geoloc loop, same CE model": load_config(
            "demo", {**base, "loss": "ce", "head": "flat", "hierarchy": False}
        ),
        "geoloc loop, demo preset (factorised)": load_config("demo", base),
    }
    with tempfile.TemporaryDirectory() as tmp:
        index = write_synthetic_index(Path(tmp) / "data", args.images, args.classes)
        label_space = LabelSpace.from_json(index / "labels.json")
        cfg0 = next(iter(variants.values()))
        train_set = GeoDataset(index, "train", build_transforms(cfg0.train, train=True), cache=True)
        seed_everything(0)
        plain = create_model(cfg0.model.model_copy(update={"hierarchy": False}),
                             label_space.num_classes, None)  # fmt: skip
        opt_plain = build_optimizer(plain, cfg0.train)
        plain_loader = make_loader(train_set, args.batch_size, shuffle=True, seed=0)
        runners = {}
        for name, cfg in variants.items():
            seed_everything(0)
            model, crit = build_model_and_loss(cfg, label_space, index / "splits.parquet")
            opt = build_optimizer(model, cfg.train)
            sched = build_scheduler(opt, cfg.train, steps_per_epoch(len(train_set), cfg.train))
            runners[name] = [cfg, model, crit, opt, sched]
        scaler = torch.amp.GradScaler("cpu", enabled=False)

        plain_epoch(plain, plain_loader, opt_plain)  # warm-up (allocator, kernels)
        speed: dict[str, list[float]] = {"plain PyTorch loop (CE)": []} | {k: [] for k in runners}
        wall: dict[str, list[float]] = {k: [] for k in speed}
        pools: dict[str, np.ndarray | None] = {k: None for k in runners}
        for e in range(args.epochs):  # interleaved, so load changes hit every loop alike
            n, s, w = plain_epoch(plain, plain_loader, opt_plain)
            speed["plain PyTorch loop (CE)"].append(n / s)
            wall["plain PyTorch loop (CE)"].append(n / w)
            for name, (cfg, model, crit, opt, sched) in runners.items():
                args_ = (cfg, label_space, crit, opt, sched, scaler, e, pools[name], Path(tmp))
                n, s, w, pools[name] = geoloc_epoch(model, train_set, *args_)
                speed[name].append(n / s)
                wall[name].append(n / w)

    med = {k: statistics.median(v) for k, v in speed.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    ref = med["plain PyTorch loop (CE)"]
    print(f"train throughput: {args.images} images 64x64, batch {args.batch_size}, "
          f"{label_space.num_classes} classes, {torch.get_num_threads()} threads, CPU, "
          f"median of {args.epochs} epochs")  # fmt: skip
    print(f"{'loop':<40}{'img/s CPU':>10}{'vs plain':>10}{'img/s wall':>12}")
    for name, ips in med.items():
        print(f"{name:<40}{ips:>10.1f}{ips / ref:>10.3f}{med_wall[name]:>12.1f}")
    same = med["geoloc loop, same CE model"]
    print(f"overhead of the geoloc loop (hard negatives, tracking, checkpoint each epoch): "
          f"{100 * (ref / same - 1):+.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
