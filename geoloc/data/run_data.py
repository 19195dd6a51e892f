"""The index as a training run opens it: one call checks it and returns the label space and splits.

`load_run_data(cfg, index_dir)` is the whole way from a run config into `data/`: the index is
checked, the label space read and matched to the model config, and the three splits opened with
the run's transforms (refusing settings a streamed train split cannot honour).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geoloc.config import RunConfig
from geoloc.data.dataset import (
    EmptySplitError,
    GeoDataset,
    build_transforms,
    check_index,
    index_files,
)
from geoloc.data.streaming import is_streamed
from geoloc.errors import ConfigError, DataError
from geoloc.geo import LabelSpace
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)


def resolve_index_dir(cfg: RunConfig) -> Path:
    """`cfg.index_dir`, or `$GEOLOC_DATA_DIR/index`."""
    return Path(cfg.index_dir).resolve() if cfg.index_dir else DataPaths.default().index


def check_label_space(cfg: RunConfig, label_space: LabelSpace, index_dir: Path) -> None:
    """The index must have what the model config needs: a parent level for the factorised
    head (parents strictly coarser than the classes)."""
    if cfg.model.head != "factorised":
        return
    res, parent = label_space.resolution, label_space.parent_resolution
    if parent >= res:
        raise ConfigError(
            f"model.head=factorised needs parent cells coarser than the classes, but the index "
            f"'{index_dir}' has parent_resolution {parent} and resolution {res}: rebuild it "
            f"with parent_resolution < resolution (e.g. {max(res - 1, 0)}), or set "
            "model.head=flat"
        )


@dataclass
class RunData:
    """The index as a run sees it: label space and the three splits (test may be absent)."""

    index_dir: Path
    label_space: LabelSpace
    train: GeoDataset
    val: GeoDataset
    test: GeoDataset | None


def load_run_data(cfg: RunConfig, index_dir: Path, progress: bool | None = None) -> RunData:
    """Check the index and open its splits; train and val must have images, test may not.

    `progress` is how their decode reports (`geoloc.progress.track`: bars or log lines)."""
    check_index(index_dir)
    label_space = LabelSpace.from_json(index_files(index_dir)["labels"])
    check_label_space(cfg, label_space, index_dir)  # before decoding any image
    train_tf = build_transforms(cfg.train, train=True)
    eval_tf = build_transforms(cfg.train, train=False)
    # with stored embeddings, pixels are decoded only while a split is embedded
    kw: dict[str, Any] = {"progress": progress, "cache_bytes": cfg.train.cache_mb << 20,
                          "shards_url": cfg.train.shards_url, "unreadable": "skip"}  # fmt: skip
    if cfg.train.embeddings == "cache":
        kw["cache"] = False
    train = GeoDataset(index_dir, "train", train_tf, **kw)
    if cfg.train.embeddings != "cache" and is_streamed(train):  # rows come in shard order
        if cfg.hardneg.enabled and cfg.hardneg.mode == "oversample":  # margin mode draws none
            raise _needs_random_access("hardneg.enabled", "hardneg.enabled=false", cfg, train)
        if cfg.train.sampling != "uniform":
            key = f"train.sampling={cfg.train.sampling}"
            raise _needs_random_access(key, "train.sampling=uniform", cfg, train)
    val = GeoDataset(index_dir, "val", eval_tf, **kw)
    try:
        test: GeoDataset | None = GeoDataset(index_dir, "test", eval_tf, **kw)
    except EmptySplitError as exc:
        log.warning("%s: no test metrics for this run", exc)
        test = None
    for ds in (train, val, test):
        if ds is None:
            continue
        bad = (ds.labels < 0) | (ds.labels >= label_space.num_classes)
        if bad.any():
            raise DataError(
                f"split '{ds.split}' of '{index_dir}' has labels outside 0.."
                f"{label_space.num_classes - 1}: splits.parquet and labels.json disagree"
            )
    return RunData(index_dir, label_space, train, val, test)


def _needs_random_access(key: str, fix: str, cfg: RunConfig, train: GeoDataset) -> ConfigError:
    """The one-line refusal of a setting that draws train rows at random on a streamed split."""
    return ConfigError(
        f"{key} needs random access to the train images, but split 'train' of "
        f"'{train.index_dir}' ({len(train):,} images, {train.decoded_bytes() / 2**20:,.0f} MiB "
        f"decoded) is streamed from its shards because it exceeds train.cache_mb="
        f"{cfg.train.cache_mb}: raise train.cache_mb above that or set {fix}"
    )
