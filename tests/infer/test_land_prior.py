"""The land prior of the OOD step: land shares, the land cells and the land CDF."""

from __future__ import annotations

import numpy as np

from geoloc.geo import haversine_km
from geoloc.infer.land_prior import land_cdf, land_cells, land_points, land_shares

# class centres: six packed into western Europe, the others far apart on other continents
LAT = np.array([48.9, 50.1, 52.5, 45.5, 41.9, 40.4, 55.7, -15.8, 39.9, 40.7, -25.3, 64.1])
LON = np.array([2.35, 8.7, 13.4, 9.2, 12.5, -3.7, 37.6, -47.9, 116.4, -74.0, 133.9, 96.0])


def test_land_shares_sum_to_one_and_favour_cells_with_much_land_around() -> None:
    share = land_shares(LAT, LON)
    assert abs(share.sum() - 1.0) < 1e-9
    europe = share[:6].sum()  # six cells packed into western Europe share little land
    assert europe < share[7] + share[8], "Brasilia's and Beijing's cells hold more land"


def test_the_land_cells_are_the_fewest_holding_the_level_of_the_land() -> None:
    share = land_shares(LAT, LON)
    cells = land_cells(LAT, LON, 0.9)
    assert share[cells].sum() >= 0.9
    dropped = np.setdiff1d(np.arange(LAT.size), cells)
    assert all(share[cells].sum() - share[c] < 0.9 for c in cells), "none is spare"
    assert dropped.size and share[dropped].max() <= share[cells].min()
    assert (land_cells(LAT, LON, 1.0) == np.arange(LAT.size)).all()
    # a point uniform over land falls in the land cells (its nearest centre's) at the level
    lat, lon = land_points(3000, seed=7)
    near = haversine_km(lat[:, None], lon[:, None], LAT, LON).argmin(axis=1)
    assert np.isin(near, cells).mean() >= 0.87


def test_the_land_cdf_grows_with_the_distance_and_reaches_all_of_the_land() -> None:
    at = np.array([[10.0, 1_000.0, 5_000.0, 20_100.0]])
    cdf = land_cdf(np.array([48.9]), np.array([2.35]), at)[0]
    assert np.all(np.diff(cdf) >= 0) and cdf[-1] == 1.0 and cdf[0] < 0.05
