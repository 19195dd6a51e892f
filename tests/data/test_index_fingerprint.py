"""The index fingerprint (and MLflow's dataset digest) name the data, not where it was ingested.

Two data folders holding the same photos, ingested from their own absolute paths, get different
ingest jobs and so different shard names; their images, splits and labels are the same, and so
must be the fingerprint that runs, checkpoints and MLflow identify the dataset by.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from fixtures.demo_data import DEMO_FIXTURE_CONFIG

from geoloc.config import IndexConfig
from geoloc.data.demo import make_demo
from geoloc.data.index import build_index, index_fingerprint
from geoloc.data.ingest import ingest
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


def test_same_photos_in_two_folders_have_one_fingerprint_other_splits_another(
    tmp_path: Path,
) -> None:
    a = _ingest_folder(tmp_path / "first" / "data")
    b = _ingest_folder(tmp_path / "elsewhere" / "deeper" / "data")
    shards_a = set(pd.read_parquet(a.images)["shard"])
    shards_b = set(pd.read_parquet(b.images)["shard"])
    assert shards_a.isdisjoint(shards_b)  # the ingest jobs, and so the shard names, differ
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
