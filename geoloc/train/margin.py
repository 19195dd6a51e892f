"""`hardneg.mode=margin`: class prototypes and far negatives carried from epoch to epoch.

Each training epoch accumulates, per class, the sum of its images' L2-normalised embeddings
(detached; a `PrototypeTally`, which a mid-epoch checkpoint carries). At the epoch's end they
become the class prototypes (`Prototypes`) the next epoch uses, and the train split's
training-time predictions become its far negatives (`geoloc.geo.mine_far_negatives`). From
`hardneg.start_epoch` on, `MarginTerm` adds `margin_weight x prototype_margin_loss` to every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from geoloc.config import HardNegConfig
from geoloc.errors import GeolocError
from geoloc.geo import FarNegatives, LabelSpace, mine_far_negatives
from geoloc.model.margin_loss import prototype_margin_loss

log = logging.getLogger(__name__)


@dataclass
class PrototypeTally:
    """One epoch's running sums: what becomes next epoch's prototypes, and the term's total."""

    sums: np.ndarray  # (C, D) float64 sums of unit embeddings; (C, 0) before the first step
    counts: np.ndarray  # (C,) int64 images summed per class
    term_sum: float = 0.0  # sum over images of the weighted margin term added to the loss

    @classmethod
    def empty(cls, num_classes: int) -> PrototypeTally:
        return cls(np.zeros((num_classes, 0)), np.zeros(num_classes, dtype=np.int64))

    def add(self, unit: np.ndarray, labels: np.ndarray) -> None:
        """Add (B, D) unit embeddings of images with these labels (float64, order-exact)."""
        if self.sums.shape[1] != unit.shape[1]:
            if self.counts.any():
                raise GeolocError(f"prototype sums have width {self.sums.shape[1]}, "
                                  f"embeddings {unit.shape[1]}")  # fmt: skip
            self.sums = np.zeros((len(self.counts), unit.shape[1]))
        np.add.at(self.sums, labels, unit)
        np.add.at(self.counts, labels, 1)

    def zeros(self) -> PrototypeTally:
        """The same shape, nothing summed (a DDP rank that is not the one carrying totals)."""
        return PrototypeTally(np.zeros_like(self.sums), np.zeros_like(self.counts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sums": torch.from_numpy(self.sums.copy()),
            "counts": torch.from_numpy(self.counts.copy()),
            "term_sum": self.term_sum,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PrototypeTally:
        return cls(doc["sums"].numpy().copy(), doc["counts"].numpy().copy(),
                   float(doc["term_sum"]))  # fmt: skip


@dataclass(frozen=True)
class Prototypes:
    """Per-class unit mean embedding; a class not seen in an epoch keeps its previous one."""

    vectors: np.ndarray  # (C, D) float32 unit rows (zero where absent)
    present: np.ndarray  # (C,) bool

    @classmethod
    def updated(cls, previous: Prototypes | None, tally: PrototypeTally) -> Prototypes | None:
        """The prototypes after an epoch: `previous`, replaced for each class seen in it."""
        if tally.sums.shape[1] == 0:
            return previous
        norms = np.linalg.norm(tally.sums, axis=1)  # (C,)
        seen = (tally.counts > 0) & (norms > 1e-12)
        fresh = np.zeros(tally.sums.shape, dtype=np.float32)
        fresh[seen] = tally.sums[seen] / norms[seen, None]
        if previous is None or previous.vectors.shape != fresh.shape:
            return cls(fresh, seen)
        vectors = np.where(seen[:, None], fresh, previous.vectors).astype(np.float32)
        return cls(vectors, seen | previous.present)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"vectors": torch.from_numpy(self.vectors.copy()),
                "present": torch.from_numpy(self.present.copy())}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Prototypes:
        return cls(doc["vectors"].numpy().copy(), doc["present"].numpy().copy())


class MarginTerm:
    """What `train_one_epoch` calls each step in margin mode: accumulate the prototypes and,
    once there are prototypes and negatives, return the weighted margin term for the loss."""

    def __init__(
        self,
        num_classes: int,
        cfg: HardNegConfig,
        device: torch.device,
        prototypes: Prototypes | None = None,
        negatives: FarNegatives | None = None,
    ) -> None:
        self.num_classes, self.margin, self.weight = num_classes, cfg.margin, cfg.margin_weight
        self.tally = PrototypeTally.empty(num_classes)
        self._tables: tuple[torch.Tensor, ...] | None = None
        if prototypes is not None and negatives is not None and negatives.num_pairs:
            self._tables = (
                torch.from_numpy(prototypes.vectors).to(device),  # (C, D)
                torch.from_numpy(prototypes.present).to(device),  # (C,)
                torch.from_numpy(negatives.classes).to(device),  # (C, N)
                torch.from_numpy(negatives.weights).to(device),  # (C, N)
            )

    @property
    def active(self) -> bool:
        """Does this epoch add the term (or only accumulate prototypes)?"""
        return self._tables is not None

    def begin(self, tally: PrototypeTally | None) -> None:
        """Start the epoch's sums afresh, or from a mid-epoch checkpoint's `tally`."""
        self.tally = PrototypeTally.empty(self.num_classes) if tally is None else PrototypeTally(
            tally.sums.copy(), tally.counts.copy(), tally.term_sum)  # fmt: skip

    def __call__(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor | None:
        """Accumulate this batch's embeddings; the weighted term (a 0-d tensor) or None."""
        embedding = outputs.get("embedding")
        if embedding is None:
            raise GeolocError("hardneg.mode=margin needs a model whose outputs carry 'embedding'")
        unit = F.normalize(embedding.detach().float(), dim=1)
        # on the host in float64: sums in a fixed order, so reruns and resumes are bit-equal
        self.tally.add(unit.double().cpu().numpy(), labels.cpu().numpy())
        if self._tables is None:
            return None
        term = self.weight * prototype_margin_loss(embedding, labels, *self._tables, self.margin)
        self.tally.term_sum += float(term.detach()) * labels.shape[0]
        return term


def epoch_margin_term(
    cfg: HardNegConfig,
    epoch_index: int,
    train_labels: np.ndarray,
    train_preds: np.ndarray | None,
    prototypes: Prototypes | None,
    label_space: LabelSpace,
    device: torch.device,
) -> MarginTerm | None:
    """The epoch's `MarginTerm` (None unless `hardneg` is on in margin mode).

    Negatives are mined from `train_labels` and `train_preds`, the train split's previous-epoch
    training-time predictions (`FitState.pool_pred_labels`), from `start_epoch` on: the
    validation split never reaches the miner.
    """
    if not (cfg.enabled and cfg.mode == "margin"):
        return None
    negatives = None
    if epoch_index >= cfg.start_epoch and train_preds is not None and prototypes is not None:
        negatives = mine_far_negatives(train_labels, train_preds, label_space, cfg)
        log.info("epoch %d: %d far hard-negative pairs over %d classes", epoch_index + 1,
                 negatives.num_pairs, int((negatives.classes >= 0).any(axis=1).sum()))  # fmt: skip
    return MarginTerm(label_space.num_classes, cfg, device, prototypes, negatives)
