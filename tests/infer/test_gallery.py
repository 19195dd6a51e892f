"""Neighbour search: faiss and brute force agree; galleries round-trip; approximate is close."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geoloc.errors import DataError, GeolocError
from geoloc.infer.gallery import (
    BruteForceIndex,
    Gallery,
    create_index,
    faiss_available,
    l2_normalize,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss-cpu is not installed")


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@needs_faiss
def test_faiss_flat_and_brute_force_return_the_same_neighbours() -> None:
    data, queries = _vectors(2000, 32), _vectors(50, 32, seed=1)
    s_f, i_f = create_index(data, kind="faiss").search(queries, 10)
    s_b, i_b = create_index(data, kind="brute").search(queries, 10)
    np.testing.assert_array_equal(i_f, i_b)
    np.testing.assert_allclose(s_f, s_b, atol=1e-5)
    assert np.all(np.diff(s_b, axis=1) <= 1e-6), "similarities come sorted, best first"


def test_brute_force_finds_each_vector_itself_and_chunks_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _vectors(300, 16)
    sims, ids = BruteForceIndex(data).search(data, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(300))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    import geoloc.infer.gallery as gallery

    full = BruteForceIndex(data).search(data[:40], 5)
    monkeypatch.setattr(gallery, "_CHUNK_BYTES", 300 * 4 * 3)  # 3 queries per chunk
    chunked = BruteForceIndex(data).search(data[:40], 5)
    np.testing.assert_array_equal(full[1], chunked[1])


def test_search_is_cosine_whatever_the_vector_scale() -> None:
    data = _vectors(100, 8)
    scaled = data * np.random.default_rng(3).uniform(0.1, 10, size=(100, 1)).astype(np.float32)
    q = _vectors(5, 8, seed=9)
    np.testing.assert_array_equal(
        create_index(data, "brute").search(q, 7)[1], create_index(scaled, "brute").search(q, 7)[1]
    )


def test_k_larger_than_gallery_is_capped_and_bad_input_is_refused() -> None:
    idx = create_index(_vectors(5, 4), kind="brute")
    sims, ids = idx.search(_vectors(2, 4), 50)
    assert ids.shape == (2, 5)
    with pytest.raises(GeolocError, match="dimension"):
        idx.search(_vectors(2, 3), 1)
    with pytest.raises(GeolocError, match="kind"):
        create_index(_vectors(5, 4), kind="annoy")  # type: ignore[arg-type]
    with pytest.raises(GeolocError, match="empty"):
        create_index(np.zeros((0, 4), np.float32))


def test_faiss_kind_without_faiss_is_an_error_but_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import geoloc.infer.gallery as gallery

    monkeypatch.setattr(gallery, "faiss_available", lambda: False)
    assert isinstance(create_index(_vectors(10, 4), kind="auto", method="ivf"), BruteForceIndex)
    with pytest.raises(GeolocError, match="faiss"):
        create_index(_vectors(10, 4), kind="faiss")


@needs_faiss
@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approximate_indexes_keep_most_true_neighbours_on_clustered_data(method: str) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))
    data = (centres[rng.integers(0, 40, 8000)] + 0.3 * rng.standard_normal((8000, 32))).astype(
        np.float32
    )
    queries = data[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    exact = create_index(data, "brute").search(queries, 10)[1]
    approx = create_index(data, "faiss", method).search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.8


def test_gallery_round_trips_and_searches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g = Gallery(
        embeddings=_vectors(20, 6),
        labels=rng.integers(0, 3, 20),
        lat=rng.uniform(-80, 80, 20),
        lon=rng.uniform(-180, 180, 20),
        image_ids=[f"img{i}" for i in range(20)],
    )
    g.save(tmp_path / "gallery.npz")
    back = Gallery.load(tmp_path / "gallery.npz")
    # float16 on disk: within half a float16 step of the saved unit vectors
    np.testing.assert_allclose(back.embeddings, g.embeddings, atol=1e-3)
    np.testing.assert_array_equal(back.labels, g.labels)
    np.testing.assert_array_equal(back.image_ids, g.image_ids)
    sims, ids = back.search(g.embeddings[:3] * 5, k=1, kind="brute")
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
    np.testing.assert_allclose(np.linalg.norm(back.embeddings, axis=1), 1.0, atol=1e-5)


def test_gallery_refuses_mismatched_parts_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(GeolocError, match="differ"):
        Gallery(l2_normalize(_vectors(3, 2)), [0, 1], [0, 0, 0], [0, 0, 0], ["a", "b", "c"])
    with pytest.raises(DataError, match="does not exist"):
        Gallery.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="could not be read"):
        Gallery.load(tmp_path / "bad.npz")
