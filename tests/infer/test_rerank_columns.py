"""A factorised head's evaluation blocks are scored on their own classes only (the children it
scored and the classes its neighbours vote for), not on all K: at 10^6 images (62,154 classes)
the dense (block x K) chain cost 4.45 ms an image and its heap grew without bound. These tests
hold the promise that makes that safe: every table and answer is the one of all K columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures.factorised import factorised_outputs
from fixtures.labels import make_label_doc

import geoloc.infer.evaluation as evaluation
from geoloc.config import RerankConfig
from geoloc.geo import LabelSpace
from geoloc.infer.candidates import TopCells
from geoloc.infer.evaluation import evaluate_rerank, table_block_rows
from geoloc.infer.gate_search import block_rows
from geoloc.infer.outputs import SplitOutputs, scored_columns
from geoloc.infer.tuning import GateGrid

GRID = GateGrid(k=(5, 20), vote_temperature=(0.05,), weight=(0.5, 1.0), max_top1=(0.5, 1.01),
                decode=("argmax", "min_risk"))  # fmt: skip


def _space() -> LabelSpace:
    points = [(48.0 + 0.02 * i, 2.0 + 0.028 * j) for i in range(72) for j in range(72)]
    return LabelSpace.from_dict(make_label_doc(points, 7, 6))


def _outputs(ls: LabelSpace, n: int, seed: int) -> SplitOutputs:
    """Factorised outputs whose embeddings sit near their class's own direction, so that
    neighbours vote for nearby truths and the gate has something to do."""
    used = np.random.default_rng(5).choice(ls.num_classes, 300, replace=False)  # ~5 per class
    out = factorised_outputs(ls, n, seed, classes=used)
    unsure = np.arange(n) % 3 == 0  # the model cannot tell the children apart: low top-1
    out.child_logits[unsure] = np.where(np.isfinite(out.child_logits[unsure]), 0.0, -np.inf)
    rng = np.random.default_rng(seed + 100)
    centres = np.random.default_rng(7).standard_normal((ls.num_classes, 32))
    emb = centres[out.labels] + 0.3 * rng.standard_normal((n, 32))
    out.embeddings = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def both(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    ls = _space()
    outs = {"train": _outputs(ls, 1500, 0), "val": _outputs(ls, 300, 1),
            "test": _outputs(ls, 300, 2)}  # fmt: skip
    land = np.random.default_rng(3).random(ls.num_classes)  # a prior that moves answers
    cfg = RerankConfig(k_neighbors=5, calibration_images=200, calibration_cells=64)
    rows = table_block_rows(outs["test"], ls.num_classes, 50)
    assert rows < block_rows(ls.num_classes), "blocks must be scored on their columns"
    first = outs["test"].subset(slice(0, rows))
    assert scored_columns(first, first.labels, ls.num_classes) is not None

    def run() -> tuple:
        answers: list[pd.DataFrame] = []
        params, tables = evaluate_rerank(outs, ls, cfg, grid=GRID, progress=False,
                                         answers=answers, land_fraction=land)  # fmt: skip
        return params, tables, answers[0]

    columns = run()
    mp = pytest.MonkeyPatch()
    mp.setattr(evaluation, "scored_columns", lambda *a, **k: None)  # every block on all K
    try:
        dense = run()
    finally:
        mp.undo()
    return ls, outs, columns, dense


def test_tables_on_the_scored_columns_equal_those_on_all_classes(both) -> None:  # type: ignore[no-untyped-def]
    _, _, (p1, t1, _), (p2, t2, _) = both
    assert p1.best_variant == p2.best_variant and p1.ood is not None
    for split in ("val", "test"):
        a, b = t1[split].set_index("variant"), t2[split].set_index("variant")
        assert list(a.index) == list(b.index)
        pd.testing.assert_frame_equal(a, b, rtol=1e-12, atol=1e-12)  # float64 sums: U vs K
    test = t1["test"].set_index("variant")
    assert test.loc["gated", "gate_share"] > 0, "the gate must open for this test to bite"
    assert test.loc["prior", "p90_km"] != test.loc["base", "p90_km"], "nor the prior"


def test_per_image_answers_on_the_scored_columns_equal_those_on_all_classes(both) -> None:  # type: ignore[no-untyped-def]
    _, _, (_, _, a1), (_, _, a2) = both
    pd.testing.assert_frame_equal(a1, a2, rtol=1e-12, atol=1e-12)  # float64 sums: U vs K


def test_factorised_blocks_are_small_and_dense_blocks_unchanged() -> None:
    ls = _space()
    out = _outputs(ls, 64, 3)
    flat = SplitOutputs(np.zeros((64, 62_154), np.float32), None, out.embeddings, out.labels,
                        out.lat, out.lon, out.image_ids)  # fmt: skip
    assert table_block_rows(flat, 62_154, 50) == 64  # (64 x 62,154) as before
    rows = table_block_rows(out, 62_154, 50)
    assert 8 <= rows < 64
    cols = scored_columns(out.subset(slice(0, rows)), np.zeros((rows, 50), int), 62_154)
    assert cols is not None and len(cols) <= rows * (out.child_classes[0].size + 50)
    assert table_block_rows(out, 471, 50) == block_rows(471)  # few classes: as before


@pytest.mark.parametrize("m", [4, 40, 200, 0])
def test_candidates_from_columns_are_those_of_the_dense_block(m: int) -> None:
    rng = np.random.default_rng(m)
    k, n = 120, 6
    cols = np.sort(rng.choice(k, 30, replace=False))
    compact = rng.random((n, 30)) * (rng.random((n, 30)) < 0.7)
    compact /= compact.sum(axis=1, keepdims=True)
    dense = np.zeros((n, k))
    dense[:, cols] = compact
    a = TopCells.from_dense(compact, None, m, cols, k)
    b = TopCells.from_dense(dense, None, m)
    assert a.cells.shape == b.cells.shape and a.num_classes == b.num_classes == k
    assert (np.diff(a.cells, axis=1) > 0).all()
    for i in range(n):  # the same mass at every cell either picks (zero-mass fill may differ)
        pa = dict(zip(a.cells[i], a.p[i], strict=True))
        pb = dict(zip(b.cells[i], b.p[i], strict=True))
        assert sorted(v for v in pa.values() if v > 0) == pytest.approx(
            sorted(v for v in pb.values() if v > 0)
        )
        assert all(dense[i, c] == pytest.approx(v) for c, v in pa.items())
    np.testing.assert_allclose(a.tail, b.tail, atol=1e-12)
