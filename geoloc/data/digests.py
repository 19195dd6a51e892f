"""Sets and maps of strings as sorted arrays of 16-byte digests, for per-row bookkeeping at 10^6+.

A Python set of 10^6 sha256 strings costs ~150 MB and a dict of small objects ~350 MB; a sorted
array of 16-byte blake2b digests with an int64 value per member costs 24 MB and answers a whole
batch of lookups with one `searchsorted`. Two different strings share a digest with probability
~n^2 / 2^129 (~10^-27 at 10^6 members): the digest stands for the string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

DIGEST = "S16"


def digests(values: Iterable[str]) -> np.ndarray:
    """The 16-byte blake2b digest of each string (dtype S16)."""
    blake = hashlib.blake2b
    return np.fromiter((blake(v.encode(), digest_size=16).digest() for v in values), DIGEST)


def ref_digests(sources: Iterable[str], refs: Iterable[str]) -> np.ndarray:
    """Digests of `source<TAB>source_ref`, the key an ingest journal row carries."""
    return digests(f"{s}\t{r}" for s, r in zip(sources, refs, strict=True))


class DigestIndex:
    """Digests kept sorted, each with int64 values (shape (n,) or (n, k); -1: absent): a set or
    a map with vectorised lookups."""

    def __init__(self, keys: np.ndarray | None = None, values: np.ndarray | None = None) -> None:
        keys = np.empty(0, DIGEST) if keys is None else keys
        values = np.zeros(len(keys), np.int64) if values is None else values
        order = np.argsort(keys, kind="stable")
        self.keys, self.values = keys[order], values[order].astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The values of each key, -1 for keys not in the index."""
        if not len(self.keys) or not len(keys):
            return np.full((len(keys), *self.values.shape[1:]), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = (self.keys[at] == keys).reshape(-1, *[1] * (self.values.ndim - 1))
        return np.where(hit, self.values[at], -1)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys) or not len(keys):
            return np.zeros(len(keys), bool)
        return self.keys[np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)] == keys

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys not in the index yet (the caller keeps them distinct)."""
        if len(keys):
            merged = DigestIndex(np.concatenate([self.keys, keys]),
                                 np.concatenate([self.values, values]))  # fmt: skip
            self.keys, self.values = merged.keys, merged.values
