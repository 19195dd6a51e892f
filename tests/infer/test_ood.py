"""Honest off the map: the OOD score, the radius and sets that widen with it, the hedged answer."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.rerank_data import synthetic_task
from PIL import Image

from geoloc.config import RerankConfig
from geoloc.data.imagestore import ImageLocations
from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.candidates import set_members_top
from geoloc.infer.evaluation import evaluate_rerank, variants_for
from geoloc.infer.gallery import l2_normalize
from geoloc.infer.land_prior import land_cdf, land_points
from geoloc.infer.ood import (
    NORM_LEVELS,
    OOD_VARIANT,
    OodModel,
    auroc,
    knn_distance,
    ood_for,
    widened_members,
    widened_radius_km,
)
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.predict import Predictor
from geoloc.infer.rerank import Neighbours
from geoloc.infer.tuning import GateGrid
from geoloc.paths import DataPaths

GRID = GateGrid(k=(5,), vote_temperature=(0.05,), weight=(0.5, 1.0), max_top1=(1.01,),
                require_disagreement=(False,), decode=("argmax",))  # fmt: skip
CFG = RerankConfig(k_neighbors=5)


@pytest.fixture(scope="module")
def evaluated():  # type: ignore[no-untyped-def]
    ls, outs = synthetic_task(seed=0, n_val=400, n_test=400)
    params, tables = evaluate_rerank(outs, ls, CFG, grid=GRID, progress=False)
    return ls, outs, params, tables


def _off_the_map(ls: LabelSpace, n: int, dim: int, seed: int) -> SplitOutputs:
    """Photos unlike every gallery photo (random embeddings), anywhere on land, with confident
    logits for an arbitrary cell: the confident falsehood the OOD step must catch."""
    rng = np.random.default_rng(seed)
    lat, lon = land_points(n, seed=seed + 1)
    logits = rng.standard_normal((n, ls.num_classes))
    logits[np.arange(n), rng.integers(0, ls.num_classes, n)] += 5.0
    near = haversine_km(lat[:, None], lon[:, None], ls.lat, ls.lon).argmin(axis=1)
    emb = l2_normalize(rng.standard_normal((n, dim)))
    ids = np.array([f"o{i}" for i in range(n)])
    return SplitOutputs(logits=logits.astype(np.float32), parent_logits=None, embeddings=emb,
                        labels=near, lat=lat, lon=lon, image_ids=ids)  # fmt: skip


def test_auroc_is_the_chance_an_outside_score_beats_an_inside_one() -> None:
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.1, 0.5]), np.array([0.5, 0.5])) == pytest.approx(0.75)


def test_the_ood_step_keeps_val_like_test_photos_calibrated(evaluated) -> None:  # type: ignore[no-untyped-def]
    _, _, params, tables = evaluated
    assert params.ood is not None and 0.0 < params.ood.level <= 1.0
    for split in ("val", "test"):
        row = tables[split].set_index("variant").loc[OOD_VARIANT]
        assert 0.85 <= row["radius_coverage"] <= 0.96, split
        assert row["coverage"] >= 0.85, split
    test = tables["test"].set_index("variant")
    # the widened photos (30% of val-like ones) cover more, so the others' radii may shrink
    best = params.best_variant
    assert test.loc[OOD_VARIANT, "radius_median_km"] <= 1.1 * test.loc[best, "radius_median_km"]


def test_photos_off_the_map_score_higher_are_flagged_and_get_wide_radii(evaluated) -> None:  # type: ignore[no-untyped-def]
    ls, outs, params, _ = evaluated
    gallery = outs["train"].to_gallery()
    shifted = _off_the_map(ls, 300, outs["test"].embeddings.shape[1], seed=3)
    sides = {}
    for name, out in (("test", outs["test"]), ("shift", shifted)):
        v = variants_for(out, gallery, ls, params)
        ans = ood_for(params, params.best_variant, v[params.best_variant], v["gated"].nbrs, ls)
        assert ans is not None
        err = haversine_km(out.lat, out.lon, ans.lat, ans.lon)
        sides[name] = (ans, err)
    test, shift = sides["test"][0], sides["shift"][0]
    assert auroc(test.score, shift.score) >= 0.95
    assert shift.flag.mean() >= 0.9 and test.flag.mean() <= 0.15
    assert shift.widened.mean() >= 0.9 and test.widened.mean() <= 0.45
    assert np.median(shift.radius_km) >= 5 * np.median(test.radius_km)
    assert np.median(shift.radius_km) >= 2000.0, "a continent-scale radius, not a city's"
    # the widened radius holds truths drawn from anywhere on land
    assert np.mean(sides["shift"][1] <= shift.radius_km) >= 0.85


def test_a_widened_photos_set_holds_the_land_cells_and_only_widened_sets_grow(evaluated) -> None:  # type: ignore[no-untyped-def]
    ls, outs, params, _ = evaluated
    gallery = outs["train"].to_gallery()
    shifted = _off_the_map(ls, 200, outs["test"].embeddings.shape[1], seed=5)
    name, sets = params.best_variant, params.conformal[params.best_variant]
    assert params.ood is not None and 0 < len(params.ood.land) < ls.num_classes
    for out in (outs["test"], shifted):
        v = variants_for(out, gallery, ls, params)[name]
        top = params.calibrated_top(name, v)
        ans = ood_for(params, name, v, v.nbrs, ls, cal=top)
        assert ans is not None
        member, _ = widened_members(top, sets, ans)
        base = set_members_top(top, sets.threshold, sets.method, sets.k_reg, sets.penalty)[0]
        rows = np.arange(len(out))[:, None]
        assert member[rows, top.cells][base].all(), "the conformal set stays inside"
        land = np.zeros(ls.num_classes, dtype=bool)
        land[list(params.ood.land)] = True
        assert (member[ans.widened] >= land).all(), "a widened set holds every land cell"
        narrow = member[~ans.widened].sum(axis=1)
        assert (narrow <= base[~ans.widened].sum(axis=1)).all(), "other sets do not grow"
    # truths uniform over land fall in a widened set (nearly all of the shift is widened)
    assert member[np.arange(len(shifted)), shifted.labels].mean() >= 0.8


def test_the_radius_never_shrinks_as_the_score_grows() -> None:
    norm = tuple(float(x) for x in np.quantile(np.random.default_rng(0).exponential(1, 500),
                                               NORM_LEVELS))  # fmt: skip
    model = OodModel(centres=(0.0, 0.0, 0.0), spreads=(1.0, 1.0, 1.0), threshold=0.9,
                     flag_quantile=0.95, lost_km=2500.0, lost_a=-6.0, lost_b=6.0, level=0.9,
                     coverage=0.9, norm_quantiles=norm, widen_threshold=1.0,
                     widen_quantile=0.7)  # fmt: skip
    scores = np.linspace(-1.0, 1.2, 40)
    lat, lon = np.full(40, 48.86), np.full(40, 2.35)
    wide = model.widen(scores)
    radius = widened_radius_km(model, model.lost(scores), np.full(40, 100.0), lat, lon, wide)
    assert np.all(np.diff(radius) >= -1e-6)
    assert radius[0] < 400 and radius[-1] > 5000
    # a widened photo's radius holds `coverage` of the land even where val's level is lower
    low = replace(model, level=0.6)
    radius = widened_radius_km(low, low.lost(scores), np.full(40, 100.0), lat, lon, wide)
    held = land_cdf(lat[wide], lon[wide], radius[wide, None])[:, 0]
    assert wide.any() and (held >= 0.9 - 1e-3).all()
    assert np.all(np.diff(radius) >= -1e-6)


def test_knn_distance_is_smaller_for_photos_near_the_gallery() -> None:
    sims = np.array([[0.99, 0.98, 0.97], [0.2, 0.1, 0.0]], dtype=np.float32)
    nbrs = Neighbours(sims, np.zeros((2, 3), np.int64), np.zeros((2, 3)), np.zeros((2, 3)))
    d = knn_distance(nbrs, k=3)
    assert d[0] == pytest.approx(0.02) and d[1] == pytest.approx(0.9)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_blank_single_colour_and_noise_photos_are_flagged_with_a_continent_scale_radius(
    reranked_run: Path, demo_index: DataPaths
) -> None:
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    stored = ImageLocations(manifest.reset_index(drop=True), demo_index.root)
    real = [stored.read(i) for i in range(40)]
    rng = np.random.default_rng(0)
    bad = {
        "blank": _png(np.full((64, 64, 3), 255)),
        "black": _png(np.zeros((64, 64, 3))),
        "red": _png(np.tile([200, 20, 20], (64, 64, 1))),
        "noise": _png(rng.integers(0, 256, (64, 64, 3))),
    }
    predictor = Predictor(reranked_run)
    table = predictor.predict_images([*real, *bad.values()], [*map(str, range(40)), *bad])
    real_rows, bad_rows = table.iloc[:40], table.iloc[40:]
    assert bad_rows["ood_flag"].all(), bad_rows[["path", "ood_score"]]
    # the score stays the model's own view (a tiny model may embed noise near gallery photos);
    # the flag and the radius do not depend on it
    assert bad_rows["ood_score"].notna().all()
    assert (bad_rows["radius_km"] >= 2000.0).all(), bad_rows[["path", "radius_km"]]
    assert real_rows["ood_flag"].mean() <= 0.25


def test_an_ood_model_saved_by_another_version_is_ignored_not_misread(evaluated) -> None:  # type: ignore[no-untyped-def]
    from geoloc.infer.rerank import RerankParams

    _, _, params, _ = evaluated
    saved = params.to_dict()
    assert RerankParams.from_dict(saved).ood == params.ood
    saved["ood"] = {**saved["ood"], "version": 0}
    assert RerankParams.from_dict(saved).ood is None, "an old OOD block falls back to no OOD step"
    saved.pop("ood")
    assert RerankParams.from_dict(saved).ood is None, "params written before the OOD step load"


def test_the_predict_table_says_in_words_whether_a_photo_is_like_the_training_photos() -> None:
    from geoloc.cli.rerank import ood_words

    assert "unlike training photos" in ood_words(6.2, True)
    assert ood_words(-0.3, False).startswith("like training photos")
    assert ood_words(None, None) == "-" and ood_words(float("nan"), False) == "-"
