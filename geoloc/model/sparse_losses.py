"""Losses that never build (B, K) targets: sparse GeoSoft and the factorised head's objective.

GeoSoft's target for true class y is q_k ∝ exp(-d(c_y, c_k) / tau). All but the cells near y get
a negligible share, so `GeoSoftNeighbours` keeps only each class's r nearest classes (a k-d tree
over the class centroids, built once per label space: O(K x r) int32) and renormalises q over
them. Per batch that is O(B x r) memory and time for the targets instead of O(B x K).

- `SparseGeoSoftLoss` (`train.loss=geosoft_sparse`, flat head): logsumexp(z) - sum_j q_j z_{n_j}
  with a hand-written backward: besides the logits it keeps one (B, K) softmax, as
  cross-entropy does.
- `FactorisedLoss` (factorised head, `ce` or `geosoft_sparse`): the same soft cross-entropy
  against the model's class distribution P(k) = P(parent(k)) x P(k | parent(k)):
  -sum_j q_j [log P(parent(n_j)) + log P(n_j | parent(n_j))]. It needs child logits only for the
  parents of the r neighbour cells (`head_parents`), which the model computes on request. With
  `ce` (r = 1) this is the exact negative log-likelihood, CE(parent) + CE(child | true parent).
  When the neighbours hold all the target mass it equals dense GeoSoft applied to log P.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from geoloc.config import TrainConfig
from geoloc.errors import ConfigError, GeolocError
from geoloc.geo import LabelSpace, chord_arc_km, nearest_points, pairwise_haversine_km, unit_vectors
from geoloc.model.heads import child_table
from geoloc.model.soft_targets import at_least_float32, default_tau_km, sample_weights

__all__ = [
    "FactorisedLoss",
    "GeoSoftNeighbours",
    "SparseGeoSoftLoss",
]

log = logging.getLogger(__name__)


class GeoSoftNeighbours(nn.Module):
    """Each class's `r` nearest classes (itself first) and its GeoSoft targets over them."""

    def __init__(self, centroids: torch.Tensor, tau_km: float, r: int) -> None:
        super().__init__()
        if centroids.ndim != 2 or centroids.shape[1] != 2:
            raise GeolocError(
                f"GeoSoft centroids must be (K, 2) lat/lon, got {tuple(centroids.shape)}"
            )
        if not tau_km > 0:
            raise ConfigError(f"GeoSoft tau_km must be > 0, got {tau_km}")
        self.tau_km = float(tau_km)
        c = centroids.detach().float().cpu()
        nbr = nearest_points(c[:, 0].double().numpy(), c[:, 1].double().numpy(), r)
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


@dataclass
class _Request:
    """Per batch: the parents to score and where each neighbour class sits among them."""

    parents: torch.Tensor  # (B, R) distinct parents of the neighbours (padding repeats one)
    position: torch.Tensor  # (B, r) index into the flattened (R, C) child grid
    q: torch.Tensor  # (B, r) target weights


class FactorisedLoss(nn.Module):
    """Soft cross-entropy of P(parent) x P(child | parent) against GeoSoft (or one-hot) targets.

    `neighbours=None` is cross-entropy: the true class only, so only the true parent's children
    are scored. With neighbours, the parents of the r nearest classes are scored (a handful:
    R <= r, ~4-10 for r = 64 on a full r7 grid).
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
        self.max_children = table.max_children
        self.neighbours = neighbours
        self.register_buffer("parent_of", torch.as_tensor(parent_of, dtype=torch.long),
                             persistent=False)  # fmt: skip
        self.register_buffer("slot_of", torch.from_numpy(table.slot_of), persistent=False)
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

    @torch.no_grad()
    def request(self, targets: torch.Tensor) -> _Request:
        """The parents whose children the loss needs for these targets, and the target layout."""
        targets = targets.to(device=self.parent_of.device, dtype=torch.long)
        if self.neighbours is None:
            nbr = targets[:, None]
            q = torch.ones(nbr.shape, device=targets.device)
        else:
            nbr, q = self.neighbours.targets(targets)
        par = self.parent_of[nbr]  # (B, r)
        ordered, order = par.sort(dim=1, stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        rank_sorted = first.long().cumsum(dim=1) - 1  # distinct-parent index, in sorted order
        width = int(rank_sorted[:, -1].max()) + 1  # R: most distinct parents in this batch
        parents = ordered[:, :1].repeat(1, width).scatter_(1, rank_sorted, ordered)
        rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
        return _Request(parents, rank * self.max_children + self.slot_of[nbr], q)

    def head_parents(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, R) parents to pass to the factorised head's forward (`parents=`)."""
        return self.request(targets).parents

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if "target_child_logits" not in outputs:
            raise GeolocError(
                "the factorised loss needs child logits for the requested parents: call the "
                "model with parents=criterion.head_parents(labels)"
            )
        targets = targets.to(device=outputs["parent_logits"].device, dtype=torch.long)
        req = self.request(targets)
        if not torch.equal(req.parents, outputs["target_parents"]):
            raise GeolocError("the model scored other parents than the loss asked for")
        log_parent = F.log_softmax(outputs["parent_logits"].float(), dim=1)  # (B, P)
        log_child = F.log_softmax(outputs["target_child_logits"].float(), dim=2)  # (B, R, C)
        log_p = log_parent.gather(1, req.parents)[:, :, None] + log_child  # (B, R, C)
        log_target = log_p.flatten(1).gather(1, req.position)  # (B, r)
        nll = -(req.q * log_target).sum(dim=1)  # (B,)
        return (nll * sample_weights(self.class_weights, targets)).sum()
