"""The canonical index: contract, determinism, split disjointness, labels and remapping, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h3
import numpy as np
import pandas as pd
import pytest
from fixtures.synth_index import SYNTH_CFG, clustered_points, write_manifest

from geoloc.config import IndexConfig
from geoloc.data.index import build_index, index_fingerprint
from geoloc.data.ingest import MANIFEST_COLUMNS
from geoloc.errors import DataError, IndexMissingError
from geoloc.paths import DataPaths

INDEX_FILES = ("images.parquet", "splits.parquet", "labels.json", "h3_features.parquet")
@pytest.fixture
def synth_paths() -> DataPaths:
    paths = DataPaths.default()
    lat, lon = clustered_points()
    write_manifest(paths, lat, lon, sequence_id=[f"s{i // 7}" for i in range(len(lat))])
    return paths


def _load(paths: DataPaths) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return (
        pd.read_parquet(paths.images),
        pd.read_parquet(paths.splits),
        json.loads(paths.labels.read_text()),
    )


# ------------------------------------------------------------------------------------------
# the contract, on the shared demo index
# ------------------------------------------------------------------------------------------


def test_demo_index_files_follow_the_contract(demo_index: DataPaths) -> None:
    images, splits, labels = _load(demo_index)
    res, parent = labels["resolution"], labels["parent_resolution"]
    h3_cols = [c for c in images.columns if c.startswith("h3_r")]
    assert f"h3_r{res}" in h3_cols and f"h3_r{parent}" in h3_cols
    assert set(images.columns) == set(MANIFEST_COLUMNS) - {"source_ref"} | set(h3_cols)
    assert list(splits.columns) == [
        "image_id", "split", "label", "parent_label", "label_cell", "remapped",
    ]  # fmt: skip
    assert images["image_id"].tolist() == splits["image_id"].tolist()
    assert set(splits["split"]) == {"train", "val", "test"}
    assert str(splits["label"].dtype) == "int64" and str(splits["remapped"].dtype) == "bool"
    assert {"version", "fingerprint", "min_images_per_class", "remap_policy"} <= set(labels)
    assert labels["remap_policy"] == "nearest_kept_class"
    assert [c["index"] for c in labels["classes"]] == list(range(len(labels["classes"])))
    feats = pd.read_parquet(demo_index.h3_features)
    assert list(feats.columns) == [
        "cell", "land_fraction", "coast_distance_km", "population", "bm_r", "bm_g", "bm_b",
    ]  # fmt: skip
    assert feats["cell"].tolist() == [c["cell"] for c in labels["classes"]]
    rejects = pd.read_parquet(demo_index.rejects)
    assert list(rejects.columns) == ["source", "source_ref", "reason", "detail", "stage"]
    assert index_fingerprint(demo_index) == labels["fingerprint"]


def test_h3_columns_form_one_tree(demo_index: DataPaths) -> None:
    images = pd.read_parquet(demo_index.images)
    cols = sorted((c for c in images.columns if c.startswith("h3_r")), reverse=True)
    finest = int(cols[0].removeprefix("h3_r"))
    for row in images.head(50).itertuples():
        cell = h3.latlng_to_cell(row.lat, row.lon, finest)
        for col in cols:
            assert getattr(row, col) == h3.cell_to_parent(cell, int(col.removeprefix("h3_r")))


# ------------------------------------------------------------------------------------------
# determinism and splits
# ------------------------------------------------------------------------------------------


def test_same_manifest_and_seed_give_identical_index_files(synth_paths: DataPaths, tmp_path):
    other = DataPaths(tmp_path / "other")
    other.processed.mkdir(parents=True)
    other.processed_manifest.write_bytes(synth_paths.processed_manifest.read_bytes())
    build_index(synth_paths, SYNTH_CFG)
    build_index(other, SYNTH_CFG)
    for name in INDEX_FILES:
        assert (synth_paths.index / name).read_bytes() == (other.index / name).read_bytes(), name
    reseeded = build_index(other, SYNTH_CFG.model_copy(update={"seed": 8}))
    assert reseeded.fingerprint != json.loads(synth_paths.labels.read_text())["fingerprint"]
    assert synth_paths.splits.read_bytes() != other.splits.read_bytes()


@pytest.mark.parametrize("strategy", ["geographic", "sequence"])
def test_split_groups_never_straddle_splits(synth_paths: DataPaths, strategy: str) -> None:
    cfg = SYNTH_CFG.model_copy(update={"split": strategy})
    build_index(synth_paths, cfg)
    images, splits, _ = _load(synth_paths)
    key = "h3_r1" if strategy == "geographic" else "sequence_id"
    joined = images[[key]].assign(split=splits["split"])
    assert (joined.groupby(key)["split"].nunique() == 1).all()
    shares = splits["split"].value_counts(normalize=True)
    assert set(shares.index) == {"train", "val", "test"} and shares["train"] > 0.5


def test_random_split_follows_the_fractions(synth_paths: DataPaths) -> None:
    cfg = SYNTH_CFG.model_copy(update={"split": "random", "val_frac": 0.2, "test_frac": 0.1})
    report = build_index(synth_paths, cfg)
    n = report.n_images
    assert report.split_counts["val"] == pytest.approx(0.2 * n, abs=1)
    assert report.split_counts["test"] == pytest.approx(0.1 * n, abs=1)


# ------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------


def test_labels_round_trip_between_indexes_cells_and_parents(synth_paths: DataPaths) -> None:
    build_index(synth_paths, SYNTH_CFG)
    images, splits, labels = _load(synth_paths)
    classes, parents = labels["classes"], labels["parents"]
    cell_to_index = {c["cell"]: c["index"] for c in classes}
    assert len(cell_to_index) == len(classes)
    own = images[f"h3_r{SYNTH_CFG.resolution}"]
    for row, cell in zip(splits.itertuples(), own, strict=True):
        cls = classes[row.label]
        assert cls["cell"] == row.label_cell and cell_to_index[row.label_cell] == row.label
        assert row.parent_label == cls["parent_index"]
        assert parents[row.parent_label]["cell"] == h3.cell_to_parent(cls["cell"], 2)
        assert row.remapped == (cell != row.label_cell)
    kept_train = splits[(splits["split"] == "train") & ~splits["remapped"]]
    counts = kept_train["label"].value_counts()
    for c in classes:
        assert c["train_count"] == counts[c["index"]] >= SYNTH_CFG.min_images_per_class
        assert (c["lat"], c["lon"]) == pytest.approx(h3.cell_to_latlng(c["cell"]))


def test_images_of_sparse_cells_go_to_the_nearest_kept_class(synth_paths: DataPaths) -> None:
    report = build_index(synth_paths, SYNTH_CFG)
    images, splits, labels = _load(synth_paths)
    assert report.n_images == len(images) == len(splits)  # nobody is dropped
    remapped = splits[splits["remapped"]]
    assert report.n_remapped == len(remapped) > 0
    cells = images.set_index("image_id")[f"h3_r{SYNTH_CFG.resolution}"]
    class_cells = [c["cell"] for c in labels["classes"]]
    for row in remapped.itertuples():
        centre = h3.cell_to_latlng(cells[row.image_id])
        dist = [h3.great_circle_distance(centre, h3.cell_to_latlng(c)) for c in class_cells]
        assert class_cells[int(np.argmin(dist))] == row.label_cell


def test_too_strict_min_images_fails_with_a_reason(synth_paths: DataPaths) -> None:
    with pytest.raises(DataError, match="min_images_per_class"):
        build_index(synth_paths, SYNTH_CFG.model_copy(update={"min_images_per_class": 10**6}))


def test_no_processed_images_is_a_clear_error() -> None:
    with pytest.raises(IndexMissingError, match="geoloc data ingest"):
        build_index(DataPaths.default(), SYNTH_CFG)


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_index_build_resumes_after_an_interruption(synth_paths: DataPaths, tmp_path: Path):
    reference = DataPaths(tmp_path / "reference")
    reference.processed.mkdir(parents=True)
    reference.processed_manifest.write_bytes(synth_paths.processed_manifest.read_bytes())
    build_index(reference, SYNTH_CFG)

    def stop_after_images(stage: str) -> None:
        if stage == "images":
            raise Interrupt

    with pytest.raises(Interrupt):
        build_index(synth_paths, SYNTH_CFG, on_stage=stop_after_images)
    assert not synth_paths.splits.exists()
    resumed = build_index(synth_paths, SYNTH_CFG)
    assert resumed.skipped_stages == ["images"]
    for name in INDEX_FILES:
        assert (synth_paths.index / name).read_bytes() == (reference.index / name).read_bytes()
    assert build_index(synth_paths, SYNTH_CFG).skipped_stages == ["images", "splits", "features"]
    # new settings are new inputs: nothing is skipped
    assert build_index(synth_paths, SYNTH_CFG.model_copy(update={"seed": 1})).skipped_stages == []


def test_index_build_resumes_after_the_process_is_killed(synth_paths: DataPaths) -> None:
    cmd = [sys.executable, "-c", "from geoloc.cli import run; run()", "index", "build"]
    cmd += ["--set", "resolution=3", "--set", "parent_resolution=2", "--set", "split_resolution=1"]
    cmd += ["--set", "min_images_per_class=5"]
    env = dict(os.environ, GEOLOC_FAULT_AFTER="index:2")
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert synth_paths.splits.exists() and not synth_paths.h3_features.exists()
    env.pop("GEOLOC_FAULT_AFTER")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = json.loads(synth_paths.labels.read_text())
    assert labels["fingerprint"] in done.stdout
    assert index_fingerprint(synth_paths) == labels["fingerprint"]


def test_zero_fractions_leave_those_splits_empty(synth_paths: DataPaths) -> None:
    cfg = SYNTH_CFG.model_copy(update={"split": "random", "val_frac": 0.2, "test_frac": 0.0})
    counts = build_index(synth_paths, cfg).split_counts
    assert counts["test"] == 0 and counts["val"] > 0


@pytest.mark.slow
def test_full_demo_gives_a_few_hundred_classes_reproducibly() -> None:
    """docs/data.md's promise about the demo preset (12,000 images, ~1 minute on 2 cores)."""
    from geoloc.config import load_config
    from geoloc.data.demo import make_demo
    from geoloc.data.ingest import ingest

    paths = DataPaths.default()
    cfg = load_config("demo", model=IndexConfig)
    make_demo(paths.demo)
    ingest("demo", paths, cfg)
    report = build_index(paths, cfg)
    assert 400 <= report.n_classes <= 600 and report.n_parents >= 150  # r3 under r2
    assert report.n_images > 11_500 and report.split_counts["train"] > 9_000
    rebuilt = build_index(paths, cfg.model_copy(update={"workers": 1}))
    assert rebuilt.fingerprint == report.fingerprint
