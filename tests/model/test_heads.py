"""Heads and sparse losses: the factorised head scores P(parent) x P(child | parent) from child
logits of the parents that matter only, and sparse GeoSoft equals the dense loss where the
neighbours hold the target mass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from fixtures.labels import make_label_doc
from fixtures.tiny_runs import TINY_MODEL_CONFIG

from geoloc.config import IndexConfig, ModelConfig, TrainConfig, load_config
from geoloc.errors import ConfigError
from geoloc.geo import LabelSpace, haversine_km, nearest_points
from geoloc.model import (
    FactorisedHead,
    GeoSoftNeighbours,
    GeoSoftTargetLoss,
    SparseGeoSoftLoss,
    create_loss,
    create_model,
    forward_inputs,
)
from geoloc.model.heads import child_table
from geoloc.model.scores import class_scores, predicted_classes

FACTORISED = TINY_MODEL_CONFIG.model_copy(update={"head": "factorised"})


def grid_label_space(n: int = 12, step: float = 0.02, resolution: int = 7) -> LabelSpace:
    """Classes at the r7 cells of an n x n point grid near Paris (~2 km apart), r6 parents."""
    points = [(48.7 + step * i, 2.2 + 1.4 * step * j) for i in range(n) for j in range(n)]
    return LabelSpace.from_dict(make_label_doc(points, resolution, resolution - 1))


@pytest.fixture(scope="module")
def grid() -> LabelSpace:
    ls = grid_label_space()
    assert ls.num_classes > 100 and ls.num_parents > 5
    return ls


def exact_log_probs(head: FactorisedHead, h: torch.Tensor, ls: LabelSpace) -> torch.Tensor:
    """(B, K) log P(parent(k)) + log P(k | parent(k)), every child of every parent computed."""
    log_parent = F.log_softmax(head.parent(h), dim=1)  # (B, P)
    all_parents = torch.arange(ls.num_parents).expand(h.shape[0], -1)
    log_child = F.log_softmax(head.child_logits(h, all_parents), dim=2)  # (B, P, C)
    parent_of = torch.as_tensor(ls.parent_of)
    return log_parent[:, parent_of] + log_child[:, parent_of, head.slot_of]


# ------------------------------------------------------------------------------------------
# the factorised head
# ------------------------------------------------------------------------------------------


def test_child_table_places_every_class_once_under_its_parent(grid: LabelSpace) -> None:
    t = child_table(grid.parent_of, grid.num_parents)
    assert t.children.shape == (grid.num_parents, t.max_children)
    assert t.max_children <= 7  # an r6 cell has at most 7 r7 children
    placed = t.children[t.mask]
    assert sorted(placed.tolist()) == list(range(grid.num_classes))
    assert (t.children[grid.parent_of, t.slot_of] == np.arange(grid.num_classes)).all()
    for p in range(grid.num_parents):
        assert set(t.children[p][t.mask[p]]) == set(grid.children_of(p))


def test_factorised_scores_are_parent_times_child_probabilities(grid: LabelSpace) -> None:
    torch.manual_seed(0)
    model = create_model(FACTORISED, grid.num_classes, grid.num_parents,
                         parent_of=grid.parent_of).eval()  # fmt: skip
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        exact = exact_log_probs(model.head, model.embed(x), grid).exp()
    assert torch.allclose(exact.sum(dim=1), torch.ones(5), atol=1e-5)
    scores = class_scores(out, grid.parent_of, 0)
    assert torch.allclose(scores, exact, atol=1e-6)
    assert torch.equal(predicted_classes(out), exact.argmax(dim=1))


def test_topk_parents_scores_only_their_children_renormalised(grid: LabelSpace) -> None:
    torch.manual_seed(1)
    model = create_model(FACTORISED, grid.num_classes, grid.num_parents,
                         parent_of=grid.parent_of, topk_parents=2).eval()  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        exact = exact_log_probs(model.head, model.embed(x), grid).exp()
    assert out["child_logits"].shape[:2] == (4, 2)  # children of 2 parents computed, not K
    top = out["parent_logits"].topk(2, dim=1).indices
    for k in (1, 2):
        scores = class_scores(out, grid.parent_of, k)
        assert torch.allclose(scores.sum(dim=1), torch.ones(4), atol=1e-6)
        for b in range(4):
            support = set(np.flatnonzero(scores[b].numpy() > 0))
            allowed = {c for p in top[b, :k].tolist() for c in grid.children_of(p)}
            assert support <= allowed and support
            kept = torch.tensor(sorted(allowed))
            # conditioned on the kept parents: proportional to the exact product there
            assert torch.allclose(scores[b, kept], exact[b, kept] / exact[b, kept].sum(), atol=1e-6)


def test_training_computes_child_logits_of_requested_parents_only(grid: LabelSpace) -> None:
    torch.manual_seed(2)
    model = create_model(FACTORISED, grid.num_classes, grid.num_parents,
                         parent_of=grid.parent_of).train()  # fmt: skip
    criterion = create_loss(TrainConfig(loss="ce"), grid, head="factorised")
    y = torch.tensor([0, 5, 5, 40])
    kwargs = forward_inputs(criterion, y)
    assert torch.equal(kwargs["parents"], torch.as_tensor(grid.parent_of)[y][:, None])
    out = model(torch.randn(4, 3, 32, 32), **kwargs)
    assert out["target_child_logits"].shape == (4, 1, model.head.max_children)
    criterion(out, y).backward()
    touched = model.head.child_weight.grad.abs().sum(dim=(1, 2)) > 0
    assert set(np.flatnonzero(touched.numpy())) == set(grid.parent_of[y.numpy()].tolist())


def test_factorised_ce_is_the_negative_log_likelihood(grid: LabelSpace) -> None:
    torch.manual_seed(3)
    head = FactorisedHead(16, grid.parent_of, grid.num_parents).train()
    criterion = create_loss(TrainConfig(loss="ce"), grid, head="factorised")
    h = torch.randn(6, 16)
    y = torch.randint(0, grid.num_classes, (6,))
    loss = criterion(head(h, **forward_inputs(criterion, y)), y)
    (g_fact,) = torch.autograd.grad(loss, head.child_weight)
    nll = -exact_log_probs(head, h, grid).gather(1, y[:, None]).mean()
    (g_nll,) = torch.autograd.grad(nll, head.child_weight)
    assert abs(float(loss.detach()) - float(nll.detach())) < 1e-6
    assert torch.allclose(g_fact, g_nll, atol=1e-6)


def dense_factorised_geosoft(
    head: FactorisedHead, h: torch.Tensor, y: torch.Tensor, ls: LabelSpace, tau_km: float
) -> torch.Tensor:
    """The factorised GeoSoft loss from its definition, with dense (B, K) targets: the targets
    summed per parent against log P(parent), plus the targets among the true parent's children
    (renormalised) against log P(child | true parent)."""
    q = GeoSoftTargetLoss(ls.centroids_tensor(), tau_km).soft_targets(y)  # (B, K)
    parent_of = torch.as_tensor(ls.parent_of)
    per_parent = torch.zeros(len(y), ls.num_parents).index_add_(1, parent_of, q)
    parent_term = -(per_parent * F.log_softmax(head.parent(h), dim=1)).sum(dim=1)
    all_parents = torch.arange(ls.num_parents).expand(len(y), -1)
    log_child = F.log_softmax(head.child_logits(h, all_parents), dim=2)[:, parent_of, head.slot_of]
    sibling = parent_of[None, :] == parent_of[y][:, None]  # (B, K)
    q_sib = q * sibling / (q * sibling).sum(dim=1, keepdim=True)
    child_term = -(q_sib * log_child.masked_fill(~sibling, 0.0)).sum(dim=1)
    return (parent_term + child_term).mean()


@pytest.mark.parametrize("tau_km", [0.3, 1.4, 5.0])
def test_factorised_geosoft_matches_its_dense_definition(grid: LabelSpace, tau_km: float) -> None:
    """With every class a neighbour nothing is dropped: the sparse factorised loss equals its
    definition computed with dense targets, value and gradient (and scores the true parent's
    children only)."""
    torch.manual_seed(4)
    head = FactorisedHead(16, grid.parent_of, grid.num_parents).train()
    cfg = TrainConfig(loss="geosoft_sparse", geosoft_neighbours=grid.num_classes, tau_km=tau_km)
    criterion = create_loss(cfg, grid, head="factorised")
    assert criterion.neighbours.r == grid.num_classes
    h = torch.randn(8, 16, dtype=torch.float64)
    y = torch.randint(0, grid.num_classes, (8,))
    head = head.double()
    out = head(h, **forward_inputs(criterion, y))
    assert out["target_child_logits"].shape[1] == 1  # the true parent only
    loss = criterion(out, y)
    params = [head.child_weight, head.parent.weight]
    grads = torch.autograd.grad(loss, params)
    ref = dense_factorised_geosoft(head, h, y, grid, tau_km)
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-6)
    if tau_km >= 1.4:  # neighbours get real mass: the soft loss is not the likelihood
        nll = -exact_log_probs(head, h, grid).gather(1, y[:, None]).mean()
        assert abs(float(loss.detach()) - float(nll.detach())) > 1e-3


# ------------------------------------------------------------------------------------------
# sparse GeoSoft
# ------------------------------------------------------------------------------------------


def test_nearest_points_match_brute_force_distances() -> None:
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-80, 80, 300), rng.uniform(-180, 180, 300)
    nbr = nearest_points(lat, lon, 6)
    assert (nbr[:, 0] == np.arange(300)).all()
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    expected = np.sort(d, axis=1)[:, :6]
    assert np.allclose(np.take_along_axis(d, nbr, axis=1), expected, atol=1e-6)


def smallest_lossless_r(ls: LabelSpace, tau_km: float, dropped: float) -> int:
    """The fewest neighbours whose targets keep all but `dropped` of the mass, for every class."""
    for r in range(1, ls.num_classes + 1):
        kept = GeoSoftNeighbours(ls.centroids_tensor(), tau_km, r).kept_mass(ls.num_classes)
        if kept.min() >= 1.0 - dropped:
            return r
    return ls.num_classes


def test_sparse_geosoft_equals_dense_where_the_dropped_mass_is_negligible(
    grid: LabelSpace,
) -> None:
    tau = 0.3  # km: cells ~2.4 km apart, so the mass beyond a few rings is < 1e-7
    r = smallest_lossless_r(grid, tau, dropped=1e-7)
    assert r < grid.num_classes // 2  # really sparse
    sparse = SparseGeoSoftLoss(GeoSoftNeighbours(grid.centroids_tensor(), tau, r))
    dense = GeoSoftTargetLoss(grid.centroids_tensor(), tau)
    torch.manual_seed(5)
    # float64 logits: the comparison is about the targets, not float32 rounding of a sum of K
    z = torch.randn(16, grid.num_classes, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, grid.num_classes, (16,))
    (g_sparse,) = torch.autograd.grad(s := sparse(z, y), z)
    (g_dense,) = torch.autograd.grad(d := dense(z, y), z)
    assert abs(float(s.detach()) - float(d.detach())) < 1e-6
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)
    # few neighbours drop real mass: then the losses differ (the comparison can fail)
    coarse = SparseGeoSoftLoss(GeoSoftNeighbours(grid.centroids_tensor(), 3.0, 3))
    assert coarse.neighbours.kept_mass().min() < 0.9
    coarse_dense = GeoSoftTargetLoss(grid.centroids_tensor(), 3.0)
    assert abs(float(coarse(z, y).detach()) - float(coarse_dense(z, y).detach())) > 1e-3


def test_sparse_geosoft_targets_are_b_by_r(grid: LabelSpace) -> None:
    nbrs = GeoSoftNeighbours(grid.centroids_tensor(), 1.4, 7)
    assert tuple(nbrs.nbr.shape) == (grid.num_classes, 7) and nbrs.nbr.dtype == torch.int32
    idx, q = nbrs.targets(torch.tensor([3, 9]))
    assert idx.shape == q.shape == (2, 7)
    assert (idx[:, 0] == torch.tensor([3, 9])).all() and (q[:, 0] == q.max(dim=1).values).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(2))


def test_sparse_geosoft_class_weights_weigh_samples(grid: LabelSpace) -> None:
    weights = torch.ones(grid.num_classes)
    weights[0] = 3.0
    cfg = TrainConfig(loss="geosoft_sparse", geosoft_neighbours=8)
    weighted = create_loss(cfg, grid, weights)
    plain = create_loss(cfg, grid)
    z = torch.randn(2, grid.num_classes)
    y = torch.tensor([0, 1])
    per_sample = torch.stack([plain(z[i : i + 1], y[i : i + 1]) for i in range(2)])
    assert torch.allclose(weighted(z, y), (3 * per_sample[0] + per_sample[1]) / 4, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "geosoft_sparse"])
def test_factorised_class_weights_weigh_samples(grid: LabelSpace, loss: str) -> None:
    """`train.class_weighting` reaches the factorised loss: a weighted mean of per-sample losses."""
    torch.manual_seed(5)
    head = FactorisedHead(16, grid.parent_of, grid.num_parents).train()
    weights = torch.ones(grid.num_classes)
    weights[0] = 3.0
    cfg = TrainConfig(loss=loss, geosoft_neighbours=8)
    weighted = create_loss(cfg, grid, weights, head="factorised")
    plain = create_loss(cfg, grid, head="factorised")
    h, y = torch.randn(2, 16), torch.tensor([0, 40])
    per_sample = torch.stack(
        [plain(head(h[i : i + 1], **forward_inputs(plain, y[i : i + 1])), y[i : i + 1])
         for i in range(2)]
    )  # fmt: skip
    got = weighted(head(h, **forward_inputs(weighted, y)), y)
    assert torch.allclose(got, (3 * per_sample[0] + per_sample[1]) / 4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# bad input and compatibility
# ------------------------------------------------------------------------------------------


def test_factorised_head_without_parent_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.head=factorised.*parent_resolution"):
        create_model(FACTORISED, num_classes=5, num_parents=None)


def test_unknown_head_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="factorised, flat"):
        create_model(TINY_MODEL_CONFIG.model_copy(update={"head": "tree"}), 5, 2)


def test_factorised_head_refuses_dense_geosoft_and_label_smoothing(grid: LabelSpace) -> None:
    with pytest.raises(ConfigError, match="geosoft_sparse"):
        create_loss(TrainConfig(loss="geosoft"), grid, head="factorised")
    with pytest.raises(ConfigError, match="label_smoothing"):
        create_loss(TrainConfig(loss="ce", label_smoothing=0.1), grid, head="factorised")


def test_factorised_head_needs_hierarchy_on() -> None:
    with pytest.raises(ConfigError, match="model.hierarchy=true"):
        load_config(None, {"model.head": "factorised", "model.hierarchy": False})
    assert ModelConfig(head="factorised").hierarchy


@pytest.mark.parametrize(("res", "parent"), [(7, 7), (3, 4), (0, 0)])
def test_parent_resolution_must_be_coarser(res: int, parent: int) -> None:
    with pytest.raises(ConfigError, match="parent_resolution .* must be coarser"):
        load_config(None, {"resolution": res, "parent_resolution": parent}, model=IndexConfig)


def test_flat_checkpoints_from_before_the_head_registry_still_load() -> None:
    model = create_model(TINY_MODEL_CONFIG, num_classes=5, num_parents=2)
    state = model.state_dict()
    old = {
        k.replace("head.classifier.", "head.").replace("head.parent.", "parent_head."): v
        for k, v in state.items()
    }
    assert "head.weight" in old and "parent_head.weight" in old
    fresh = create_model(TINY_MODEL_CONFIG, num_classes=5, num_parents=2)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.head.classifier.weight, model.head.classifier.weight)
    assert torch.equal(fresh.head.parent.weight, model.head.parent.weight)


def test_rerank_chooses_the_fewest_parents_that_score_best_on_val(grid: LabelSpace) -> None:
    """The factorised head's k is chosen on val: one parent is not enough when the parent head
    ranks the true parent second; two are, and more change nothing (so two win the tie)."""
    from geoloc.infer.outputs import SplitOutputs
    from geoloc.infer.tuning import choose_topk_parents

    rng = np.random.default_rng(0)
    table = child_table(grid.parent_of, grid.num_parents)
    n, scored = 60, 5
    y = rng.integers(0, grid.num_classes, n)
    true_parent = grid.parent_of[y]
    parent_logits = np.full((n, grid.num_parents), -5.0, dtype=np.float32)
    child_parents = np.zeros((n, scored), dtype=np.int64)
    for i in range(n):
        # wrong parents with several children: each of them gets a low P(child | parent)
        others = [p for p in range(grid.num_parents)
                  if p != true_parent[i] and table.mask[p].sum() >= 4]  # fmt: skip
        wrong = rng.choice(others, size=scored - 1, replace=False)
        tricky = i % 2 == 0  # the parent head prefers a wrong parent, narrowly
        order = [wrong[0], true_parent[i], *wrong[1:]] if tricky else [true_parent[i], *wrong]
        child_parents[i] = order
        parent_logits[i, order[0]], parent_logits[i, order[1]] = 1.0, 0.8
    child_logits = np.where(table.mask[child_parents], 0.0, -np.inf).astype(np.float32)
    slot = np.flatnonzero(child_parents == true_parent[:, None]) % scored
    child_logits[np.arange(n), slot, table.slot_of[y]] = 5.0
    val = SplitOutputs(
        logits=None, parent_logits=parent_logits, embeddings=np.zeros((n, 4), np.float32),
        labels=y, lat=grid.lat[y] + 1e-3, lon=grid.lon[y], image_ids=np.arange(n).astype(str),
        child_logits=child_logits, child_parents=child_parents,
        child_classes=table.children[child_parents],
    )  # fmt: skip
    k, k_table = choose_topk_parents(val, grid)
    assert k == 2
    top1 = dict(zip(k_table["k"], k_table["top1"], strict=True))
    assert top1[1] == pytest.approx(0.5) and top1[2] == top1[5] == 1.0
