"""The gallery's saved approximate index (`geoloc.infer.ann`): small galleries stay exact, large
ones are searched through an IVF index built once, saved in the run and rebuilt when stale."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from geoloc.infer.ann import ANN_VERSION, AnnSettings, ann_path, use_run_index
from geoloc.infer.arrays import read_npz, write_npz
from geoloc.infer.gallery import Gallery, l2_normalize

pytest.importorskip("faiss")


def clustered(n: int, dim: int = 32, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """Unit vectors around 100 fixed centres (like a trained model's embeddings of places);
    `seed` draws other points of the same clusters (queries)."""
    centres = np.random.default_rng(99).standard_normal((100, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * spread / np.sqrt(dim)
    return l2_normalize(l2_normalize(centres)[rng.integers(0, len(centres), n)] + noise)


def gallery_of(emb: np.ndarray) -> Gallery:
    n = emb.shape[0]
    return Gallery(emb, np.arange(n) % 7, np.zeros(n), np.zeros(n), [f"i{i}" for i in range(n)])


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Gallery, Path]:
    g = gallery_of(clustered(3000))
    path = tmp_path / "gallery.npz"
    g.save(path)
    return g, path


def test_a_gallery_below_the_threshold_is_searched_exactly_and_writes_nothing(saved) -> None:
    g, path = saved
    q = clustered(40, seed=1)
    exact = g.search(q, 10)
    assert use_run_index(g, path, AnnSettings(min_gallery=len(g) + 1)) is None
    assert not ann_path(path).exists()
    assert all(np.array_equal(a, b) for a, b in zip(g.search(q, 10), exact, strict=True))


def test_an_ivf_that_probes_every_list_gives_the_exact_neighbours(saved) -> None:
    g, path = saved
    q = clustered(40, seed=1)
    _, exact = g.index("brute").search(q, 10)
    index = use_run_index(g, path, AnnSettings(min_gallery=1, nlist=16, nprobe=16))
    assert index is not None and ann_path(path).is_file()
    _, ids = g.search(q, 10)
    assert np.array_equal(ids, exact)
    _, brute = g.search(q, 10, kind="brute")  # asking for brute force still gets it
    assert np.array_equal(brute, exact)


def test_default_settings_keep_recall_above_095_on_clustered_embeddings(tmp_path: Path) -> None:
    g = gallery_of(clustered(20_000))
    g.save(tmp_path / "gallery.npz")
    q = clustered(200, seed=2)
    _, exact = g.index("brute").search(q, 20)
    use_run_index(g, tmp_path / "gallery.npz", AnnSettings(min_gallery=1))
    _, ids = g.search(q, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, exact, strict=True)])
    assert recall >= 0.95


def test_the_saved_index_is_reused_and_a_stale_one_is_rebuilt(saved, caplog) -> None:
    g, path = saved
    settings = AnnSettings(min_gallery=1, nlist=16)
    use_run_index(g, path, settings)
    stamp = ann_path(path).stat().st_mtime_ns
    use_run_index(Gallery.load(path), path, settings)  # predict loads the same gallery
    assert ann_path(path).stat().st_mtime_ns == stamp
    other = gallery_of(clustered(3000, seed=5))  # the run's gallery was rewritten (rerank)
    other.save(path)
    with caplog.at_level(logging.INFO, logger="geoloc.infer.ann"):
        use_run_index(other, path, settings)
    assert "stale" in caplog.text
    _, exact = other.index("brute").search(other.embeddings[:5], 1)
    assert np.array_equal(other.search(other.embeddings[:5], 1)[1], exact)  # finds itself
    use_run_index(other, path, AnnSettings(min_gallery=1, nlist=8))  # other settings: rebuilt
    assert int(read_npz(ann_path(path), ANN_VERSION, "x")["nlist"]) == 8


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_version", "bad_body"])
def test_a_damaged_index_file_is_rebuilt_not_used(saved, damage: str, caplog) -> None:
    g, path = saved
    settings = AnnSettings(min_gallery=1, nlist=16, nprobe=16)
    use_run_index(g, path, settings)
    target = ann_path(path)
    good = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        target.write_bytes(b"not an npz")
    else:
        arrays = read_npz(target, ANN_VERSION, "x")
        if damage == "bad_body":
            arrays["index"] = arrays["index"][:100]
        write_npz(target, ANN_VERSION + (damage == "other_version"), arrays)
    with caplog.at_level(logging.WARNING, logger="geoloc.infer.ann"):
        use_run_index(g, path, settings)
    assert "rebuilding" in caplog.text
    _, exact = g.index("brute").search(g.embeddings[:20], 5)
    assert np.array_equal(g.search(g.embeddings[:20], 5)[1], exact)


def test_queries_ivf_cannot_fill_are_answered_exactly(saved) -> None:
    """With one probed list of a few dozen vectors and k above that, IVF returns -1 ids:
    those rows fall back to exact search instead of pointing at the last gallery row."""
    g, path = saved
    use_run_index(g, path, AnnSettings(min_gallery=1, nlist=60, nprobe=1))
    q = clustered(10, seed=3)
    _, ids = g.search(q, 200)
    assert (ids >= 0).all()
    assert np.array_equal(ids, g.index("brute").search(q, 200)[1])


def test_predict_answers_are_unchanged_through_an_exact_ivf(
    reranked_run: Path, demo_index, tmp_path: Path
) -> None:
    import pandas as pd

    from geoloc.data.imagestore import ImageLocations
    from geoloc.infer.predict import Predictor

    photo_folder = tmp_path / "photos"
    photo_folder.mkdir()
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    stored = ImageLocations(manifest.reset_index(drop=True), demo_index.root)
    for i in range(12):
        (photo_folder / f"img{i}.jpg").write_bytes(stored.read(i))

    run = tmp_path / "run"
    shutil.copytree(reranked_run, run)
    plain = Predictor(run).predict([photo_folder], progress=False)
    assert not ann_path(Predictor(run).paths.gallery).exists()  # demo size: exact
    predictor = Predictor(run)
    if predictor.gallery is None:
        pytest.skip("val chose a variant without neighbours")
    use_run_index(predictor.gallery, predictor.paths.gallery,
                  AnnSettings(min_gallery=1, nlist=8, nprobe=8))  # fmt: skip
    through_ivf = predictor.predict([photo_folder], progress=False)
    assert through_ivf[["cell", "lat", "lon"]].equals(plain[["cell", "lat", "lon"]])


def test_rerank_tables_search_exactly_even_where_an_ivf_serves_predict(saved) -> None:
    from geoloc.infer.evaluation import search_split

    g, path = saved
    q = clustered(200, seed=1)
    sims, exact = g.index("brute").search(q, 10)
    use_run_index(g, path, AnnSettings(min_gallery=1, nlist=16, nprobe=1))  # a poor IVF
    _, approx = g.search(q, 10)
    assert not np.array_equal(approx, exact)  # predict's search goes through the IVF...
    nbrs = search_split(g, q, 10, "auto", "test", progress=False, batch=64)
    np.testing.assert_allclose(nbrs.sims, sims, atol=1e-5)  # ...the split tables do not
    assert np.array_equal(nbrs.labels, g.labels[exact])
