"""geoloc.compose: flow parameters -> config, stage cache keys, run digests (no Prefect)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from geoloc.compose import params as flow_params
from geoloc.compose import stage_cache
from geoloc.config import IndexConfig, flatten, load_config
from geoloc.errors import ConfigError
from geoloc.paths import DataPaths
from geoloc.presentation.digest import run_digest


def test_flat_params_land_on_their_config_keys() -> None:
    cfg = flow_params.run_config_from_params(
        "geosoft", {"epochs": 2, "lr": 1e-3, "hardneg": False, "tracking": False, "arch": None}
    )
    assert cfg.train.epochs == 2
    assert cfg.train.lr == 1e-3
    assert cfg.hardneg.enabled is False
    assert cfg.tracking.enabled is False
    # None keeps the preset's value
    assert cfg.model.arch == load_config("geosoft").model.arch
    assert cfg.train.loss == load_config("geosoft").train.loss == "geosoft_sparse"


def test_overrides_reach_any_key_and_conflicts_are_errors() -> None:
    cfg = flow_params.run_config_from_params(
        "ce", {"epochs": 3}, {"warmup_epochs": 1, "rerank.k_neighbors": 5}
    )
    assert (cfg.train.warmup_epochs, cfg.rerank.k_neighbors, cfg.train.loss) == (1, 5, "ce")
    with pytest.raises(ConfigError, match="train.epochs' is set twice"):
        flow_params.run_config_from_params("ce", {"epochs": 3}, {"train.epochs": 4})


@pytest.mark.parametrize(
    ("preset", "params", "overrides", "reason"),
    [
        ("geosoft", {"epochs": 0}, None, "train.epochs: Input should be greater than or equal"),
        ("geosoft", {}, {"no_such_key": 1}, "unknown config key 'no_such_key'"),
        ("nope", {}, None, "config file 'nope' does not exist"),
        ("geosoft", {"loss": "hinge"}, None, "train.loss"),
    ],
)
def test_bad_values_name_the_key(preset, params, overrides, reason) -> None:
    with pytest.raises(ConfigError, match=reason):
        flow_params.run_config_from_params(preset, params, overrides)


def test_a_whole_config_round_trips_through_overrides() -> None:
    """What `flows.train.train_fn` relies on to run any RunConfig as the `train` flow."""
    cfg = load_config("geosoft", {"epochs": 3, "tau_km": 250.0, "parent_run_id": "abc"})
    assert flow_params.run_config_from_params(None, {}, flatten(cfg)) == cfg


def test_train_flow_exposes_every_flat_parameter() -> None:
    from flows.train import train

    names = set(inspect.signature(train.fn).parameters)
    assert set(flow_params.TRAIN_PARAMS) <= names
    assert {"preset", "overrides"} <= names


def test_tree_fingerprint_follows_content(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    assert stage_cache.tree_fingerprint(folder) == "missing"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    first = stage_cache.tree_fingerprint(folder)
    assert stage_cache.tree_fingerprint(folder) == first
    (folder / "b.jpg").write_bytes(b"y")
    second = stage_cache.tree_fingerprint(folder)
    assert second != first
    os.utime(folder / "a.jpg", ns=(1, 1))
    assert stage_cache.tree_fingerprint(folder) != second


def test_index_key_changes_with_manifest_and_config(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path / "data")
    cfg = load_config("demo", model=IndexConfig)
    missing = stage_cache.index_key(paths, cfg)
    paths.processed.mkdir(parents=True)
    paths.processed_manifest.write_bytes(b"v1")
    v1 = stage_cache.index_key(paths, cfg)
    assert v1 != missing
    assert stage_cache.index_key(paths, cfg) == v1
    assert stage_cache.index_key(paths, cfg.model_copy(update={"min_images_per_class": 3})) != v1
    paths.processed_manifest.write_bytes(b"v2")
    assert stage_cache.index_key(paths, cfg) != v1
    # another data root never shares a cache entry
    other = DataPaths(tmp_path / "other")
    assert stage_cache.index_key(other, cfg) != stage_cache.index_key(paths, cfg)


def test_ingest_key_follows_the_demo_folder(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path / "data")
    cfg = IndexConfig()
    before = stage_cache.ingest_key("demo", paths, cfg, {})
    paths.demo.mkdir(parents=True)
    (paths.demo / "x.jpg").write_bytes(b"x")
    after = stage_cache.ingest_key("demo", paths, cfg, {})
    assert after != before
    assert stage_cache.ingest_key("demo", paths, cfg, {"limit": 3}) != after


@pytest.mark.parametrize("spec", ["s3://bucket/prefix", "mapillary:2.2,48.8,2.4,48.9"])
def test_remote_sources_are_never_cached(spec: str, tmp_path: Path) -> None:
    assert stage_cache.is_remote_source(spec)
    assert stage_cache.ingest_key(spec, DataPaths(tmp_path), IndexConfig(), {}) is None


def test_stage_outputs_present(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path / "data")
    assert not any(stage_cache.stage_outputs_present(s, paths) for s in ("demo", "ingest", "index"))
    paths.index.mkdir(parents=True)
    for p in (paths.images, paths.splits):
        p.write_bytes(b"")
    assert not stage_cache.stage_outputs_present("index", paths)
    paths.labels.write_text("{}")
    assert stage_cache.stage_outputs_present("index", paths)


def test_run_digest_reads_the_summary(fake_run: Path) -> None:
    digest = run_digest(fake_run)
    assert digest["run_id"] == fake_run.name
    assert digest["status"] == "completed"
    assert digest["metrics"]["best_val_acc"] is not None
    assert digest["run_id"] in digest["markdown"]
