"""Training input from tar shards vs one file per image vs what the model consumes.

The same JPEGs (64x64 smooth textures, ~5 kB, as the demo and `geoloc data synth` store them)
are laid out twice: in tar shards (what ingest writes) and one file per image under a folder
tree (what it wrote before). Each row is the images/s of one training epoch through the run's
own loader (`geoloc.train.epoch_loader.EpochLoader`: the streaming plan, train transforms of
the demo preset at 64 px, batch 64) with 2 worker processes, read from disk (a split too large
for `train.cache_mb`). The model row is one training step of the demo preset's model on ready
tensors (forward, backward, AdamW) with torch's default threads: what a CPU run consumes.
A loader/model ratio >= 2 means the loader keeps the model fed with room to spare.

Wall clock, best of `--repeats` epochs, on a shared 2-core machine where the loader's workers
and the model compete for the same cores: read the ratios, not the absolute numbers.

    .venv/bin/python benchmarks/bench_streaming.py [--images 4096] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shard_format import make_jpegs  # noqa: E402

from geoloc.compute import seed_everything  # noqa: E402
from geoloc.config import load_config  # noqa: E402
from geoloc.data.dataset import GeoDataset, build_transforms  # noqa: E402
from geoloc.data.imagestore import shard_relpath  # noqa: E402
from geoloc.data.shardwriter import ShardWriter  # noqa: E402
from geoloc.model import create_model  # noqa: E402
from geoloc.train.epoch_loader import EpochLoader  # noqa: E402
from geoloc.train.optim import build_optimizer  # noqa: E402

CLASSES = 100


def write_index(root: Path, jpegs: list[bytes], sharded: bool) -> Path:
    """images/splits/labels for `jpegs` (all train), stored in shards or one file each."""
    index = root / "index"
    index.mkdir(parents=True)
    writer = ShardWriter(root / "processed" / "shards", "bench", 256 << 20) if sharded else None
    images, splits = [], []
    for i, data in enumerate(jpegs):
        sha = hashlib.sha256(data).hexdigest()
        row = {"image_id": f"i{i:06d}", "lat": 0.0, "lon": 0.0, "width": 64, "height": 64}
        if writer is not None:
            m = writer.add(sha, data)
            row |= {"path": shard_relpath(m.shard), "shard": m.shard, "member": m.member,
                    "offset": m.offset, "length": m.length}  # fmt: skip
        else:
            rel = f"processed/{sha[:2]}/{sha}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            row["path"] = rel
        images.append(row)
        splits.append({"image_id": row["image_id"], "split": "train", "label": i % CLASSES,
                       "parent_label": 0, "label_cell": f"c{i % CLASSES}"})  # fmt: skip
    if writer is not None:
        writer.close()
    pd.DataFrame(images).to_parquet(index / "images.parquet", index=False)
    pd.DataFrame(splits).to_parquet(index / "splits.parquet", index=False)
    labels = {"version": 1, "resolution": 2, "parent_resolution": 1, "fingerprint": "bench",
              "classes": [{"index": k, "cell": f"c{k}", "parent": "p0", "parent_index": 0,
                           "train_count": 1, "lat": 0.0, "lon": 0.0} for k in range(CLASSES)],
              "parents": [{"index": 0, "cell": "p0", "lat": 0.0, "lon": 0.0}]}  # fmt: skip
    (index / "labels.json").write_text(json.dumps(labels))
    return index


def loader_speed(index: Path, cfg, workers: int, repeats: int, cache: bool) -> float:
    """Best images/s over `repeats` epochs of the training loader (workers persist)."""
    dataset = GeoDataset(index, "train", build_transforms(cfg.train, train=True), cache=cache)
    loader = EpochLoader(dataset, cfg.train.batch_size, workers,
                         shuffle_buffer=cfg.train.shuffle_buffer)  # fmt: skip
    best = 0.0
    for epoch in range(repeats + 1):
        start, n = time.perf_counter(), 0
        for images, *_ in loader.epoch(list(range(len(dataset))), seed=epoch):
            n += images.shape[0]
        if epoch:  # the first pass starts the worker processes
            best = max(best, n / (time.perf_counter() - start))
    return best


def model_speed(cfg, steps: int) -> float:
    """Best images/s of training steps of the demo model on a ready batch (no loading)."""
    seed_everything(0)
    model = create_model(cfg.model, CLASSES, None).train()
    opt = build_optimizer(model, cfg.train)
    b, size = cfg.train.batch_size, cfg.train.image_size
    x, y = torch.randn(b, 3, size, size), torch.randint(0, CLASSES, (b,))
    best = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:  # the first step warms up the allocator
            best = max(best, b / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config("demo", {"head": "flat", "tracking.enabled": False})  # random labels, no tree
    jpegs = make_jpegs(args.images, 64)
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_index(Path(tmp) / "shards", jpegs, sharded=True)
        files = write_index(Path(tmp) / "files", jpegs, sharded=False)
        w = args.workers
        rows[f"loader: tar shards, streamed, {w} workers"] = loader_speed(
            shards, cfg, w, args.repeats, cache=False)  # fmt: skip
        rows[f"loader: one file per image, {w} workers"] = loader_speed(
            files, cfg, w, args.repeats, cache=False)  # fmt: skip
        rows[f"loader: decoded in memory (train.cache_mb), {w} workers"] = loader_speed(
            shards, cfg, w, args.repeats, cache=True)  # fmt: skip
    model = model_speed(cfg, steps=8)
    kb = sum(map(len, jpegs)) / len(jpegs) / 1e3
    print(f"{args.images} JPEGs 64x64 ({kb:.1f} kB each), demo preset (batch "
          f"{cfg.train.batch_size}, train transforms), torch threads {torch.get_num_threads()}, "
          "CPU, shared 2-core machine")  # fmt: skip
    print(f"{'path':<56}{'images/s':>10}{'vs model':>10}")
    for name, ips in rows.items():
        print(f"{name:<56}{ips:>10.0f}{ips / model:>9.1f}x")
    print(f"{'model: demo train step on ready tensors':<56}{model:>10.0f}{1.0:>9.1f}x")
    first, second = list(rows.values())[:2]
    print(f"shards vs one file per image: {first / second:.2f}x")


if __name__ == "__main__":
    main()
