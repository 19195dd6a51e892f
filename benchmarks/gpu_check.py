"""GPU check: does geoloc's training loop keep a GPU busy? `python -m benchmarks gpu`.

Needs CUDA; without it, one line on stderr and exit code 2. On a GPU (well under 5 minutes on an
H200) it builds two synthetic indexes in a temp folder and, for each, times:

- training images/s: the run's own data path and step (`GeoDataset` with decoded images in
  memory, train transforms in `--workers` persistent DataLoader workers, pinned memory and
  non-blocking copies, AMP (bf16 where supported, else fp16 + GradScaler), channels_last,
  `train_one_epoch`), measured on the second epoch so worker start-up and cuDNN autotuning are
  left out;
- model-only images/s: the same model, loss and optimizer stepping on one batch that already
  sits on the GPU, i.e. what the GPU alone can do;

and prints their ratio (goal >= 0.8: the input pipeline and the loop's bookkeeping cost less
than a fifth of the GPU's time) and the training epoch's peak GPU memory.

- demo: the `demo` preset (MultiScaleCNN width 16, 64x64) on ~300 classes; it also runs the
  preset end to end once (`train_run`: train, evaluate, checkpoints) for one epoch.
- r7: a synthetic r7-sized problem: 100,000 classes (about 14,300 parents), 224x224 crops of
  256x256 images, a ResNet-50 backbone, batch 256 (the `r7` preset's settings where it exists).

    .venv/bin/python -m benchmarks gpu [--workers 12] [--r7-arch resnet50] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image


def require_cuda() -> None:
    if not torch.cuda.is_available():
        cuda = torch.version.cuda or "none (CPU-only build)"
        print(f"gpu check: no CUDA GPU is available (torch {torch.__version__}, CUDA build: "
              f"{cuda}); run it on a machine with an NVIDIA GPU and a CUDA build of torch",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


def h3_classes(num_classes: int, resolution: int, parent_resolution: int,
               rng: np.random.Generator) -> tuple[list[str], list[str]]:  # fmt: skip
    """`num_classes` real H3 cells (all children of random parents) and their parents."""
    import h3

    parents: dict[str, None] = {}
    cells: list[str] = []
    while len(cells) < num_classes:
        lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1))), rng.uniform(-180, 180)
        parent = h3.latlng_to_cell(lat, lon, parent_resolution)
        if parent not in parents:
            parents[parent] = None
            cells += sorted(h3.cell_to_children(parent, resolution))
    cells = sorted(cells[:num_classes])
    return cells, sorted({h3.cell_to_parent(c, parent_resolution) for c in cells})


def write_index(root: Path, n_train: int, n_val: int, num_classes: int, size: int,
                resolution: int, parent_resolution: int) -> Path:  # fmt: skip
    """Random JPEGs and an index whose labels spread over `num_classes` real H3 cells."""
    import h3

    rng = np.random.default_rng(0)
    (root / "processed").mkdir(parents=True)
    index = root / "index"
    index.mkdir()
    cells, parent_cells = h3_classes(num_classes, resolution, parent_resolution, rng)
    parent_index = {c: i for i, c in enumerate(parent_cells)}
    parent_of = [parent_index[h3.cell_to_parent(c, parent_resolution)] for c in cells]
    centre = np.array([h3.cell_to_latlng(c) for c in cells])
    images, splits = [], []
    for i in range(n_train + n_val):
        k = (i * 7919) % num_classes
        rel = f"processed/{i:06d}.jpg"
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / rel, quality=90)
        images.append({"image_id": f"i{i}", "path": rel, "lat": centre[k, 0],
                       "lon": centre[k, 1], "width": size, "height": size})  # fmt: skip
        splits.append({"image_id": f"i{i}", "split": "train" if i < n_train else "val",
                       "label": k, "parent_label": parent_of[k], "label_cell": cells[k],
                       "remapped": False})  # fmt: skip
    pd.DataFrame(images).to_parquet(index / "images.parquet", index=False)
    pd.DataFrame(splits).to_parquet(index / "splits.parquet", index=False)
    labels = {
        "version": 1, "resolution": resolution, "parent_resolution": parent_resolution,
        "fingerprint": f"gpu-check-r{resolution}-{num_classes}",
        "classes": [{"index": k, "cell": c, "parent": parent_cells[parent_of[k]],
                     "parent_index": parent_of[k], "train_count": 1,
                     "lat": float(centre[k, 0]), "lon": float(centre[k, 1])}
                    for k, c in enumerate(cells)],
        "parents": [{"index": p, "cell": c, "lat": float(h3.cell_to_latlng(c)[0]),
                     "lon": float(h3.cell_to_latlng(c)[1])} for p, c in enumerate(parent_cells)],
    }  # fmt: skip
    (index / "labels.json").write_text(json.dumps(labels))
    return index


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: Any, index: Path, steps: int, device: torch.device) -> dict[str, Any]:
    """Training images/s (second epoch of the real loader + step), model-only images/s, memory.

    `device` is CUDA in the check; another device only serves to try this code without a GPU.
    """
    from geoloc.compute import resolve_compute, seed_everything
    from geoloc.data.dataset import GeoDataset, build_transforms
    from geoloc.geo import LabelSpace
    from geoloc.model.losses import forward_inputs
    from geoloc.train.epoch_loader import EpochLoader
    from geoloc.train.loop import _Optimisation
    from geoloc.train.run import build_model_and_loss
    from geoloc.train.steps import total_loss, train_one_epoch

    tc = cfg.train
    seed_everything(0, deterministic=tc.deterministic)
    label_space = LabelSpace.from_json(index / "labels.json")
    train_set = GeoDataset(index, "train", build_transforms(tc, train=True), progress=False)
    model, criterion = build_model_and_loss(cfg, label_space, index / "splits.parquet")
    criterion.to(device)
    compute = resolve_compute(tc, device, model)
    compute.prepare_model(model.to(device))
    opt = _Optimisation.build(model, cfg, len(train_set), compute)
    step_model = torch.compile(model) if tc.compile else model
    cuda = device.type == "cuda"
    loader = EpochLoader(train_set, tc.batch_size, tc.num_workers, pin_memory=cuda)
    rows = list(range(len(train_set)))
    results = []
    for epoch in range(2):  # the first warms workers, cuDNN and the allocator up
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        results.append(train_one_epoch(
            step_model, loader.epoch(rows, epoch), criterion, opt.optimizer, opt.scheduler,
            opt.scaler, device, epoch=epoch + 1, parent_loss_weight=tc.parent_loss_weight,
            compute=compute, num_rows=len(train_set), progress=False,
        ))  # fmt: skip
        _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    train_ips = results[1].images / results[1].seconds

    b = tc.batch_size  # model only: the same step on one batch already on the GPU
    images = compute.images(torch.randn(b, 3, tc.image_size, tc.image_size), device)
    labels = torch.tensor(train_set.labels[:b], device=device)
    parents = torch.tensor(train_set.parent_labels[:b], device=device)
    model.train()

    def step() -> None:  # train_one_epoch's step minus the loader and the bookkeeping
        with compute.autocast():
            out = step_model(images, **forward_inputs(criterion, labels))
        loss = total_loss(out, labels, parents, criterion, tc.parent_loss_weight)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    model_ips = steps * b / (time.perf_counter() - start)
    return {"train": train_ips, "model": model_ips, "peak": peak,
            "precision": compute.precision, "channels_last": compute.channels_last,
            "classes": label_space.num_classes, "images": len(train_set)}  # fmt: skip


def demo_end_to_end(cfg: Any, root: Path) -> str:
    """The demo preset through `train_run` once: train, evaluate, checkpoints on CUDA."""
    from geoloc.runfolder.layout import RunPaths
    from geoloc.runfolder.summary import read_summary
    from geoloc.train.run import train_run

    start = time.perf_counter()
    run = train_run(cfg, run_dir=root / "runs" / "demo", progress=False)
    summary = read_summary(RunPaths(run).summary)
    return (f"demo preset end to end (train_run, 1 epoch, val + checkpoints): "
            f"{summary.get('status')} in {time.perf_counter() - start:.1f} s")  # fmt: skip


Row = tuple[str, Any, dict[str, Any]]


def run_check(args: argparse.Namespace, device: torch.device) -> tuple[list[Row], str, float]:
    """Both measurements and the end-to-end demo run: (table rows, demo line, seconds)."""
    from geoloc.config import RunConfig, load_config, presets

    common = {"device": device.type, "num_workers": args.workers, "compile": args.compile,
              "deterministic": False, "tracking.enabled": False}  # fmt: skip
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        demo_index = write_index(root / "demo", args.demo_images, 512, 300, 64, 2, 1)
        demo = load_config("demo", {**common, "index_dir": str(demo_index)})
        rows.append(("demo", demo, measure(demo, demo_index, args.steps, device)))
        e2e = demo_end_to_end(load_config("demo", {**common, "index_dir": str(demo_index),
                                                    "epochs": 1}), root)  # fmt: skip
        r7_index = write_index(root / "r7", args.r7_images, 0, args.r7_classes, 256, 7, 6)
        r7_over = {**common, "index_dir": str(r7_index), "arch": args.r7_arch,
                   "image_size": args.r7_image_size, "batch_size": args.batch,
                   "pretrained": False, "embeddings": "online"}  # speed: weights do not matter
        r7 = load_config("r7" if "r7" in presets(RunConfig) else None, r7_over)
        rows.append(("synthetic r7", r7, measure(r7, r7_index, args.steps, device)))
        return rows, e2e, time.perf_counter() - t0


def report(rows: list[Row], e2e: str, seconds: float, title: str) -> str:
    """The table: one row per measurement, the demo line and the verdict against 0.8."""
    head = (f"{'run':<13} {'arch':<19} {'classes':>8} {'image':>5} {'batch':>5} {'amp':>4} "
            f"{'train img/s':>11} {'model img/s':>11} {'ratio':>6} {'peak GiB':>8}")  # fmt: skip
    lines = [title, head, "-" * len(head)]
    worst = float("inf")
    for label, cfg, m in rows:
        ratio = m["train"] / m["model"]
        worst = min(worst, ratio)
        lines.append(
            f"{label:<13} {cfg.model.arch:<19} {m['classes']:>8,} {cfg.train.image_size:>5} "
            f"{cfg.train.batch_size:>5} {m['precision']:>4} {m['train']:>11,.0f} "
            f"{m['model']:>11,.0f} {ratio:>6.2f} {m['peak']:>8.2f}"
        )
    verdict = "met" if worst >= 0.8 else "NOT met"
    lines += [e2e, f"goal training >= 0.8 x model-only images/s: {verdict} (worst ratio "
                   f"{worst:.2f}); {seconds:.0f} s in all"]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    require_cuda()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--demo-images", type=int, default=8192)
    parser.add_argument("--r7-images", type=int, default=4096)
    parser.add_argument("--r7-classes", type=int, default=100_000)
    parser.add_argument("--r7-arch", default="resnet50")
    parser.add_argument("--r7-image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="r7 batch size")
    parser.add_argument("--steps", type=int, default=20, help="model-only timed steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    rows, e2e, seconds = run_check(args, torch.device("cuda"))
    title = (f"gpu check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA "
             f"{torch.version.cuda}), {args.workers} loader workers, cuDNN benchmark on, "
             f"compile={args.compile}")  # fmt: skip
    print("\n" + report(rows, e2e, seconds, title))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
