"""The calibrated error radius: coverage on data with a known error distribution, adaptivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fixtures.labels import make_label_doc

from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.radius import (
    ErrorRadius,
    expected_distance_km,
    fit_error_radius,
    fit_radius_scale,
    typical_cell_radius_km,
)
from geoloc.infer.rerank import Neighbours

GRID = [(lat, lon) for lat in range(-50, 61, 15) for lon in range(-170, 171, 30)]


@pytest.fixture(scope="module")
def world() -> LabelSpace:
    """~100 classes: r2 cells on a 15 x 30 degree grid."""
    return LabelSpace.from_dict(make_label_doc(GRID, resolution=2, parent_resolution=1))


def test_scaled_errors_with_a_known_quantile_are_covered_at_the_asked_rate() -> None:
    # errors = (spread + 50 km) x Exp(1): the 90% quantile of error / scale is ln(10)
    rng = np.random.default_rng(0)
    n_cal, n_test = 3000, 30000
    spread = rng.lognormal(5.0, 1.0, n_cal + n_test)
    errors = (spread + 50.0) * rng.exponential(1.0, n_cal + n_test)
    cal, test = slice(0, n_cal), slice(n_cal, None)

    floor, q = fit_radius_scale(spread[cal], errors[cal], 0.9, floors=(50.0,))
    assert floor == 50.0 and q == pytest.approx(math.log(10.0), rel=0.05)
    radius = q * (spread[test] + floor)
    assert 0.88 <= np.mean(errors[test] <= radius) <= 0.92
    # the score is exchangeable across uncertainty levels: every tercile is covered too
    terciles = np.array_split(np.argsort(spread[test]), 3)
    for rows in terciles:
        assert 0.87 <= np.mean(errors[test][rows] <= radius[rows]) <= 0.93
    assert radius[terciles[2]].mean() > 3 * radius[terciles[0]].mean(), "radius adapts"

    # choosing the floor on the same val (cross-fitted) keeps the coverage
    floor, q = fit_radius_scale(spread[cal], errors[cal], 0.9, floors=(5.0, 50.0, 500.0, math.inf))
    scale = np.ones(n_test) if math.isinf(floor) else spread[test] + floor
    assert 0.88 <= np.mean(errors[test] <= q * scale) <= 0.92
    assert not math.isinf(floor), "an adaptive radius beats a constant one here"


def _draws(world: LabelSpace, n: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Rows whose truth is drawn from their own distribution: sharp rows (90% on one cell) and
    diffuse rows (spread over 20 cells), the truth jittered ~50 km around its cell centre."""
    k = world.num_classes
    probs = np.full((n, k), 1e-6)
    diffuse = rng.random(n) < 0.5
    top = rng.integers(0, k, n)
    for i in range(n):
        if diffuse[i]:
            probs[i, rng.choice(k, 20, replace=False)] += rng.dirichlet(np.ones(20))
        else:
            probs[i, top[i]] += 0.9
            probs[i, rng.choice(k, 5, replace=False)] += 0.02
    probs /= probs.sum(axis=1, keepdims=True)
    truth = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    true_lat = np.clip(world.lat[truth] + rng.normal(0, 0.45, n), -89, 89)
    true_lon = world.lon[truth] + rng.normal(0, 0.45, n)
    pred = probs.argmax(axis=1)
    return probs, world.lat[pred], world.lon[pred], true_lat, true_lon, diffuse


def test_radius_covers_truths_drawn_from_the_calibrated_distribution(world: LabelSpace) -> None:
    rng = np.random.default_rng(1)
    val = _draws(world, 2000, rng)
    test = _draws(world, 20000, rng)
    radius = fit_error_radius(*val[:5], world, coverage=0.9)
    result = radius.evaluate(*test[:5], world)
    assert 0.88 <= result["radius_coverage"] <= 0.92
    r = radius.radius_km(test[0], test[1], test[2], world)
    diffuse = test[5]
    assert np.median(r[diffuse]) > 2 * np.median(r[~diffuse]), "diffuse rows get wider radii"
    # and it is much tighter than one radius for everyone would be
    errors = haversine_km(test[3], test[4], test[1], test[2])
    assert result["radius_median_km"] < np.quantile(errors, 0.9)


def test_expected_distance_is_the_mass_weighted_distance_to_cell_centres(world: LabelSpace) -> None:
    probs = np.zeros((1, world.num_classes))
    probs[0, 0], probs[0, 1] = 0.5, 0.5
    d01 = haversine_km(world.lat[0], world.lon[0], world.lat[1], world.lon[1])
    spread = expected_distance_km(probs, world.lat[:1], world.lon[:1], world)
    assert spread[0] == pytest.approx(0.5 * d01, rel=1e-9)
    assert 0 < typical_cell_radius_km(world) < d01


def test_error_radius_round_trips_and_a_constant_radius_ignores_the_distribution(
    world: LabelSpace,
) -> None:
    const = ErrorRadius(coverage=0.9, quantile=1234.0, floor_km=math.inf, n_calibration=10)
    probs = np.full((3, world.num_classes), 1.0 / world.num_classes)
    r = const.radius_km(probs, world.lat[:3], world.lon[:3], world)
    np.testing.assert_allclose(r, 1234.0)
    assert ErrorRadius.from_dict(const.to_dict()) == const
    adaptive = ErrorRadius(coverage=0.8, quantile=2.0, floor_km=10.0, candidates=8)
    assert ErrorRadius.from_dict(adaptive.to_dict()) == adaptive


def _offset(lat: np.ndarray, lon: np.ndarray, km: np.ndarray, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Points `km` away from (lat, lon) in a random direction (flat-earth, fine below ~1,000 km)."""
    theta = rng.uniform(0, 2 * np.pi, km.shape)
    dlat = km * np.cos(theta) / 111.2
    dlon = km * np.sin(theta) / (111.2 * np.cos(np.radians(lat)))
    return lat + dlat, lon + dlon


def _neighbour_rows(world: LabelSpace, n: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Answers at cell centres, truths an uncertain distance away, a flat (useless) distribution,
    and 5 gallery neighbours scattered around the truth as widely as the image is uncertain."""
    cls = rng.integers(0, world.num_classes, n)
    lat, lon = world.lat[cls], world.lon[cls]
    sigma = rng.lognormal(4.0, 0.8, n)  # km: how uncertain each image is
    true_lat, true_lon = _offset(lat, lon, sigma * rng.exponential(1.0, n), rng)
    k = 5
    nlat, nlon = _offset(np.repeat(true_lat, k), np.repeat(true_lon, k),
                         np.repeat(sigma, k) * rng.exponential(1.0, n * k), rng)  # fmt: skip
    nbrs = Neighbours(
        sims=np.full((n, k), 0.9, np.float32), labels=np.repeat(cls, k).reshape(n, k),
        lat=nlat.reshape(n, k), lon=nlon.reshape(n, k),
    )  # fmt: skip
    probs = np.full((n, world.num_classes), 1.0 / world.num_classes)
    return probs, lat, lon, true_lat, true_lon, nbrs, sigma


def test_neighbour_spread_is_chosen_when_neighbours_know_the_uncertainty(world: LabelSpace) -> None:
    rng = np.random.default_rng(2)
    val, test = _neighbour_rows(world, 3000, rng), _neighbour_rows(world, 20000, rng)
    radius = fit_error_radius(*val[:5], world, coverage=0.9, nbrs=val[5])
    assert radius.neighbours_k > 0
    result = radius.evaluate(*test[:5], world, nbrs=test[5])
    assert 0.88 <= result["radius_coverage"] <= 0.92
    flat = fit_error_radius(*val[:5], world, coverage=0.9)  # no neighbours: spread of the probs
    assert result["radius_median_km"] < 0.8 * flat.evaluate(*test[:5], world)["radius_median_km"]
    r = radius.radius_km(test[0], test[1], test[2], world, test[5])
    sure = test[6] < np.quantile(test[6], 0.25)
    unsure = test[6] > np.quantile(test[6], 0.75)
    assert np.median(r[unsure]) > 2 * np.median(r[sure])
    with pytest.raises(GeolocError, match="neighbours"):
        radius.radius_km(test[0], test[1], test[2], world)
    assert ErrorRadius.from_dict(radius.to_dict()) == radius
