"""Sets and maps of strings as sorted 16-byte digests: lookups answer as a Python set would,
including digests that end in NUL bytes (numpy reads such an S16 item back shortened)."""

from __future__ import annotations

import numpy as np

from geoloc.data.digests import DIGEST, DigestIndex, digest, digests


def test_one_key_lookups_agree_with_a_set_even_for_digests_ending_in_nul_bytes() -> None:
    odd = [bytes(16), b"a" + bytes(15), b"a" + bytes(14) + b"\1", b"\xff" * 15 + b"\0"]
    words = [f"image-{i}" for i in range(500)]
    present = odd[::2] + [digest(w) for w in words[::2]]
    index = DigestIndex(np.array(present, DIGEST))
    for key in odd + [digest(w) for w in words]:
        at = index.position(key)
        assert (at >= 0) == (key in present), key
        if at >= 0:
            assert index.keys[at : at + 1] == np.array([key], DIGEST)
    assert index.contains(digests(words)).tolist() == [w in words[::2] for w in words]
    assert DigestIndex().position(digest("anything")) == -1
