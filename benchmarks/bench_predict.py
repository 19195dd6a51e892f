"""Latency for one image and throughput for a folder of `geoloc predict`, rerank on and off.

    .venv/bin/python benchmarks/bench_predict.py --run RUN_DIR FOLDER [--images 512] [--repeat 20]

The plain reference is the base model alone (`--no-rerank`: decode, transform, forward, softmax);
the rerank row adds the gallery search, vote blending, refinement and calibration of the run's
chosen variant (the run must have been through `geoloc rerank`). Models are loaded once, outside
the timings, as a long-lived service would. Prints one row per mode and the rerank/plain ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from geoloc.infer.predict import Predictor, collect_images


def one_image_latency_ms(predictor: Predictor, image: Path, repeat: int) -> float:
    predictor.predict([image], progress=False)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        predictor.predict([image], progress=False)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def folder_throughput(predictor: Predictor, images: list[Path]) -> float:
    t0 = time.perf_counter()
    predictor.predict(images, progress=False)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a reranked run directory")
    parser.add_argument("folder", type=Path, help="a folder of images")
    parser.add_argument("--images", type=int, default=512, help="images for the throughput")
    parser.add_argument("--repeat", type=int, default=20, help="single-image repeats")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    images = collect_images([args.folder])[: args.images]
    if not images:
        raise SystemExit(f"no images under {args.folder}")
    rows = []
    for rerank in (False, True):
        predictor = Predictor(args.run, rerank=rerank, batch_size=args.batch_size)
        name = f"rerank ({predictor.variant})" if rerank else "plain (base model)"
        rows.append(
            (
                name,
                one_image_latency_ms(predictor, images[0], args.repeat),
                folder_throughput(predictor, images),
            )
        )
    print(f"{len(images)} images from {args.folder}, batch size {args.batch_size}")
    print(f"{'mode':<32} {'1-image ms':>11} {'images/s':>9}")
    for name, ms, ips in rows:
        print(f"{name:<32} {ms:>11.1f} {ips:>9.1f}")
    (_, ms0, ips0), (_, ms1, ips1) = rows
    print(f"rerank / plain: latency x{ms1 / ms0:.2f}, throughput x{ips1 / ips0:.2f}")


if __name__ == "__main__":
    main()
