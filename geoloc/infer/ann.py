"""The gallery's approximate neighbour index, built once per run and saved beside the gallery.

Rerank and `geoloc predict` search the train gallery for every image they answer. Exact search
scans all N gallery vectors per query: fine for the demo's ~10^4, ~30 ms a query at 10^6
(`docs/rerank.md`). From `rerank.ann_min_gallery` images on, the gallery is searched through a
faiss IVF index (`IndexIVFFlat`, inner product, `ann_nlist` k-means lists of which `ann_nprobe`
are scanned per query): built the first time it is needed, saved atomically as
`artifacts/data/gallery_ivf.npz` (versioned, with the fingerprint of the gallery it indexes and
its build settings) and loaded afterwards; a missing, unreadable, other-version or stale file
(another gallery, other settings) is rebuilt, never used. Smaller galleries keep exact search,
so the demo's answers do not change. Without faiss the search stays exact, with a warning.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoloc.atomic import file_sha256
from geoloc.config import RerankConfig
from geoloc.errors import DataError
from geoloc.infer.arrays import read_npz, write_npz
from geoloc.infer.gallery import FaissIndex, Gallery, create_index, faiss_available

__all__ = ["ANN_VERSION", "AnnIndex", "AnnSettings", "ann_path", "use_run_index"]

log = logging.getLogger(__name__)

ANN_VERSION = 1
_ARRAYS = ("index", "fingerprint", "nlist")


@dataclass(frozen=True)
class AnnSettings:
    """When and how the gallery gets an approximate index (`RerankConfig.ann_*`)."""

    min_gallery: int = 200_000
    nlist: int = 0  # 0: sqrt(N)
    nprobe: int = 320

    @classmethod
    def from_config(cls, cfg: RerankConfig) -> AnnSettings:
        return cls(cfg.ann_min_gallery, cfg.ann_nlist, cfg.ann_nprobe)

    def lists_for(self, n: int) -> int:
        """IVF lists for a gallery of `n`: `nlist`, else sqrt(n); at least 39 vectors per list
        (faiss's k-means minimum)."""
        return max(1, min(self.nlist or round(math.sqrt(n)), n // 39))


def ann_path(gallery_file: Path) -> Path:
    """Where the approximate index of the gallery at `gallery_file` lives."""
    return Path(gallery_file).with_name("gallery_ivf.npz")


def gallery_fingerprint(gallery_file: Path) -> str:
    """sha256 of the gallery file the index was built from (what its ids point into)."""
    return file_sha256(gallery_file)


class AnnIndex:
    """An IVF index over a gallery; a query row IVF cannot fill with `k` neighbours (its probed
    lists hold fewer) is answered by exact search, so ids are always real gallery rows."""

    exact = False

    def __init__(self, ivf: FaissIndex, gallery: Gallery) -> None:
        self._ivf, self._gallery = ivf, gallery
        self.ntotal, self.dim = ivf.ntotal, ivf.dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self._ivf.search(queries, k)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if short.size:
            exact = self._gallery.index("brute")
            sims[short], ids[short] = exact.search(queries[short], k)
        return sims, ids


def use_run_index(
    gallery: Gallery, gallery_file: Path, settings: AnnSettings, kind: str = "auto"
) -> AnnIndex | None:
    """Give `gallery` (saved at, or loaded from, `gallery_file`) its saved approximate index
    when it is large enough (build and save it when missing or stale) and return it; None
    (exact search) below `settings.min_gallery`, with `kind="brute"` or without faiss."""
    gallery.use_index(None)
    if len(gallery) < settings.min_gallery or kind == "brute":
        return None
    if not faiss_available():
        log.warning("faiss is not installed: exact search over the %d-image gallery", len(gallery))
        return None
    if not Path(gallery_file).is_file():
        raise DataError(f"gallery '{gallery_file}' does not exist: save the gallery first")
    path = ann_path(gallery_file)
    fingerprint = gallery_fingerprint(gallery_file)
    nlist = settings.lists_for(len(gallery))
    ivf = _load(path, fingerprint, nlist, settings.nprobe)
    if ivf is None:
        t0 = time.perf_counter()
        ivf = create_index(gallery.embeddings, "faiss", "ivf", nlist=nlist,
                           nprobe=settings.nprobe)  # fmt: skip
        assert isinstance(ivf, FaissIndex)
        write_npz(path, ANN_VERSION, {"index": ivf.to_bytes(), "fingerprint": np.array(fingerprint),
                                      "nlist": np.int64(nlist)})  # fmt: skip
        log.info("gallery index: IVF%d over %d images built in %.1f s -> %s", nlist,
                 len(gallery), time.perf_counter() - t0, path)  # fmt: skip
    index = AnnIndex(ivf, gallery)
    gallery.use_index(index)
    return index


def _load(path: Path, fingerprint: str, nlist: int, nprobe: int) -> FaissIndex | None:
    """The saved index if it is this gallery's with these settings; None (rebuild) otherwise."""
    if not path.is_file():
        return None
    try:
        arrays = read_npz(path, ANN_VERSION, "gallery index", _ARRAYS)
    except DataError as exc:
        log.warning("%s: rebuilding it", exc)
        return None
    if str(arrays["fingerprint"]) != fingerprint or int(arrays["nlist"]) != nlist:
        log.info("gallery index '%s' is stale (another gallery or nlist): rebuilding it", path)
        return None
    try:
        return FaissIndex.from_bytes(arrays["index"], nprobe)
    except RuntimeError as exc:  # faiss's error for a damaged index body
        log.warning("gallery index '%s' is unreadable (%s): rebuilding it", path,
                    str(exc).splitlines()[0])  # fmt: skip
        return None
