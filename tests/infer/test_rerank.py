"""Rerank: val-only tuning, tail cuts that neighbours earn, refinement, the run-level command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.rerank_data import synthetic_task

from geoloc.config import RerankConfig
from geoloc.geo import LabelSpace
from geoloc.infer.evaluation import evaluate_rerank, variants_for
from geoloc.infer.ood import OOD_VARIANT
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.rerank import (
    VARIANTS,
    GateParams,
    Neighbours,
    RefineParams,
    RerankParams,
    apply_prior,
    class_log_prior,
    gated_rerank,
    min_risk_cells,
    neighbour_votes,
    refine_coordinates,
)
from geoloc.infer.tuning import TABLE_COLUMNS, GateGrid

SMALL_GRID = GateGrid(
    k=(5, 20), vote_temperature=(0.05, 1.0), weight=(0.5, 1.0), max_top1=(0.5, 1.01),
    require_disagreement=(False, True), decode=("argmax", "min_risk"),
)  # fmt: skip
CFG = RerankConfig(k_neighbors=5)


@pytest.fixture(scope="module")
def task() -> tuple[LabelSpace, dict[str, SplitOutputs]]:
    return synthetic_task(seed=0)


@pytest.fixture(scope="module")
def evaluated(task):  # type: ignore[no-untyped-def]
    ls, outs = task
    return evaluate_rerank(outs, ls, CFG, grid=SMALL_GRID, progress=False)


def _permuted(out: SplitOutputs, seed: int) -> SplitOutputs:
    """The same images with shuffled truth: labels and coordinates of other test images."""
    perm = np.random.default_rng(seed).permutation(len(out))
    return SplitOutputs(
        out.logits, out.parent_logits, out.embeddings, out.labels[perm], out.lat[perm],
        out.lon[perm], out.image_ids,
    )  # fmt: skip


def test_every_parameter_is_chosen_on_val_never_on_test(task, evaluated) -> None:  # type: ignore[no-untyped-def]
    ls, outs = task
    params, tables = evaluated
    shuffled = {**outs, "test": _permuted(outs["test"], seed=1)}
    params2, tables2 = evaluate_rerank(shuffled, ls, CFG, grid=SMALL_GRID, progress=False)
    assert params2.to_dict() == params.to_dict()
    pd.testing.assert_frame_equal(tables2["val"], tables["val"])
    assert not tables2["test"].equals(tables["test"]), "test numbers do depend on test labels"


def test_changing_val_labels_changes_the_choice(task, evaluated) -> None:  # type: ignore[no-untyped-def]
    ls, outs = task
    params, _ = evaluated
    shuffled = {**outs, "val": _permuted(outs["val"], seed=2)}
    params2, _ = evaluate_rerank(shuffled, ls, CFG, grid=SMALL_GRID, progress=False)
    assert params2.to_dict() != params.to_dict()


def test_tables_have_the_four_variants_and_the_contract_columns(evaluated) -> None:  # type: ignore[no-untyped-def]
    _, tables = evaluated
    for table in tables.values():
        assert list(table.columns) == list(TABLE_COLUMNS)
        assert list(table["variant"]) == [*VARIANTS, OOD_VARIANT]
        base = table.set_index("variant").loc["base"]
        assert base["gate_share"] == 0.0
        assert 0.0 <= table["gate_share"].max() <= 1.0


def test_gated_rerank_cuts_the_tail_neighbours_can_see(evaluated) -> None:  # type: ignore[no-untyped-def]
    params, tables = evaluated
    test = tables["test"].set_index("variant")
    assert test.loc["gated", "p90_km"] <= 0.9 * test.loc["base", "p90_km"]
    assert test.loc["gated", "median_km"] <= 1.02 * test.loc["base", "median_km"]
    assert test.loc["gated+refined", "median_km"] < test.loc["gated", "median_km"]
    assert params.best_variant in VARIANTS and params.best_variant != "base"


def test_min_risk_decodes_the_calibrated_gated_distribution(task, evaluated) -> None:  # type: ignore[no-untyped-def]
    ls, outs = task
    params, tables = evaluated
    assert params.min_risk_candidates in (2, 3, 5, 10, 20, 50)
    variants = variants_for(outs["test"], outs["train"].to_gallery(), ls, params)
    calibrated = params.calibrated("gated", variants["gated"])
    expected = min_risk_cells(calibrated, ls, params.min_risk_candidates)
    np.testing.assert_array_equal(variants["min_risk"].pred, expected)
    # the same calibrated distribution: its sets and radius are fitted like any variant's
    assert params.calibration["min_risk"] == params.calibration["gated"]
    assert params.calibration["gated"].smoothing > 0, "votes are never calibrated unmixed"
    assert "min_risk" in params.radius and "min_risk" in params.conformal


def test_radius_and_sets_hold_their_coverage_on_exchangeable_val_and_test(evaluated) -> None:  # type: ignore[no-untyped-def]
    params, tables = evaluated
    test = tables["test"].set_index("variant")
    for variant in VARIANTS:
        assert 0.84 <= test.loc[variant, "radius_coverage"] <= 0.97, variant
        assert test.loc[variant, "radius_median_km"] > 0
        assert 0.84 <= test.loc[variant, "coverage"] <= 1.0, variant
    # the reranked answers are sharper, so their radius is smaller than the model's alone
    assert test.loc["gated+refined", "radius_median_km"] < test.loc["base", "radius_median_km"]


def test_a_closed_gate_changes_nothing(task) -> None:  # type: ignore[no-untyped-def]
    ls, outs = task
    probs = outs["val"].logits.astype(np.float64)
    nbrs = Neighbours.search(outs["train"].to_gallery(), outs["val"].embeddings, 5, "brute")
    votes = neighbour_votes(nbrs, ls.num_classes, 5, 0.1)
    scores, pred, gate = gated_rerank(probs, votes, GateParams(max_top1=0.0), ls)
    np.testing.assert_array_equal(scores, probs)
    np.testing.assert_array_equal(pred, probs.argmax(axis=1))
    assert not gate.any()


def test_votes_are_a_distribution_over_neighbour_cells() -> None:
    nbrs = Neighbours(
        sims=np.array([[0.9, 0.8, 0.1]], np.float32),
        labels=np.array([[2, 2, 0]]),
        lat=np.zeros((1, 3)),
        lon=np.zeros((1, 3)),
    )
    votes = neighbour_votes(nbrs, num_classes=4, k=3, temperature=1.0)
    assert votes.sum() == pytest.approx(1.0)
    assert votes[0, 2] > votes[0, 0] > 0 and votes[0, 1] == votes[0, 3] == 0
    sharp = neighbour_votes(nbrs, num_classes=4, k=3, temperature=0.01)
    assert sharp[0, 2] > votes[0, 2]


def test_min_risk_picks_the_cell_closest_to_the_mass(task) -> None:  # type: ignore[no-untyped-def]
    ls, _ = task
    probs = np.zeros((1, ls.num_classes))
    # three close-together cells share 0.6, a far one holds 0.4: argmax is the far one
    near = [0, 5, 8]  # Paris, Moscow, Cairo
    far = 3  # Sydney
    probs[0, near] = 0.2
    probs[0, far] = 0.4
    assert probs.argmax() == far
    assert min_risk_cells(probs, ls, candidates=4)[0] in near


def test_prior_prefers_frequent_cells_and_renormalises(task) -> None:  # type: ignore[no-untyped-def]
    ls, _ = task
    counts = np.arange(ls.num_classes)
    ls2 = LabelSpace(**{**ls.__dict__, "train_counts": counts, "_children": [], "_lookup": {}})
    lp = class_log_prior(ls2, alpha=1.0)
    probs = np.full((1, ls.num_classes), 1.0 / ls.num_classes)
    out = apply_prior(probs, lp)
    assert out.sum() == pytest.approx(1.0)
    assert out.argmax() == ls.num_classes - 1
    land = np.ones(ls.num_classes)
    land[-1] = 0.0  # the frequent cell is all water
    assert apply_prior(probs, class_log_prior(ls2, 1.0, land)).argmax() != ls.num_classes - 1


def test_refinement_falls_back_to_the_centroid_without_an_in_cell_neighbour(task) -> None:  # type: ignore[no-untyped-def]
    ls, _ = task
    pred = np.array([0, 1])
    nbrs = Neighbours(
        sims=np.array([[0.9, 0.8], [0.9, 0.8]], np.float32),
        labels=np.array([[3, 4], [1, 2]]),  # row 0: nobody in cell 0; row 1: one in cell 1
        lat=np.array([[10.0, 11.0], [50.0, 12.0]]),
        lon=np.array([[20.0, 21.0], [40.0, 22.0]]),
    )
    for method in ("mean", "medoid"):
        lat, lon, refined = refine_coordinates(pred, nbrs, ls, RefineParams(method, k=2))
        assert (lat[0], lon[0]) == (ls.lat[0], ls.lon[0])
        assert lat[1] == pytest.approx(50.0) and lon[1] == pytest.approx(40.0)
        np.testing.assert_array_equal(refined, [False, True])
    lat, lon, refined = refine_coordinates(pred, nbrs, ls, RefineParams("none"))
    np.testing.assert_array_equal(lat, ls.lat[pred])
    assert not refined.any()


def test_refined_mean_lies_between_in_cell_neighbours(task) -> None:  # type: ignore[no-untyped-def]
    ls, _ = task
    nbrs = Neighbours(
        sims=np.array([[0.9, 0.9, 0.9]], np.float32),
        labels=np.array([[0, 0, 1]]),
        lat=np.array([[10.0, 12.0, -40.0]]),
        lon=np.array([[179.0, -179.0, 0.0]]),  # across the antimeridian
    )
    lat, lon, _ = refine_coordinates(np.array([0]), nbrs, ls, RefineParams("mean", k=3))
    assert lat[0] == pytest.approx(11.0, abs=0.05)
    assert abs(abs(lon[0]) - 180.0) < 0.05


def test_params_round_trip_through_json(evaluated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    params, _ = evaluated
    params.save(tmp_path / "p.json")
    back = RerankParams.load(tmp_path / "p.json")
    assert back.to_dict() == params.to_dict()
    assert json.loads((tmp_path / "p.json").read_text())["best_variant"] == params.best_variant
    assert set(back.conformal) == set(VARIANTS) == set(back.temperatures)


# --------------------------------------------------------------------------------------------
# The run-level command on a tiny trained run
# --------------------------------------------------------------------------------------------


def test_geoloc_rerank_writes_the_table_params_gallery_and_summary(reranked_run: Path) -> None:
    from geoloc.runfolder.layout import RunPaths
    from geoloc.runfolder.summary import read_summary

    paths = RunPaths(reranked_run)
    table = pd.read_csv(paths.rerank_eval)
    assert list(table["variant"]) == [*VARIANTS, OOD_VARIANT]
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table[["median_km", "p90_km", "top1", "coverage", "set_size"]].notna().all().all()
    val_variants = list(pd.read_csv(paths.tables / "rerank_eval_val.csv")["variant"])
    assert val_variants == [*VARIANTS, OOD_VARIANT]
    summary = read_summary(reranked_run)
    best = summary["rerank"]["variant"]
    assert best in VARIANTS
    row = table.set_index("variant").loc[OOD_VARIANT]  # the chosen variant + the OOD step
    assert summary["rerank"]["metrics"]["p90_km"] == pytest.approx(row["p90_km"], rel=1e-5)
    assert summary["artifacts"]["rerank_eval"] is True
    params = RerankParams.load(paths.data / "rerank_params.json")
    assert params.best_variant == best
    assert (paths.data / "gallery.npz").is_file()
    metrics = summary["rerank"]["metrics"]
    assert 0.0 <= metrics["radius_coverage"] <= 1.0 and metrics["radius_median_km"] > 0
    answers = pd.read_parquet(paths.rerank_test_predictions)
    assert len(answers) == summary["dataset"].get("test_images", len(answers))
    assert (answers["variant"] == best).all()
    assert answers["within_radius"].mean() == pytest.approx(metrics["radius_coverage"])
    assert np.median(answers["radius_km"]) == pytest.approx(metrics["radius_median_km"])


def test_rerank_params_written_before_radii_still_load(evaluated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    params, _ = evaluated
    old = params.to_dict()
    for key in ("calibration", "radius", "min_risk_candidates"):
        old.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = RerankParams.load(tmp_path / "old.json")
    assert back.temperatures == params.temperatures and back.radius == {}
    assert all(c.smoothing == 0.0 for c in back.calibration.values())


def test_base_row_matches_the_test_metrics_training_recorded(reranked_run: Path) -> None:
    from geoloc.runfolder.layout import RunPaths
    from geoloc.runfolder.summary import read_summary

    base = pd.read_csv(RunPaths(reranked_run).rerank_eval).set_index("variant").loc["base"]
    test = read_summary(reranked_run)["test"]
    assert base["median_km"] == pytest.approx(test["test_median_km"], rel=1e-3)
    assert base["top1"] == pytest.approx(test["test_top1"], abs=1e-6)


def test_rerank_reuses_cached_outputs(reranked_run: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import geoloc.infer.outputs as outputs
    from geoloc.infer.evaluation import rerank_run

    run_dir = tmp_path / "run"
    shutil.copytree(reranked_run, run_dir)

    def no_model(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("cached outputs should have been used")

    monkeypatch.setattr(outputs, "compute_outputs", no_model)
    result = rerank_run(run_dir, grid=SMALL_GRID, progress=False)
    assert list(result.test_table["variant"]) == [*VARIANTS, OOD_VARIANT]


def test_a_val_larger_than_the_tuning_sample_is_run_and_cached_for_the_sample_only(
    reranked_run: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import geoloc.infer.outputs as outputs
    from geoloc.data.run_data import resolve_index_dir
    from geoloc.infer.evaluation import rerank_run, split_sample
    from geoloc.infer.trained import load_trained
    from geoloc.runfolder.layout import RunPaths

    run_dir = tmp_path / "run"
    shutil.copytree(reranked_run, run_dir)
    paths = RunPaths(run_dir)
    cfg = load_trained(run_dir, "best").config
    full = SplitOutputs.load(paths.outputs("val"), _cache_key(paths), heads=True)
    assert full is not None and len(full) > 30
    # the tiny run's val has 60 images: a 30-image sample (below the config's floor of 100)
    small = cfg.rerank.model_copy(update={"tune_images": 30})
    rows = split_sample(resolve_index_dir(cfg), "val", 30)
    assert rows is not None and len(rows) == 30
    result = rerank_run(run_dir, cfg=small, grid=SMALL_GRID, progress=False)
    cached = np.load(paths.outputs("val"))
    assert cached["image_ids"].tolist() == full.image_ids[rows].tolist()
    assert result.val_table[["median_km", "coverage"]].notna().all().all()

    computed: list[int] = []
    real = outputs.compute_outputs

    def counting(model, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        computed.append(len(dataset.labels))
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(outputs, "compute_outputs", counting)
    rerank_run(run_dir, cfg=small, grid=SMALL_GRID, progress=False)  # resumes from its cache
    assert computed == []
    rerank_run(run_dir, grid=SMALL_GRID, progress=False)  # all of val: the sample is no cache
    assert computed == [len(full)]


def test_a_gallery_sample_is_the_gallery_rerank_searches_and_predict_loads(
    reranked_run: Path, tmp_path: Path
) -> None:
    import shutil

    from geoloc.data.dataset import read_split_table
    from geoloc.data.run_data import resolve_index_dir
    from geoloc.infer.evaluation import rerank_run, split_sample
    from geoloc.infer.gallery import Gallery
    from geoloc.infer.trained import load_trained
    from geoloc.runfolder.layout import RunPaths

    run_dir = tmp_path / "run"
    shutil.copytree(reranked_run, run_dir)
    cfg = load_trained(run_dir, "best").config
    train = read_split_table(resolve_index_dir(cfg), "train")
    rows = split_sample(resolve_index_dir(cfg), "train", 200)
    assert rows is not None and len(train) > 200
    capped = cfg.rerank.model_copy(update={"gallery_images": 200})
    result = rerank_run(run_dir, cfg=capped, grid=SMALL_GRID, progress=False)
    gallery = Gallery.load(RunPaths(run_dir).gallery)
    assert gallery.image_ids.tolist() == train["image_id"].astype(str).iloc[rows].tolist()
    assert result.test_table[["median_km", "coverage"]].notna().all().all()
    full = rerank_run(run_dir, grid=SMALL_GRID, progress=False)  # 0: all of train again
    assert len(Gallery.load(RunPaths(run_dir).gallery)) == len(train)
    assert full.test_table["variant"].tolist() == result.test_table["variant"].tolist()


def _cache_key(paths) -> str:  # type: ignore[no-untyped-def]
    return str(np.load(paths.outputs("test"))["key"])


def test_cli_overrides_merge_into_the_runs_rerank_section(reranked_run: Path) -> None:
    from geoloc.cli import main
    from geoloc.cli.rerank import _rerank_config
    from geoloc.errors import ConfigError

    assert _rerank_config(reranked_run, []) is None
    cfg = _rerank_config(reranked_run, ["k_neighbors=7", "rerank.coverage=0.8"])
    assert (cfg.k_neighbors, cfg.coverage) == (7, 0.8)
    assert cfg.prior_alpha == RerankConfig().prior_alpha
    with pytest.raises(ConfigError, match="unknown config key"):
        _rerank_config(reranked_run, ["nope=1"])
    assert main(["rerank", str(reranked_run / "missing")]) == 1
