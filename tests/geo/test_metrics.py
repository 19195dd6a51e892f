"""Geo metrics: the numbers every run, rerank and leaderboard report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.errors import GeolocError
from geoloc.geo import haversine_km
from geoloc.geo.metrics import (
    THRESHOLDS_KM,
    expected_calibration_error,
    geo_metrics,
    geo_metrics_from_errors,
    topk_accuracy,
)

KEYS = {
    "median_km",
    "p90_km",
    "p95_km",
    "acc_1km",
    "acc_25km",
    "acc_200km",
    "acc_750km",
    "acc_2500km",
    "geoscore",
}


def test_geo_metrics_has_the_contract_keys_and_perfect_predictions_score_max():
    lat, lon = np.array([48.85, -33.9, 35.7]), np.array([2.35, 151.2, 139.7])
    m = geo_metrics(lat, lon, lat, lon)
    assert set(m) == KEYS
    assert m["median_km"] == 0.0 and m["p95_km"] == 0.0
    assert all(m[f"acc_{t}km"] == 1.0 for t in THRESHOLDS_KM)
    assert m["geoscore"] == pytest.approx(5000.0)
    assert all(isinstance(v, float) for v in m.values())


def test_geo_metrics_measures_distance_between_true_and_predicted_points():
    # predictions shifted along the equator by known distances
    d_true = np.array([0.5, 10.0, 100.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 8000.0, 9000.0])
    deg = d_true / (2 * math.pi * 6371.0088 / 360)
    zeros = np.zeros_like(d_true)
    m = geo_metrics(zeros, zeros, zeros, deg)
    assert m["median_km"] == pytest.approx(np.median(d_true), rel=1e-6)
    assert m["acc_1km"] == pytest.approx(0.1)
    assert m["acc_25km"] == pytest.approx(0.2)
    assert m["acc_750km"] == pytest.approx(0.4)
    assert m["acc_2500km"] == pytest.approx(0.6)
    assert m["p90_km"] <= m["p95_km"] <= 9000.0 + 1e-6


def test_accuracy_thresholds_are_strict():
    m = geo_metrics_from_errors([1.0, 25.0, 200.0, 750.0, 2500.0])
    assert m["acc_1km"] == 0.0  # 1 km is not "within 1 km"
    assert m["acc_25km"] == pytest.approx(0.2)
    assert m["acc_2500km"] == pytest.approx(0.8)


def test_geoscore_follows_the_exponential_scale():
    m = geo_metrics_from_errors([1492.7])
    assert m["geoscore"] == pytest.approx(5000 / math.e)
    assert geo_metrics_from_errors([0.0, 1e9])["geoscore"] == pytest.approx(2500.0)


def test_geo_metrics_accept_torch_tensors():
    lat, lon = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 40.0])
    got = geo_metrics(lat, lon, lat + 1, lon)
    exp = geo_metrics(lat.numpy(), lon.numpy(), lat.numpy() + 1, lon.numpy())
    assert got == pytest.approx(exp, rel=1e-5)
    assert got["median_km"] == pytest.approx(float(haversine_km(10.0, 30.0, 11.0, 30.0)), rel=1e-5)


def test_empty_inputs_give_nan_not_a_crash():
    m = geo_metrics([], [], [], [])
    assert set(m) == KEYS and all(math.isnan(v) for v in m.values())
    assert math.isnan(topk_accuracy(torch.empty(0, 5), torch.empty(0, dtype=torch.long), 1))
    assert math.isnan(expected_calibration_error([], []))


def test_mismatched_lengths_are_an_error():
    with pytest.raises(GeolocError, match="differ in length"):
        geo_metrics([1.0, 2.0], [1.0, 2.0], [1.0], [1.0])


# ---- top-k --------------------------------------------------------------------------------------


def test_topk_accuracy_counts_targets_among_the_k_best_scores():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    targets = np.array([1, 1, 0, 2])
    assert topk_accuracy(scores, targets, 1) == pytest.approx(0.25)
    assert topk_accuracy(torch.as_tensor(scores), torch.as_tensor(targets), 2) == pytest.approx(
        0.75
    )
    assert topk_accuracy(scores, targets, 3) == 1.0
    assert topk_accuracy(scores, targets, 50) == 1.0  # k capped at K


def test_topk_accuracy_rejects_misshaped_scores():
    with pytest.raises(GeolocError, match="scores must be"):
        topk_accuracy(np.zeros((3, 4)), np.zeros(2), 1)


# ---- calibration --------------------------------------------------------------------------------


def test_ece_is_zero_when_confidence_matches_accuracy():
    conf = np.full(10, 0.8)
    correct = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)


def test_ece_measures_overconfidence():
    # 0.95 confident, half right -> gap 0.45; 0.15 confident, never right -> gap 0.15
    conf = np.array([0.95] * 4 + [0.15] * 4)
    correct = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    # confidence 1.0 falls in the last bin instead of off the end
    assert expected_calibration_error([1.0], [True]) == pytest.approx(0.0)
