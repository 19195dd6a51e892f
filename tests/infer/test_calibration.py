"""Temperature scaling and conformal sets on synthetic data with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geoloc.errors import GeolocError
from geoloc.infer.calibration import (
    Calibration,
    ConformalSets,
    apply_temperature,
    calibration_metrics,
    choose_conformal,
    conformal_scores,
    conformal_sets,
    conformal_threshold,
    fit_conformal,
    fit_scaling,
    fit_temperature,
    log_probs,
    top1_ece,
)


def calibrated_task(n: int, k: int, sharpness: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model.

    Higher `sharpness` means a more confident (better) model on an easier task.
    """
    rng = np.random.default_rng(seed)
    logits = sharpness * rng.standard_normal((n, k))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece() -> None:
    logits, labels = calibrated_task(4000, 20, sharpness=1.5, seed=0)
    overconfident = 3.0 * logits
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    before = top1_ece(apply_temperature(overconfident, 1.0), labels)
    after = top1_ece(apply_temperature(overconfident, t), labels)
    assert after < 0.5 * before
    # scaling never changes the predicted cell
    assert np.array_equal(
        apply_temperature(overconfident, t).argmax(1), overconfident.argmax(axis=1)
    )


def test_temperature_of_log_probabilities_equals_that_of_logits() -> None:
    logits, labels = calibrated_task(1000, 8, sharpness=2.0, seed=1)
    probs = apply_temperature(2.0 * logits, 1.0)
    assert fit_temperature(log_probs(probs), labels) == pytest.approx(
        fit_temperature(2.0 * logits, labels), rel=1e-3
    )


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_conformal_sets_reach_the_coverage_on_exchangeable_data(
    method: str, coverage: float
) -> None:
    logits, labels = calibrated_task(6000, 30, sharpness=1.5, seed=2)
    probs = apply_temperature(logits, 1.0)
    cal, test = slice(0, 3000), slice(3000, 6000)
    sets = fit_conformal(probs[cal], labels[cal], coverage, method, 2, 0.01)  # type: ignore[arg-type]
    result = sets.evaluate(probs[test], labels[test])
    assert result["coverage"] >= coverage - 0.02
    assert result["coverage"] <= coverage + 0.05, "not trivially full sets"
    assert 1.0 <= result["set_size"] < 30


def test_a_better_model_gets_smaller_sets_at_the_same_coverage() -> None:
    sizes = []
    for sharpness in (0.8, 2.0, 4.0):
        logits, labels = calibrated_task(4000, 30, sharpness=sharpness, seed=3)
        probs = apply_temperature(logits, 1.0)
        sets = fit_conformal(probs[:2000], labels[:2000], 0.9)
        sizes.append(sets.evaluate(probs[2000:], labels[2000:])["set_size"])
    assert sizes[0] > sizes[1] > sizes[2]


def test_lac_sets_are_no_larger_than_aps_sets_on_average() -> None:
    logits, labels = calibrated_task(4000, 30, sharpness=1.5, seed=4)
    probs = apply_temperature(logits, 1.0)
    size = {
        m: fit_conformal(probs[:2000], labels[:2000], 0.9, m).evaluate(  # type: ignore[arg-type]
            probs[2000:], labels[2000:]
        )["set_size"]
        for m in ("lac", "aps")
    }
    assert size["lac"] <= size["aps"]


def test_sets_contain_the_true_label_exactly_when_its_score_is_under_the_threshold() -> None:
    logits, labels = calibrated_task(500, 10, sharpness=1.0, seed=5)
    probs = apply_temperature(logits, 1.0)
    for method in ("lac", "aps", "raps"):
        thr = 0.7
        member = conformal_sets(probs, thr, method, 2, 0.05)  # type: ignore[arg-type]
        scores = conformal_scores(probs, labels, method, 2, 0.05)  # type: ignore[arg-type]
        top1 = probs.argmax(axis=1) == labels
        inside = member[np.arange(500), labels]
        np.testing.assert_array_equal(inside, (scores <= thr) | top1)


def test_too_few_calibration_images_give_full_sets_and_round_trip() -> None:
    probs = np.full((3, 4), 0.25)
    thr = conformal_threshold(probs, np.array([0, 1, 2]), coverage=0.9)
    assert math.isinf(thr)
    sets = ConformalSets("lac", 0.9, thr, 3)
    assert sets.sets(probs).all()
    assert ConformalSets.from_dict(sets.to_dict()) == sets
    with pytest.raises(GeolocError, match="coverage"):
        conformal_threshold(probs, np.array([0, 1, 2]), coverage=1.0)


def test_calibration_metrics_fit_on_val_and_report_test_columns() -> None:
    logits, labels = calibrated_task(3000, 15, sharpness=1.5, seed=6)
    cols, t, sets = calibration_metrics(
        3 * logits[:1500], labels[:1500], 3 * logits[1500:], labels[1500:], coverage=0.9
    )
    assert set(cols) == {"ece", "ece_calibrated", "temperature", "coverage", "set_size"}
    assert cols["ece_calibrated"] < cols["ece"]
    assert cols["temperature"] == t > 1.5
    assert cols["coverage"] >= 0.88
    assert sets.coverage == 0.9


def test_top_label_temperature_survives_hard_zeros_that_mislead_nll() -> None:
    # a sharp, well-ranked model whose scores zero out a few true classes (masked parents)
    logits, labels = calibrated_task(2000, 20, sharpness=2.0, seed=7)
    z = log_probs(apply_temperature(logits, 1.0))
    masked = np.random.default_rng(0).random(2000) < 0.05
    z[masked, labels[masked]] = np.log(1e-12)
    t_nll = fit_temperature(z, labels, "nll")
    t_top = fit_temperature(z, labels, "top_label")
    assert t_nll > 1.3, "NLL softens everything to reach the zeroed classes"
    assert top1_ece(apply_temperature(z, t_top), labels) < top1_ece(
        apply_temperature(z, t_nll), labels
    )
    with pytest.raises(GeolocError, match="objective"):
        fit_temperature(z, labels, "brier")  # type: ignore[arg-type]


def test_the_raps_penalty_keeps_sets_small_where_aps_grows_through_a_flat_tail() -> None:
    logits, labels = calibrated_task(4000, 100, sharpness=1.0, seed=8)
    probs = apply_temperature(logits, 1.0)
    cal, test = slice(0, 2000), slice(2000, 4000)
    aps = fit_conformal(probs[cal], labels[cal], 0.9, "aps").evaluate(probs[test], labels[test])
    raps = fit_conformal(probs[cal], labels[cal], 0.9, "raps", 2, 0.02).evaluate(
        probs[test], labels[test]
    )
    assert raps["set_size"] < aps["set_size"]
    assert raps["coverage"] >= 0.88
    chosen = choose_conformal(probs[cal], labels[cal], 0.9)
    assert chosen.n_calibration == 2000 and chosen.coverage == 0.9
    assert chosen.evaluate(probs[test], labels[test])["coverage"] >= 0.88
    assert ConformalSets.from_dict(chosen.to_dict()) == chosen


def one_hot_vote_task(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(votes, model, labels): a calibrated model, and neighbour votes that are one-hot on most
    rows (right 60% of the time, else on a cell drawn from the model), split 0.7/0.3 on a few,
    like a gated rerank with weight 1 and a tiny vote temperature."""
    logits, labels = calibrated_task(n, k, sharpness=1.5, seed=seed)
    model = apply_temperature(logits, 1.0)
    rng = np.random.default_rng(seed + 100)

    def vote() -> np.ndarray:
        drawn = (model.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
        return np.where(rng.random(n) < 0.6, labels, drawn)

    first, second = vote(), vote()
    split = rng.random(n) < 0.3
    votes = np.zeros_like(model)
    votes[np.arange(n), first] += np.where(split, 0.7, 1.0)
    votes[np.arange(n), second] += np.where(split, 0.3, 0.0)
    return votes, model, labels


def _confidence_and_set_size(cal: Calibration, votes, model, labels):  # type: ignore[no-untyped-def]
    val, test = slice(0, 2000), slice(2000, None)
    m = (None, None) if model is None else (model[val], model[test])
    sets = fit_conformal(cal.apply(votes[val], m[0]), labels[val], 0.9)
    probs = cal.apply(votes[test], m[1])
    return probs.max(axis=1), sets.sets(probs).sum(axis=1), sets.evaluate(probs, labels[test])


def test_one_hot_votes_keep_informative_sets_at_high_confidence() -> None:
    votes, model, labels = one_hot_vote_task(4000, 60, seed=0)
    # the defect: floored one-hot scores, temperature-scaled, tie every other cell, and the
    # most confident rows get a set of every cell
    floored = Calibration(fit_temperature(log_probs(votes[:2000]), labels[:2000]), 0.0)
    conf, size, _ = _confidence_and_set_size(floored, votes, None, labels)
    assert size[conf >= 0.5].max() == 60, "the fixture reproduces the defect"

    # the fix: the model's distribution mixed back in, smoothing and temperature fitted on val
    cal = fit_scaling(votes[:2000], labels[:2000], model[:2000])
    assert cal.smoothing > 0
    conf, size, result = _confidence_and_set_size(cal, votes, model, labels)
    assert (conf >= 0.5).any()
    assert size[conf >= 0.5].max() <= 30, "no confident row gets half the cells or more"
    assert 0.87 <= result["coverage"] <= 0.93
    # more confident -> smaller (or equal) sets, on average
    quartiles = np.array_split(np.argsort(conf), 4)
    assert size[quartiles[-1]].mean() <= size[quartiles[0]].mean()
    assert np.corrcoef(conf, size)[0, 1] < 0


def test_without_a_model_distribution_calibration_is_plain_temperature_scaling() -> None:
    logits, labels = calibrated_task(2000, 20, sharpness=1.5, seed=9)
    probs = apply_temperature(3.0 * logits, 1.0)
    cal = fit_scaling(probs, labels)
    assert cal.smoothing == 0.0 and cal.temperature == pytest.approx(3.0, rel=0.2)
    np.testing.assert_allclose(
        cal.apply(probs), apply_temperature(log_probs(probs), cal.temperature)
    )
    assert Calibration.from_dict(cal.to_dict()) == cal
