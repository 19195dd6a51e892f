"""Distances, the label space, hierarchy and the hard-negative pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from geographiclib.geodesic import Geodesic

from geoloc.config import HardNegConfig
from geoloc.errors import DataError, GeolocError
from geoloc.geo import (
    HardNegPool,
    LabelSpace,
    build_hardneg_pool,
    haversine_km,
    hierarchical_predict,
    mask_child_logits,
    mask_r7_logits,
    pairwise_haversine_km,
)


def _random_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random pairs over the globe, dropping near-antipodal ones (geodesics there are unstable)."""
    rng = np.random.default_rng(seed)
    lat1, lat2 = np.degrees(np.arcsin(rng.uniform(-1, 1, (2, n))))
    lon1, lon2 = rng.uniform(-180, 180, (2, n))
    keep = haversine_km(lat1, lon1, lat2, lon2) < 19_000
    return lat1[keep], lon1[keep], lat2[keep], lon2[keep]


# ---- haversine ---------------------------------------------------------------------------------


def test_haversine_agrees_with_wgs84_geodesic_within_half_a_percent():
    """A sphere cannot match the ellipsoid everywhere: short north-south arcs near the equator
    are off by up to 0.56% (meridional radius 6335 km vs 6371 km). So: 99% of random pairs
    within 0.5%, every pair within 0.6%."""
    lat1, lon1, lat2, lon2 = _random_pairs(2000)
    ours = haversine_km(lat1, lon1, lat2, lon2)
    ref = np.array(
        [Geodesic.WGS84.Inverse(*p)["s12"] / 1000 for p in zip(lat1, lon1, lat2, lon2, strict=True)]
    )
    rel = np.abs(ours - ref) / ref
    assert np.mean(rel < 0.005) > 0.99
    assert rel.max() < 0.006
    assert np.median(rel) < 0.003


def test_haversine_is_accurate_for_nearby_points_in_float32():
    """Street-level errors (metres) must not drown in float32 rounding."""
    lat, lon = 48.8566, 2.3522
    ref = Geodesic.WGS84.Inverse(lat, lon, lat + 0.001, lon + 0.001)["s12"] / 1000  # ~130 m
    d = haversine_km(torch.tensor([lat]), torch.tensor([lon]), lat + 0.001, lon + 0.001)
    assert d.dtype == torch.float32
    assert abs(float(d) - ref) / ref < 0.005


def test_haversine_torch_matches_numpy_and_broadcasts():
    lat1, lon1, lat2, lon2 = _random_pairs(50)
    expected = haversine_km(lat1[:, None], lon1[:, None], lat2[None, :], lon2[None, :])
    assert expected.shape == (len(lat1), len(lat2))
    t = [torch.as_tensor(v, dtype=torch.float64) for v in (lat1, lon1, lat2, lon2)]
    got = haversine_km(t[0][:, None], t[1][:, None], t[2][None, :], t[3][None, :])
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_haversine_of_a_point_to_itself_is_zero_and_symmetric():
    lat1, lon1, lat2, lon2 = _random_pairs(20)
    np.testing.assert_allclose(haversine_km(lat1, lon1, lat1, lon1), 0.0, atol=1e-9)
    np.testing.assert_allclose(
        haversine_km(lat1, lon1, lat2, lon2), haversine_km(lat2, lon2, lat1, lon1)
    )


def test_haversine_torch_is_differentiable():
    lat = torch.tensor([10.0, 20.0], requires_grad=True)
    d = haversine_km(lat, torch.zeros(2), torch.zeros(2), torch.zeros(2)).sum()
    d.backward()
    assert torch.isfinite(lat.grad).all() and (lat.grad > 0).all()


def test_pairwise_haversine_matches_broadcast_haversine():
    lat1, lon1, lat2, lon2 = (torch.as_tensor(v, dtype=torch.float32) for v in _random_pairs(40))
    got = pairwise_haversine_km(lat1, lon1, lat2, lon2)
    ref = haversine_km(lat1[:, None].double(), lon1[:, None], lat2[None, :], lon2[None, :])
    assert got.shape == (len(lat1), len(lat2))
    assert torch.allclose(got.double(), ref, atol=0.01)  # 10 m


# ---- label space ------------------------------------------------------------------------------


def test_label_space_reads_labels_json_and_round_trips(tmp_path: Path, label_doc_factory):
    doc = label_doc_factory([(48.8 + 0.02 * i, 2.35) for i in range(10)], train_counts=range(10))
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    ls = LabelSpace.from_json(path)
    assert ls.num_classes == 10 and ls.resolution == 7 and ls.parent_resolution == 6
    assert ls.cells == [c["cell"] for c in doc["classes"]]
    assert ls.fingerprint == "test-fingerprint"
    assert ls.lat.dtype == np.float64 and ls.parent_of.dtype == np.int64
    assert list(ls.train_counts) == list(range(10))
    assert ls.centroids_tensor().shape == (10, 2)
    # a checkpoint carries to_dict(); rebuilding it gives the same mapping
    again = LabelSpace.from_dict(json.loads(json.dumps(ls.to_dict())))
    assert again.to_dict() == ls.to_dict()
    assert again.to_dict()["classes"] == doc["classes"]


def test_children_of_inverts_parent_of(tiny_label_space: LabelSpace):
    ls = tiny_label_space
    assert ls.num_parents > 1
    seen = np.concatenate([ls.children_of(p) for p in range(ls.num_parents)])
    assert sorted(seen.tolist()) == list(range(ls.num_classes))
    for p in range(ls.num_parents):
        assert (ls.parent_of[ls.children_of(p)] == p).all()
    with pytest.raises(GeolocError, match="out of range"):
        ls.children_of(ls.num_parents)


def test_index_of_maps_cells_back(tiny_label_space: LabelSpace):
    ls = tiny_label_space
    assert ls.index_of(ls.cells[3]) == 3
    with pytest.raises(GeolocError, match="not a class"):
        ls.index_of("8700000000fffff")


def test_missing_labels_file_names_the_path(tmp_path: Path):
    with pytest.raises(DataError, match="labels.json"):
        LabelSpace.from_json(tmp_path / "labels.json")


@pytest.mark.parametrize(
    "breakage, reason",
    [
        (lambda d: d["classes"][0].pop("cell"), "malformed"),
        (lambda d: d["classes"].pop(1), "without gaps"),
        (lambda d: d["classes"][0].update(parent_index=99), "parent_index"),
        (lambda d: d.update(classes=[]), "no classes"),
        (lambda d: d["classes"][1].update(cell=d["classes"][0]["cell"]), "more than one class"),
        (lambda d: d["classes"][0].update(parent="86000000fffffff"), "names parent"),
    ],
)
def test_malformed_labels_are_rejected_with_a_reason(tmp_path, label_doc_factory, breakage, reason):
    doc = label_doc_factory([(48.8 + 0.02 * i, 2.35) for i in range(5)])
    breakage(doc)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=reason):
        LabelSpace.from_json(path)


# ---- hierarchy --------------------------------------------------------------------------------


def test_hierarchical_predict_lets_the_parent_overturn_the_child_argmax():
    parent_of = np.array([0, 0, 1, 1])
    child = torch.tensor([[0.50, 0.05, 0.40, 0.05]])
    parent = torch.tensor([[0.20, 0.80]])
    scores = hierarchical_predict(child, parent, parent_of)
    assert torch.allclose(scores, torch.tensor([[0.10, 0.01, 0.32, 0.04]]))
    assert scores.argmax(1).item() == 2
    # when the parent head agrees, the child argmax stands
    agree = hierarchical_predict(child, torch.tensor([[0.9, 0.1]]), torch.as_tensor(parent_of))
    assert agree.argmax(1).item() == 0


def test_mask_child_logits_keeps_only_children_of_top_parents():
    parent_of = torch.tensor([0, 0, 1, 2, 2])
    child = torch.tensor([[5.0, 1.0, 9.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    parent = torch.tensor([[3.0, 0.0, 2.0], [0.0, 5.0, 1.0]])
    inf = float("-inf")
    top1 = mask_child_logits(child, parent, parent_of, k=1)
    assert torch.equal(top1, torch.tensor([[5.0, 1.0, inf, inf, inf], [inf, inf, 3.0, inf, inf]]))
    top2 = mask_r7_logits(child, parent, parent_of, k=2)
    assert torch.equal(top2, torch.tensor([[5.0, 1.0, inf, 2.0, 3.0], [inf, inf, 3.0, 4.0, 5.0]]))
    # the winner after masking is the best child inside the best parents
    assert top1.argmax(1).tolist() == [0, 2]


@pytest.mark.parametrize("k", [0, 3, 10])
def test_mask_child_logits_is_a_no_op_when_k_keeps_every_parent(k):
    child, parent = torch.randn(4, 5), torch.randn(4, 3)
    assert torch.equal(mask_child_logits(child, parent, np.array([0, 0, 1, 2, 2]), k), child)


# ---- hard negatives ---------------------------------------------------------------------------


def test_hardneg_pool_keeps_the_most_confused_pairs():
    # 3->4 confused 5 times, 1->2 three times, 6->7 once; correct predictions never count
    true = np.array([3] * 5 + [1] * 3 + [6] + [0] * 20)
    pred = np.array([4] * 5 + [2] * 3 + [7] + [0] * 20)
    pool = build_hardneg_pool(true, pred, HardNegConfig(top_pairs=2))
    assert pool.pairs.tolist() == [[3, 4], [1, 2]]
    assert pool.counts.tolist() == [5, 3]
    assert pool.classes.tolist() == [1, 2, 3, 4]


def test_hardneg_pool_breaks_ties_deterministically():
    true, pred = np.array([5, 2, 9]), np.array([6, 3, 1])
    pool = build_hardneg_pool(true, pred, HardNegConfig(top_pairs=2))
    assert pool.pairs.tolist() == [[2, 3], [5, 6]]


def test_hardneg_pool_is_empty_when_nothing_is_confused():
    labels = np.arange(10)
    pool = build_hardneg_pool(labels, labels, HardNegConfig())
    assert len(pool) == 0
    assert pool.sample(labels, 5, np.random.default_rng(0)).size == 0
    assert HardNegPool.empty().sample(labels, 5, np.random.default_rng(0)).dtype == np.int64


def test_hardneg_sample_draws_only_pool_images_deterministically_and_balanced():
    pool = build_hardneg_pool(np.array([1, 1]), np.array([2, 2]), HardNegConfig())
    # class 1 is rare (2 images), class 2 common (50), class 0 is not in the pool
    train = np.array([0] * 100 + [1] * 2 + [2] * 50)
    a = pool.sample(train, 2000, np.random.default_rng(7))
    b = pool.sample(train, 2000, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert a.dtype == np.int64 and a.size == 2000
    assert set(np.unique(train[a])) == {1, 2}
    # classes are drawn evenly, so the rare confused cell is not drowned out
    assert 0.4 < np.mean(train[a] == 1) < 0.6
    assert set(a[train[a] == 1]) == {100, 101}


def test_hardneg_pool_rejects_mismatched_inputs():
    with pytest.raises(GeolocError, match="true labels"):
        build_hardneg_pool(np.arange(3), np.arange(4), HardNegConfig())
