"""Losses that never build (B, K) targets: sparse GeoSoft and the factorised head's objective.

GeoSoft's target for true class y is q_k ∝ exp(-d(c_y, c_k) / tau). All but the cells near y get
a negligible share, so `GeoSoftNeighbours` keeps only each class's r nearest classes (a k-d tree
over the class centroids, built once per label space: O(K x r) int32) and renormalises q over
them. Per batch that is O(B x r) memory and time for the targets instead of O(B x K).

- `SparseGeoSoftLoss` (`train.loss=geosoft_sparse`, flat head): logsumexp(z) - sum_j q_j z_{n_j}
  with a hand-written backward: besides the logits it keeps one (B, K) softmax, as
  cross-entropy does.
- `FactorisedLoss` (factorised head, `ce` or `geosoft_sparse`): the parent level is trained on
  the targets summed per parent, the child level on the targets among the true parent's
  children, so child logits are needed for the true parent only. With `ce` it is the exact
  negative log-likelihood, CE(parent) + CE(child | true parent).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from geoloc.config import TrainConfig
from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace, chord_arc_km, nearest_points, pairwise_haversine_km, unit_vectors
from geoloc.model.heads import child_table
from geoloc.model.soft_targets import (
    at_least_float32,
    check_geosoft_inputs,
    default_tau_km,
    sample_weights,
)
from geoloc.model.sparse_rows import BlockTree

__all__ = [
    "FactorisedLoss",
    "GeoSoftNeighbours",
    "SparseGeoSoftLoss",
]

log = logging.getLogger(__name__)


class GeoSoftNeighbours(nn.Module):
    """Each class's `r` nearest classes (itself first) and its GeoSoft targets over them."""

    def __init__(
        self, centroids: torch.Tensor, tau_km: float, r: int, nbr: np.ndarray | None = None
    ) -> None:
        """`nbr` (K, >= r) precomputed `nearest_points` (e.g. cached); else built here."""
        super().__init__()
        check_geosoft_inputs(centroids, tau_km)
        self.tau_km = float(tau_km)
        c = centroids.detach().float().cpu()
        if nbr is None:
            nbr = nearest_points(c[:, 0].double().numpy(), c[:, 1].double().numpy(), r)
        nbr = np.asarray(nbr)[:, : min(r, c.shape[0])]
        # not saved in state dicts: rebuilt from the label space
        self.register_buffer("nbr", torch.from_numpy(nbr.astype(np.int32)), persistent=False)
        self.register_buffer("units", unit_vectors(c[:, 0], c[:, 1]), persistent=False)
        self.register_buffer("centroids", c, persistent=False)

    @classmethod
    def from_config(cls, cfg: TrainConfig, label_space: LabelSpace) -> GeoSoftNeighbours:
        tau = cfg.tau_km if cfg.tau_km is not None else default_tau_km(label_space.resolution)
        nbrs = cls(label_space.centroids_tensor(), tau, cfg.geosoft_neighbours)
        kept = nbrs.kept_mass()
        log.info(
            "geosoft_sparse: %d neighbours per class keep %.4f%% of the dense target mass "
            "(median over %d classes; worst %.4f%%)",
            nbrs.r, 100 * float(np.median(kept)), kept.size, 100 * float(kept.min()),
        )  # fmt: skip
        return nbrs

    @property
    def r(self) -> int:
        return int(self.nbr.shape[1])

    @torch.no_grad()
    def targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) classes -> neighbours (B, r) int64 and targets q (B, r) (rows sum to 1)."""
        nbr = self.nbr[y].long()  # (B, r)
        d = chord_arc_km(self.units[y][:, None, :], self.units[nbr])  # (B, r) km
        return nbr, torch.softmax(d.mul_(-1.0 / self.tau_km), dim=1)

    @torch.no_grad()
    def kept_mass(self, sample: int = 64, seed: int = 0, chunk: int = 16) -> np.ndarray:
        """Share of the dense GeoSoft target mass the neighbours hold, for sampled classes.

        1.0 means sparse and dense targets agree; what is missing is renormalised away.
        """
        k = self.centroids.shape[0]
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(k, size=min(sample, k), replace=False))
        c = self.centroids
        kept = []
        for start in range(0, rows.size, chunk):
            y = torch.from_numpy(rows[start : start + chunk])
            d = pairwise_haversine_km(c[y, 0], c[y, 1], c[:, 0], c[:, 1])  # (b, K)
            mass = d.sub_(d.gather(1, y[:, None])).mul_(-1.0 / self.tau_km).exp_()
            near = mass.gather(1, self.nbr[y].long()).double().sum(dim=1)
            kept.append((near / mass.double().sum(dim=1)).numpy())
        return np.concatenate(kept)


# --------------------------------------------------------------------------------------------
# flat head
# --------------------------------------------------------------------------------------------


class _SparseSoftTargetCrossEntropy(torch.autograd.Function):
    """sum_b w_b (logsumexp(z_b) - sum_j q_bj z_b,n_bj), gradient w_b (softmax(z_b) - q_b).

    Forward keeps softmax(z) (one (B, K) buffer, like cross-entropy) and backward turns it into
    the gradient in place by scattering -q into it. logsumexp comes from the softmax at the row
    maximum, which is >= 1/K, so its log is exact to float32 rounding.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, nbr: torch.Tensor, q: torch.Tensor, w: torch.Tensor):  # type: ignore[override]
        zmax, arg = z.max(dim=1, keepdim=True)  # (B, 1)
        p = torch.softmax(z, dim=1)  # (B, K)
        lse = (zmax - p.gather(1, arg).log()).view(-1)  # (B,)
        dot = (z.gather(1, nbr) * q).sum(dim=1)  # (B,)
        ctx.save_for_backward(p, nbr, q, w)
        return ((lse - dot) * w).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        p, nbr, q, w = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = p.scatter_add_(1, nbr, -q).mul_((w * grad_out)[:, None])
        return grad, None, None, None


class SparseGeoSoftLoss(nn.Module):
    """GeoSoft over each true class's r nearest classes, for (B, K) logits of a flat head.

    Equal to `GeoSoftTargetLoss` up to the target mass beyond the r neighbours (see
    `GeoSoftNeighbours.kept_mass`); per-class weights act as in cross-entropy.
    """

    def __init__(self, neighbours: GeoSoftNeighbours, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.neighbours = neighbours
        weights = None if class_weights is None else class_weights.detach().float().clone()
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = self.neighbours.nbr.shape[0]
        if logits.ndim != 2 or logits.shape[1] != k:
            raise GeolocError(f"GeoSoft logits must be (B, {k}), got {tuple(logits.shape)}")
        targets = targets.to(device=logits.device, dtype=torch.long)
        nbr, q = self.neighbours.targets(targets)
        w = sample_weights(self.class_weights, targets)
        z = at_least_float32(logits)
        return _SparseSoftTargetCrossEntropy.apply(z, nbr, q.to(z.dtype), w.to(z.dtype))


# --------------------------------------------------------------------------------------------
# factorised head
# --------------------------------------------------------------------------------------------


class FactorisedLoss(nn.Module):
    """GeoSoft (or cross-entropy) for P(parent) x P(child | parent): a parent and a child term.

    With q the targets over the true class y's r nearest classes n_j (one-hot for `ce`):

      parent term  -sum_j q_j log P(parent(n_j))          the targets' marginal over parents
      child term   -sum_j q~_j log P(n_j | parent(y))     q~: q on y's siblings, renormalised

    so child logits are needed for the true parent only (`head_parents`). With `ce` the sum is
    the exact negative log-likelihood -log P(y) of the product distribution. With GeoSoft the
    parent level gets the dense loss's targets summed per parent (exact up to the mass beyond
    the r neighbours) and the child level the distance-soft targets among the siblings; the
    neighbour cells under other parents reach the model through their parent's share only
    (scoring their own children would cost R x C x D more per sample).
    """

    def __init__(
        self,
        parent_of: np.ndarray,
        num_parents: int,
        neighbours: GeoSoftNeighbours | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        table = child_table(parent_of, num_parents)
        self.neighbours = neighbours
        self.register_buffer("parent_of", torch.as_tensor(parent_of, dtype=torch.long),
                             persistent=False)  # fmt: skip
        self.register_buffer("slot_of", torch.from_numpy(table.slot_of), persistent=False)
        self.tree = BlockTree.for_parents(num_parents)  # used by sparse heads only
        weights = None if class_weights is None else class_weights.detach().float().clone()
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def for_label_space(
        cls,
        label_space: LabelSpace,
        neighbours: GeoSoftNeighbours | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> FactorisedLoss:
        return cls(label_space.parent_of, label_space.num_parents, neighbours, class_weights)

    def head_parents(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, 1): the true parents, whose children the head must score (`parents=`)."""
        return self.parent_of[targets.to(self.parent_of.device, torch.long)][:, None]

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if "target_child_logits" not in outputs:
            raise GeolocError(
                "the factorised loss needs child logits of the true parents: call the model "
                "with parents=criterion.head_parents(labels)"
            )
        targets = targets.to(device=outputs["target_child_logits"].device, dtype=torch.long)
        true_parent = self.parent_of[targets][:, None]  # (B, 1)
        if not torch.equal(outputs["target_parents"], true_parent):
            raise GeolocError("the model scored other parents than the loss asked for")
        if self.neighbours is None:
            nbr, q = targets[:, None], torch.ones(targets.shape[0], 1, device=targets.device)
        else:
            nbr, q = self.neighbours.targets(targets)  # (B, r)
        par = self.parent_of[nbr]  # (B, r)
        if "tree_logits" in outputs:
            parent_term = self._tree_parent_term(outputs["tree_logits"], par, true_parent, q)
        else:
            log_parent = F.log_softmax(at_least_float32(outputs["parent_logits"]), dim=1)
            parent_term = -(q * log_parent.gather(1, par)).sum(dim=1)  # (B,)
        sibling = par == true_parent  # (B, r); the true class itself always is one
        log_child = F.log_softmax(at_least_float32(outputs["target_child_logits"][:, 0]), dim=1)
        child_term = _restricted_nll(log_child, self.slot_of[nbr], sibling, q)  # (B,)
        return ((parent_term + child_term) * sample_weights(self.class_weights, targets)).sum()

    def _tree_parent_term(
        self, tree_logits: list[torch.Tensor], par: torch.Tensor, true_parent: torch.Tensor,
        q: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The parent term of a sparse head (`BlockTree`): the targets summed per top node,
        then at each level the targets inside the true path's block, renormalised (exact
        -log P(parent(y)) for `ce`)."""
        tree = self.tree
        if len(tree_logits) != tree.depth or tree_logits[0].shape[1] != tree.sizes[0]:
            raise GeolocError("the model's parent tree is not the one the loss expects")
        top = F.log_softmax(at_least_float32(tree_logits[0]), dim=1)  # (B, n0)
        term = -(q * top.gather(1, tree.ancestor(par, 0))).sum(dim=1)
        for level in range(1, tree.depth):
            same = tree.ancestor(par, level - 1) == tree.ancestor(true_parent, level - 1)
            log_p = F.log_softmax(at_least_float32(tree_logits[level]), dim=1)  # (B, G)
            term = term + _restricted_nll(log_p, tree.slot(par, level), same, q)
        return term


def _restricted_nll(
    log_p: torch.Tensor, slots: torch.Tensor, inside: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """-sum_j q~_j log_p[slot_j] over the targets `inside` one block (q~: q there, renormalised;
    the true class is always inside). (B, W) log-probs, (B, r) slots/inside/q -> (B,)."""
    q_in = q * inside
    q_in = q_in / q_in.sum(dim=1, keepdim=True)
    return -(q_in * log_p.gather(1, slots).masked_fill(~inside, 0.0)).sum(dim=1)
