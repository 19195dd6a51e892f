"""DataLoader throughput against model consumption: is the model starved?

Loader rows: images/s a `GeoDataset` loader delivers (train transforms, batch 128) with decoded
pixels cached in memory or decoded from JPEG every epoch, with 0 or 2 worker processes. The
model row: images/s one training step (forward + backward + AdamW) consumes on ready tensors.
A ratio loader/model well above 1 means data is not the bottleneck; with `num_workers=0` the two
add up serially, so the loader's share of an epoch is model/loader.
Speeds are on process CPU time with one intra-op thread (a shared machine makes wall-clock
numbers measure the neighbours); rows with worker processes can only be timed on the wall clock.

    .venv/bin/python benchmarks/bench_dataloader.py [--images 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_index import write_synthetic_index  # noqa: E402

from geoloc.compute import seed_everything
from geoloc.config import load_config  # noqa: E402
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader  # noqa: E402
from geoloc.model import create_model  # noqa: E402
from geoloc.train.optim import build_optimizer


def loader_speed(dataset: GeoDataset, batch_size: int, workers: int, repeats: int) -> float:
    """Median images/s over `repeats` full passes (CPU time without workers, else wall)."""
    clock = time.process_time if workers == 0 else time.perf_counter
    speeds = []
    for r in range(repeats):
        loader = make_loader(dataset, batch_size, shuffle=True, seed=r, num_workers=workers)
        start, n = clock(), 0
        for images, *_ in loader:
            n += images.shape[0]
        speeds.append(n / (clock() - start))
    return statistics.median(speeds)


def model_speed(cfg, num_classes: int, batch_size: int, steps: int) -> float:
    """Median images/s of training steps on a fixed batch (no data loading at all)."""
    seed_everything(0)
    model = create_model(cfg.model, num_classes, None).train()
    opt = build_optimizer(model, cfg.train)
    size = cfg.train.image_size
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, num_classes, (batch_size,))
    speeds = []
    for step in range(steps + 1):
        start = time.process_time()
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:  # the first step warms up the allocator
            speeds.append(batch_size / (time.process_time() - start))
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # flat head: the model side is timed on random labels, with no label space
    cfg = load_config("demo", {"batch_size": args.batch_size, "head": "flat",
                               "tracking.enabled": False})  # fmt: skip
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = write_synthetic_index(Path(tmp) / "data", args.images, 100)
        tf = build_transforms(cfg.train, train=True)
        start = time.perf_counter()
        cached = GeoDataset(index, "train", tf, cache=True)
        cache_s = time.perf_counter() - start
        lazy = GeoDataset(index, "train", tf, cache=False)
        rows["loader: decode JPEG each time, 0 workers"] = loader_speed(
            lazy, args.batch_size, 0, args.repeats
        )
        rows["loader: decode JPEG each time, 2 workers (wall)"] = loader_speed(
            lazy, args.batch_size, 2, args.repeats
        )
        rows["loader: cached uint8, 0 workers"] = loader_speed(
            cached, args.batch_size, 0, args.repeats
        )
        rows["loader: cached uint8, 2 workers (wall)"] = loader_speed(
            cached, args.batch_size, 2, args.repeats
        )
    model = model_speed(cfg, 100, args.batch_size, steps=5)
    print(f"data loading vs model consumption: {args.images} JPEGs 64x64, batch {args.batch_size}, "
          f"train transforms, {torch.get_num_threads()} threads, CPU")  # fmt: skip
    print(f"{'path':<54}{'images/s':>10}{'loader/model':>14}")
    for name, ips in rows.items():
        print(f"{name:<54}{ips:>10.0f}{ips / model:>14.1f}")
    print(f"{'model: train step on ready tensors':<54}{model:>10.0f}{1.0:>14.1f}")
    print(f"one-off cost of caching {args.images} images: {cache_s:.2f}s")


if __name__ == "__main__":
    main()
