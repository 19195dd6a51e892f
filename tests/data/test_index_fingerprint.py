"""The index fingerprint (and MLflow's dataset digest) name the data, not where it was ingested.

Two data folders holding the same photos, ingested from their own absolute paths, get different
ingest jobs and so different shard names; their images, splits and labels are the same, and so
must be the fingerprint that runs, checkpoints and MLflow identify the dataset by.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from fixtures.demo_data import DEMO_FIXTURE_CONFIG

from geoloc.config import IndexConfig
from geoloc.data.demo import make_demo
from geoloc.data.imagestore import ImageLocations
from geoloc.data.index import build_index, index_fingerprint
from geoloc.data.ingest import ingest, job_id, job_spec
from geoloc.data.streaming import shuffled_blocks
from geoloc.integrations.mlflow.contents import dataset_input
from geoloc.paths import DataPaths

N_IMAGES = 240


def _ingest_folder(root: Path, **overrides: object) -> DataPaths:
    """Demo photos copied under `root`, ingested as a folder from their absolute path."""
    paths = DataPaths(root)
    cfg = IndexConfig(**{**DEMO_FIXTURE_CONFIG, "min_images_per_class": 2, **overrides})
    make_demo(paths.demo, n=N_IMAGES, seed=0, min_population=200_000)
    ingest(str(paths.demo.resolve()), paths, cfg)
    build_index(paths, cfg)
    return paths


OUTSIDE_CONFIG = IndexConfig(**{**DEMO_FIXTURE_CONFIG, "min_images_per_class": 2})


def _jobs_in_name_order(photos: Path, root: Path) -> list[str]:
    """Which of `photos/west`, `photos/east` a shard-name order would put first."""
    paths = DataPaths(root)
    job = {p: job_id(job_spec(str((photos / p).resolve()), paths), OUTSIDE_CONFIG, {})
           for p in ("west", "east")}  # fmt: skip
    return sorted(job, key=job.__getitem__)


def _ingest_two_outside_folders(photos: Path, root: Path) -> DataPaths:
    """The same demo photos as two folders outside the data root (`photos/east`, `photos/west`),
    each ingested from its absolute path: two ingest jobs whose ids carry those paths."""
    paths, cfg = DataPaths(root), OUTSIDE_CONFIG
    make_demo(photos / "all", n=N_IMAGES, seed=0, min_population=200_000)
    for i, image in enumerate(sorted((photos / "all").glob("*.jpg"))):
        target = photos / ("east" if i % 2 else "west") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    for part in ("west", "east"):
        ingest(str((photos / part).resolve()), paths, cfg)
    build_index(paths, cfg)
    return paths


def _content_stream(paths: DataPaths, seed: int) -> list[str]:
    """The images' digests in storage order, and in a streamed epoch's shuffled block order."""
    table = pd.read_parquet(paths.images)
    locations = ImageLocations(table, paths.root)
    storage = locations.storage_order()
    digests = table["sha256"].astype(str).to_numpy()
    stream = shuffled_blocks(storage, locations.codes, seed=seed)
    return [*digests[storage], "|", *digests[stream]]


def test_same_photos_in_two_folders_have_one_fingerprint_other_splits_another(
    tmp_path: Path,
) -> None:
    a = _ingest_folder(tmp_path / "first" / "data")
    b = _ingest_folder(tmp_path / "elsewhere" / "deeper" / "data")
    shards_a = set(pd.read_parquet(a.images)["shard"])
    shards_b = set(pd.read_parquet(b.images)["shard"])
    # a folder under the data root is named relative to it: one job, the same shard names
    assert shards_a == shards_b
    fp_a = json.loads(a.labels.read_text())["fingerprint"]
    fp_b = json.loads(b.labels.read_text())["fingerprint"]
    assert fp_a == fp_b == index_fingerprint(a) == index_fingerprint(b)
    digests = [
        dataset_input({"dataset": {"fingerprint": fp}}, {"index_dir": str(p.index)})["digest"]
        for fp, p in ((fp_a, a), (fp_b, b))
    ]
    assert digests[0] == digests[1]
    # and it still tells data apart: the same photos split with another seed are another dataset
    other = _ingest_folder(tmp_path / "other" / "data", seed=1)
    assert index_fingerprint(other) != fp_a


def test_demo_shard_names_do_not_carry_the_data_folder(tmp_path: Path) -> None:
    """The demo source reads `data/raw/demo` of whichever folder: its ingest job is one."""
    names = []
    for root in (tmp_path / "one" / "data", tmp_path / "two" / "data"):
        paths = DataPaths(root)
        cfg = IndexConfig(**DEMO_FIXTURE_CONFIG)
        make_demo(paths.demo, n=60, seed=0, min_population=200_000)
        ingest("demo", paths, cfg)
        names.append(sorted(p.name for p in (paths.processed / "shards").glob("*.tar")))
    assert names[0] == names[1]


def test_same_photos_from_two_outside_folders_stream_in_one_order(tmp_path: Path) -> None:
    """Sources outside the data root keep their absolute paths in their job ids (so shard
    names differ), yet the index streams its images in one content order with one fingerprint:
    a streamed run trains on the same batches whichever folders the photos were ingested from."""
    photos_a, root_a, root_b = tmp_path / "photos", tmp_path / "first" / "data", tmp_path / "b"
    # a copy whose job ids sort the other way round: shard names would order it differently
    photos_b = next(
        p
        for i in range(200)
        if _jobs_in_name_order(p := tmp_path / f"copy{i}" / "photos", root_b)
        != _jobs_in_name_order(photos_a, root_a)
    )
    a = _ingest_two_outside_folders(photos_a, root_a)
    b = _ingest_two_outside_folders(photos_b, root_b)
    shards_a = set(pd.read_parquet(a.images)["shard"])
    shards_b = set(pd.read_parquet(b.images)["shard"])
    assert len(shards_a) >= 2 and shards_a.isdisjoint(shards_b)
    assert index_fingerprint(a) == index_fingerprint(b)
    for seed in (0, 1, 2):
        assert _content_stream(a, seed) == _content_stream(b, seed)
