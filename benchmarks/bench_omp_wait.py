"""Training on a busy CPU: OpenMP threads that spin (the default) against threads that sleep.

`geoloc/__init__.py` sets `OMP_WAIT_POLICY=PASSIVE` unless the environment says otherwise. This
times the same work under both policies, each in a fresh process (the runtime reads the policy
when torch loads): one epoch of the `geosoft` preset over `--images` synthetic 64x64 images with
`--threads` intra-op threads (the machine's cores by default). The reference is `ACTIVE`, what
torch does without geoloc. The load average is printed with each timing: on an idle machine the
two policies are close; on a shared one the spinning threads wait for cores the neighbours hold.

    .venv/bin/python benchmarks/bench_omp_wait.py [--images 640] [--threads 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# the timed work, run in a child process whose environment carries the policy
CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from _synthetic_index import write_synthetic_index
from geoloc.config import load_config
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader
from geoloc.geo import LabelSpace
from geoloc.train.run import build_model_and_loss
from geoloc.train.optim import build_optimizer, build_scheduler, steps_per_epoch
from geoloc.compute import seed_everything
from geoloc.train.steps import train_one_epoch

images, threads = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = load_config("geosoft", {"tracking.enabled": False})
with tempfile.TemporaryDirectory() as tmp:
    index = write_synthetic_index(Path(tmp) / "data", images, 298)
    labels = LabelSpace.from_json(index / "labels.json")
    data = GeoDataset(index, "train", build_transforms(cfg.train, True), cache=True,
                      progress=False)
    seed_everything(0)
    model, criterion = build_model_and_loss(cfg, labels, index / "splits.parquet")
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps_per_epoch(len(data), cfg.train))
    wall, cpu = time.perf_counter(), time.process_time()
    train_one_epoch(model, make_loader(data, cfg.train.batch_size, shuffle=True, seed=0),
                    criterion, opt, sched,
                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), epoch=1,
                    parent_loss_weight=cfg.train.parent_loss_weight, num_rows=len(data),
                    progress=False)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                      "load": os.getloadavg()[0]}))
"""


def run(policy: str, images: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(images), str(threads)],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs per policy")
    args = parser.parse_args()
    times: dict[str, list[dict[str, float]]] = {"ACTIVE": [], "PASSIVE": []}
    for _ in range(args.repeat):  # alternate, so a change of load hits both
        for policy in times:
            times[policy].append(run(policy, args.images, args.threads))
    print(f"one geosoft-preset epoch over {args.images} images 64x64, {args.threads} threads, "
          f"{os.cpu_count()} cores; ACTIVE = torch's default (spinning threads)")  # fmt: skip
    print(f"{'OMP_WAIT_POLICY':<16}{'wall s':>8}{'CPU s':>8}{'load avg':>10}")
    for policy, rows in times.items():
        for r in rows:
            print(f"{policy:<16}{r['wall']:>8.1f}{r['cpu']:>8.1f}{r['load']:>10.2f}")
    best = {p: min(r["wall"] for r in rows) for p, rows in times.items()}
    print(f"ACTIVE / PASSIVE wall (best of {args.repeat}): {best['ACTIVE'] / best['PASSIVE']:.1f}x")


if __name__ == "__main__":
    main()
