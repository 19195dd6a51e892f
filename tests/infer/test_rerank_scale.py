"""Rerank at scale: blocks and samples bound the work without changing what a user reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
from fixtures.rerank_data import synthetic_task

from geoloc.config import RerankConfig
from geoloc.infer.evaluation import (
    evaluate_rerank,
    search_split,
    split_evaluation,
    variants_for,
)
from geoloc.infer.rerank import Neighbours
from geoloc.infer.tuning import GateGrid, evaluation_table, stratified_sample

GRID = GateGrid(k=(5, 20), vote_temperature=(0.05,), weight=(0.5, 1.0), max_top1=(0.5, 1.01))


def test_split_tables_in_blocks_equal_the_whole_split_table() -> None:
    ls, outs = synthetic_task(seed=3)
    params, _ = evaluate_rerank(outs, ls, RerankConfig(k_neighbors=5), grid=GRID, progress=False)
    gallery = outs["train"].to_gallery()
    test = outs["test"]
    whole = evaluation_table(variants_for(test, gallery, ls, params), test, params, ls)
    blocks, answers = split_evaluation(test, gallery, ls, params, "test", answers_of="gated",
                                       progress=False, block=37)  # fmt: skip
    pd.testing.assert_frame_equal(blocks, whole)
    assert answers is not None and len(answers) == len(test)
    assert answers["image_id"].tolist() == test.image_ids.tolist()


def test_a_split_searched_in_batches_finds_the_neighbours_of_one_search() -> None:
    _, outs = synthetic_task(seed=6)
    gallery, queries = outs["train"].to_gallery(), outs["test"].embeddings
    one = Neighbours.search(gallery, queries, 20)
    batched = search_split(gallery, queries, 20, "auto", "test", progress=False, batch=7)
    for name in ("sims", "labels", "lat", "lon"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(one, name))
    empty = search_split(gallery, queries[:0], 20, "auto", "test", progress=False)
    assert len(empty) == 0 and empty.k == 20


def test_stratified_sample_keeps_every_class_share_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(50, size=20_000, p=np.linspace(1, 10, 50) / np.linspace(1, 10, 50).sum())
    rows = stratified_sample(labels, 2_000)
    assert len(rows) == len(set(rows.tolist())) == 2_000
    np.testing.assert_array_equal(rows, stratified_sample(labels, 2_000))
    full = np.bincount(labels, minlength=50) / labels.size
    sample = np.bincount(labels[rows], minlength=50) / rows.size
    assert np.abs(sample - full).max() <= 1.0 / 2_000 + 1e-12  # each class within one row
    np.testing.assert_array_equal(stratified_sample(labels[:500], 2_000), np.arange(500))


def test_val_outputs_of_the_tuning_sample_only_give_the_same_choices_and_tables() -> None:
    # rerank runs the model over the tuning sample only when val is larger: what it chooses and
    # reports must be what the pass over all of val gave
    ls, outs = synthetic_task(seed=5, n_val=600)
    cfg = RerankConfig(k_neighbors=5, tune_images=250, calibration_images=120)
    whole_params, whole = evaluate_rerank(outs, ls, cfg, grid=GRID, progress=False)
    rows = stratified_sample(outs["val"].labels, cfg.tune_images)
    sampled = {**outs, "val": outs["val"].subset(rows)}
    params, tables = evaluate_rerank(sampled, ls, cfg, grid=GRID, progress=False)
    assert params.to_dict() == whole_params.to_dict()
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(tables[split], whole[split])


def test_tuning_on_a_sample_of_val_keeps_the_tables_complete() -> None:
    ls, outs = synthetic_task(seed=4, n_val=600)
    cfg = RerankConfig(k_neighbors=5, tune_images=300, calibration_images=150)
    params, tables = evaluate_rerank(outs, ls, cfg, grid=GRID, progress=False)
    assert next(iter(params.conformal.values())).n_calibration == 150
    for table in tables.values():
        assert table[["median_km", "coverage", "radius_coverage"]].notna().all().all()
