"""Nearest-neighbour search over L2-normalised embeddings, and the gallery a run searches.

One interface, `create_index(embeddings, kind=...)`, returns an object with
`search(queries, k) -> (similarities (Q, k), ids (Q, k))`:

- `kind="faiss"`: faiss (imported lazily). `method="flat"` is `IndexFlatIP`, exact: the same
  neighbours as brute force, only faster (BLAS + SIMD top-k). `method="ivf"` (`IndexIVFFlat`,
  inner product) scans `nprobe` of `nlist` clusters: ~10-100x more queries/s on a million
  vectors, at a recall that drops with fewer probes and with less cluster structure in the data
  (uniformly random vectors are its worst case). `method="hnsw"` (`IndexHNSWFlat`) is a graph:
  high recall (~0.9-0.99 at `ef_search` 64-256) and fast queries, but a slow, memory-hungry build.
  `benchmarks/bench_gallery.py` measures both sides of that trade-off.
- `kind="brute"`: exact search with torch matmul in memory-bounded chunks, no extra dependency.
- `kind="auto"`: faiss when it imports, else brute force.

Similarities are inner products, which are cosine similarities because every vector stored or
queried here is L2-normalised first.

`Gallery` is what rerank and predict search: the train images' embeddings with their class labels,
coordinates and image ids, saved under a run's `artifacts/data/gallery.npz`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from geoloc.errors import DataError, GeolocError
from geoloc.infer.arrays import read_npz, write_npz

__all__ = [
    "BruteForceIndex",
    "FaissIndex",
    "Gallery",
    "IndexKind",
    "IndexMethod",
    "NeighborIndex",
    "create_index",
    "faiss_available",
    "l2_normalize",
]

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "faiss", "brute"]
IndexMethod = Literal["flat", "ivf", "hnsw"]

GALLERY_VERSION = 1
_GALLERY_ARRAYS = ("embeddings", "labels", "lat", "lon", "image_ids")
_CHUNK_BYTES = 256 << 20
"""Brute force scores queries in chunks whose (chunk, N) similarity block stays under this."""


class NeighborIndex(Protocol):
    """What rerank and predict need from a neighbour index."""

    ntotal: int
    dim: int
    exact: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (Q, k) float32 similarities (descending), (Q, k) int64 ids."""
        ...


def l2_normalize(x: np.ndarray | torch.Tensor, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length as contiguous float32 (zero rows stay zero)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise GeolocError(f"embeddings must be 2-D (N, D), got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, eps), dtype=np.float32)


def _check_k(k: int, ntotal: int) -> int:
    if k < 1:
        raise GeolocError(f"k must be >= 1, got {k}")
    return min(int(k), ntotal)


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = l2_normalize(queries)
    if q.shape[1] != dim:
        raise GeolocError(f"queries have dimension {q.shape[1]}, the index has {dim}")
    return q


class BruteForceIndex:
    """Exact inner-product search: torch matmul over query chunks, then `topk`.

    The reference every approximate index is measured against, and the fallback when faiss is
    missing. Memory is the gallery plus one (chunk, N) float32 block of at most `_CHUNK_BYTES`.
    """

    exact = True

    def __init__(self, embeddings: np.ndarray) -> None:
        self._data = torch.from_numpy(l2_normalize(embeddings))  # (N, D)
        self.ntotal, self.dim = self._data.shape

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(_check_queries(queries, self.dim))  # (Q, D)
        k = _check_k(k, self.ntotal)
        chunk = max(1, _CHUNK_BYTES // (4 * max(self.ntotal, 1)))
        sims = np.empty((q.shape[0], k), dtype=np.float32)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], chunk):
            block = q[start : start + chunk] @ self._data.T  # (chunk, N)
            top = block.topk(k, dim=1)
            sims[start : start + chunk] = top.values.numpy()
            ids[start : start + chunk] = top.indices.numpy()
        return sims, ids


def faiss_available() -> bool:
    """Whether faiss imports here (it is an optional speed-up, never required)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissIndex:
    """faiss inner-product index: exact `flat`, or approximate `ivf` / `hnsw` (see module doc)."""

    def __init__(
        self,
        embeddings: np.ndarray,
        method: IndexMethod = "flat",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        import faiss

        data = l2_normalize(embeddings)
        self.ntotal, self.dim = data.shape
        self.method = method
        self.exact = method == "flat"
        if method == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif method == "ivf":
            # ~4 sqrt(N) lists is faiss's rule of thumb; at least 39 training points per list
            nlist = nlist or max(1, min(int(4 * np.sqrt(self.ntotal)), self.ntotal // 39))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            n_train = min(self.ntotal, 64 * nlist)
            index.train(data[rng.choice(self.ntotal, n_train, replace=False)])
            index.nprobe = min(nprobe, nlist)
        elif method == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            raise GeolocError(f"unknown index method '{method}'; valid: flat, ivf, hnsw")
        index.add(data)
        self._index = index
        # faiss keeps `quantizer` alive only through Python: hold a reference
        self._keep: Any = index.quantizer if method == "ivf" else None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _check_queries(queries, self.dim)
        k = _check_k(k, self.ntotal)
        sims, ids = self._index.search(q, k)
        return sims.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def to_bytes(self) -> np.ndarray:
        """The index serialised by faiss, as a uint8 array (what `from_bytes` reads)."""
        import faiss

        return np.asarray(faiss.serialize_index(self._index), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, data: np.ndarray, nprobe: int = 16) -> FaissIndex:
        """An index `to_bytes` wrote; `nprobe` (IVF) is a search setting, not stored."""
        import faiss

        self = cls.__new__(cls)
        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        self.ntotal, self.dim, self._keep = int(index.ntotal), int(index.d), None
        ivf = faiss.try_extract_index_ivf(index)
        self.method = "ivf" if ivf is not None else "flat"
        self.exact = ivf is None
        if ivf is not None:
            ivf.nprobe = min(nprobe, ivf.nlist)
        self._index = index
        return self


def create_index(
    embeddings: np.ndarray | torch.Tensor,
    kind: IndexKind = "auto",
    method: IndexMethod = "flat",
    **options: Any,
) -> NeighborIndex:
    """A neighbour index over `embeddings` (L2-normalised here).

    `kind="faiss"` without faiss installed is an error; `"auto"` falls back to exact brute force
    (and to exact search if an approximate `method` was asked for, with a warning).
    """
    data = l2_normalize(embeddings)
    if data.shape[0] == 0:
        raise GeolocError("cannot build a neighbour index over an empty gallery")
    if kind not in ("auto", "faiss", "brute"):
        raise GeolocError(f"unknown index kind '{kind}'; valid: auto, faiss, brute")
    use_faiss = kind == "faiss" or (kind == "auto" and faiss_available())
    if kind == "faiss" and not faiss_available():
        raise GeolocError(
            "index kind 'faiss' asked for but faiss is not installed (pip install "
            "faiss-cpu), or use kind 'brute'"
        )
    if use_faiss:
        return FaissIndex(data, method, **options)
    if method != "flat":
        log.warning("faiss is not available: exact brute-force search instead of '%s'", method)
    return BruteForceIndex(data)


# --------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Gallery:
    """Reference images to search: embeddings with their labels, coordinates and ids.

    Built from the train split by rerank (the only split whose labels the model saw, so val and
    test queries never find themselves) and reused unchanged by `geoloc predict`.
    """

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    labels: np.ndarray  # (N,) int64 class index
    lat: np.ndarray  # (N,) float64 degrees
    lon: np.ndarray  # (N,) float64
    image_ids: np.ndarray  # (N,) str
    _index: NeighborIndex | None = field(default=None, repr=False)
    _index_kind: str = field(default="", repr=False)
    _saved: NeighborIndex | None = field(default=None, repr=False)  # `use_index`

    def __post_init__(self) -> None:
        self.embeddings = l2_normalize(self.embeddings)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.lat = np.asarray(self.lat, dtype=np.float64).reshape(-1)
        self.lon = np.asarray(self.lon, dtype=np.float64).reshape(-1)
        self.image_ids = np.asarray(self.image_ids, dtype=str).reshape(-1)
        n = self.embeddings.shape[0]
        sizes = {len(self.labels), len(self.lat), len(self.lon), len(self.image_ids)}
        if sizes != {n}:
            raise GeolocError(
                f"gallery parts differ in length: {n} embeddings, {len(self.labels)} labels, "
                f"{len(self.lat)} lat, {len(self.lon)} lon, {len(self.image_ids)} ids"
            )

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def index(self, kind: IndexKind = "auto", method: IndexMethod = "flat") -> NeighborIndex:
        """The neighbour index, built once per kind/method and kept."""
        key = f"{kind}:{method}"
        if self._index is None or self._index_kind != key:
            self._index = create_index(self.embeddings, kind, method)
            self._index_kind = key
        return self._index

    def use_index(self, index: NeighborIndex | None) -> None:
        """Search through `index` (the run's saved approximate index, `geoloc.infer.ann`)
        unless exact brute force is asked for; None: back to the exact index."""
        if index is not None and (index.ntotal, index.dim) != (len(self), self.dim):
            raise GeolocError(
                f"neighbour index has {index.ntotal} x {index.dim} vectors, the gallery "
                f"{len(self)} x {self.dim}"
            )
        self._saved = index

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        kind: IndexKind = "auto",
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) similarities and gallery row ids of the `k` nearest gallery images; `exact`
        searches the exact index even where an approximate one is in use (`use_index`)."""
        approximate = self._saved is not None and kind != "brute" and not exact
        index = self._saved if approximate else self.index(kind)
        assert index is not None
        return index.search(l2_normalize(queries), k)

    def save(self, path: Path) -> None:
        """Write an uncompressed `.npz` atomically (loads fast with memory mapping off); the
        embeddings in float16 (half the bytes; rerank's outputs are already at that precision,
        `geoloc.infer.outputs.stored_embeddings`)."""
        arrays = {name: getattr(self, name) for name in _GALLERY_ARRAYS}
        arrays["embeddings"] = self.embeddings.astype(np.float16)
        write_npz(path, GALLERY_VERSION, arrays)

    @classmethod
    def load(cls, path: Path) -> Gallery:
        """Read a gallery written by `save`; `DataError` naming the file when unusable."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"gallery '{path}' does not exist (run `geoloc rerank` first)")
        arrays = read_npz(path, GALLERY_VERSION, "gallery", _GALLERY_ARRAYS)
        return cls(**{name: arrays[name] for name in _GALLERY_ARRAYS})
