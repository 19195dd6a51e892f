"""Calibration on each image's candidate cells (`geoloc.infer.candidates`) gives the dense answer
when the candidates cover every class, and when the rest of the mass really is spread equally."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.labels import make_label_doc

from geoloc.geo import LabelSpace
from geoloc.infer import calibration as dense
from geoloc.infer.candidates import (
    TopCells,
    choose_conformal_top,
    conformal_scores_top,
    expected_distance_top,
    fit_scaling_top,
    fit_temperature_top,
    set_members_top,
    set_stats_top,
)
from geoloc.infer.radius import expected_distance_km

METHODS = [("lac", 0, 0.0), ("aps", 0, 0.0), ("raps", 2, 0.01), ("raps", 5, 0.1)]


def _probs(n: int, k: int, seed: int, zeros: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Peaked random distributions (some classes exactly 0, like hierarchical masking) and
    labels drawn from them."""
    rng = np.random.default_rng(seed)
    p = np.exp(rng.normal(size=(n, k)) * 2.5)
    p[:, :zeros] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


@pytest.mark.parametrize(("method", "k_reg", "penalty"), METHODS)
def test_candidates_covering_every_class_give_the_dense_scores_and_sets(
    method: str, k_reg: int, penalty: float
) -> None:
    p, y = _probs(400, 30, seed=1, zeros=6)
    top = TopCells.from_dense(p, None, 30)
    scores = dense.conformal_scores(p, y, method, k_reg, penalty)  # type: ignore[arg-type]
    assert np.array_equal(conformal_scores_top(top, y, method, k_reg, penalty), scores)  # type: ignore[arg-type]
    for q in (0.5, 0.9, 0.97):  # thresholds at a score: the boundary case
        thr = float(np.quantile(scores, q, method="higher"))
        member, tail_in = set_members_top(top, thr, method, k_reg, penalty)  # type: ignore[arg-type]
        assert np.array_equal(member, dense.conformal_sets(p, thr, method, k_reg, penalty))  # type: ignore[arg-type]
        assert not tail_in.any()


def test_candidates_covering_every_class_give_the_dense_calibration_and_conformal_choice() -> None:
    p, y = _probs(300, 25, seed=2, zeros=4)
    model, _ = _probs(300, 25, seed=3)
    top = TopCells.from_dense(p, model, 25)
    t_dense = dense.fit_temperature(dense.log_probs(p), y)
    assert fit_temperature_top(TopCells.from_dense(p, None, 25), y) == pytest.approx(t_dense)
    cal_dense, cal_top = dense.fit_scaling(p, y, model), fit_scaling_top(top, y)
    assert cal_top.smoothing == cal_dense.smoothing
    assert cal_top.temperature == pytest.approx(cal_dense.temperature, rel=1e-6)
    calibrated = top.calibrated(cal_dense)
    np.testing.assert_allclose(calibrated.p, cal_dense.apply(p, model), atol=1e-12)
    assert np.all(calibrated.tail == 0)
    probs = cal_dense.apply(p, model)
    chosen = choose_conformal_top(calibrated, y, 0.9)
    expected = dense.choose_conformal(probs, y, 0.9)
    assert (chosen.method, chosen.k_reg, chosen.penalty) == (
        expected.method, expected.k_reg, expected.penalty,
    )  # fmt: skip
    assert chosen.threshold == pytest.approx(expected.threshold, abs=1e-9)


def test_candidate_spread_is_the_dense_spread() -> None:
    rng = np.random.default_rng(4)
    grid = [(lat, lon) for lat in range(-50, 61, 15) for lon in range(-170, 171, 30)]
    ls = LabelSpace.from_dict(make_label_doc(grid, resolution=2, parent_resolution=1))
    k = ls.num_classes
    p, _ = _probs(50, k, seed=5)
    lat, lon = rng.uniform(-60, 60, 50), rng.uniform(-180, 180, 50)
    got = expected_distance_top(TopCells.from_dense(p, None, 70), lat, lon, ls, 64)
    np.testing.assert_allclose(got, expected_distance_km(p, lat, lon, ls, 64), rtol=1e-12)


@pytest.mark.parametrize(("method", "k_reg", "penalty"), METHODS)
def test_an_equally_shared_tail_gives_the_dense_sets(
    method: str, k_reg: int, penalty: float
) -> None:
    """With the mass outside the top m truly spread equally, the tail term is exact: set sizes
    and coverage match the dense sets (the tail cells join or leave together)."""
    rng = np.random.default_rng(6)
    n, k, m = 300, 200, 20
    head = np.exp(rng.normal(size=(n, m)) * 2)
    head = 0.5 / m + 0.5 * head / head.sum(axis=1, keepdims=True)  # each above a tail share
    tail_mass = rng.uniform(0.0, 0.3, n)
    head = head * (1 - tail_mass[:, None])
    p = np.repeat((tail_mass / (k - m))[:, None], k, axis=1)
    cols = np.argsort(rng.random((n, k)), axis=1)[:, :m]  # where each row's top cells sit
    np.put_along_axis(p, cols, head, axis=1)
    y = rng.integers(0, k, n)
    top = TopCells.from_dense(p, None, m)
    np.testing.assert_allclose(top.p.sum(axis=1) + top.tail, 1.0)
    if method != "raps":  # RAPS places a label in the tail last among equals (conservative)
        np.testing.assert_allclose(
            conformal_scores_top(top, y, method, k_reg, penalty),  # type: ignore[arg-type]
            dense.conformal_scores(p, y, method, k_reg, penalty),  # type: ignore[arg-type]
            atol=1e-12,
        )
    for thr in (0.3, 0.8, 0.95, 0.9999):
        member = dense.conformal_sets(p, thr, method, k_reg, penalty)  # type: ignore[arg-type]
        got, tail_in = set_members_top(top, thr, method, k_reg, penalty)  # type: ignore[arg-type]
        size = got.sum(axis=1) + tail_in
        if method == "raps":  # the tail's cells in the set are its first ones in any order
            np.testing.assert_array_equal(size, member.sum(axis=1))
            continue
        sets = dense.ConformalSets(method, 0.9, thr, n, k_reg, penalty)  # type: ignore[arg-type]
        covered, size = set_stats_top(top, sets, y)
        np.testing.assert_array_equal(size, member.sum(axis=1))
        np.testing.assert_array_equal(covered, member[np.arange(n), y])


def test_a_tail_keeps_the_distribution_whole_after_calibration() -> None:
    """Probabilities still sum to 1 with most classes left out, and a temperature above 1
    moves mass into the tail (the tail stands for many cells)."""
    p, y = _probs(200, 500, seed=7)
    model, _ = _probs(200, 500, seed=8)
    top = TopCells.from_dense(p, model, 64)
    for t, s in ((0.5, 0.0), (1.0, 0.3), (3.0, 0.1)):
        cal = top.calibrated(dense.Calibration(t, s))
        np.testing.assert_allclose(cal.p.sum(axis=1) + cal.tail, 1.0)
    hot = top.calibrated(dense.Calibration(3.0, 0.0)).tail
    assert np.all(hot >= top.tail - 1e-12)
    fitted = fit_scaling_top(top, y)
    assert 0 < fitted.temperature < 1e6 and fitted.smoothing in dense.SMOOTHING_GRID


def test_params_written_before_candidates_read_every_class_as_one() -> None:
    """A rerank_params.json without `calibration_cells` (older runs) keeps the dense answers:
    every class is a candidate, so predict's probabilities are the full calibrated ones."""
    from geoloc.infer.rerank import RerankParams, VariantOutput

    p, _ = _probs(5, 12, seed=9)
    params = RerankParams(log_prior=np.zeros(12), calibration={"base": dense.Calibration(1.7)})
    doc = params.to_dict()
    del doc["calibration_cells"]
    back = RerankParams.from_dict(doc)
    assert back.calibration_cells == 0
    v = VariantOutput(p, p.argmax(axis=1), np.zeros(5), np.zeros(5), np.zeros(5, dtype=bool))
    top = back.calibrated_top("base", v)
    np.testing.assert_allclose(top.p, back.calibrated("base", v), atol=1e-12)
    assert top.cells.shape == (5, 12)
