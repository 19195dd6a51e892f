"""Classifier heads, chosen by `ModelConfig.head` through the head registry.

A head maps the (B, D) embedding (after dropout) to the outputs that losses and
`geoloc.model.scores.class_scores` read:

- `flat`: one linear layer over all K classes, plus a parent layer when `model.hierarchy` is on.
  Outputs `logits` (B, K) and `parent_logits` (B, P). Per sample it costs K x D.
- `factorised`: P(class) = P(parent) x P(class | parent). A parent layer over the P occupied
  parent cells and, for each parent, a small table over its own children (padded to the most
  children any parent has, C: 7 for r7 cells under r6 ones). Child logits are computed only for
  the parents that matter, so the child part costs R x C x D per sample, not K x D:
  while training for the parents the loss asks for (`parents`: the true one), at inference for
  the `topk_parents` best parents.
  Outputs `parent_logits` (B, P); for the scored parents `child_logits` (B, k, C) (padding is
  -inf), `child_parents` (B, k) (best first, so the first k' of them are the top k') and
  `child_classes` (B, k, C) (class of each slot); with `parents`, `target_child_logits`
  (B, R, C) and `target_parents` (B, R).
  In training mode only the best parent is scored (under no_grad, for the training-time
  predictions); `topk_parents=0` scores every parent (exact, but K x D per sample again).

A new head is one function decorated with `@register_head(name)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.errors import ConfigError, DataError
from geoloc.model.registry import Registry
from geoloc.model.sparse_rows import BlockTree, gather_rows

__all__ = [
    "HEADS",
    "ChildTable",
    "FactorisedHead",
    "FlatHead",
    "HeadSpec",
    "child_table",
    "create_head",
    "head_names",
    "register_head",
    "use_dense_gradients",
]


@dataclass(frozen=True)
class HeadSpec:
    """What a head needs to know about the label space."""

    num_classes: int
    num_parents: int | None = None  # None: the index has no parent level for this model
    parent_of: np.ndarray | None = None  # (K,) parent index of each class
    topk_parents: int = 0  # parents scored at inference (factorised head; 0: all)


HeadBuilder = Callable[[ModelConfig, int, HeadSpec], nn.Module]
"""(model config, embedding size D, label-space spec) -> head module `(h, parents=None) -> dict`."""

HEADS: Registry[HeadBuilder] = Registry("model head")
"""Head builders by `ModelConfig.head`; this module registers the built-in ones."""


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Register a head builder `(cfg, embed_dim, spec) -> nn.Module` under `name`."""
    return HEADS.register(name)


def head_names() -> list[str]:
    """Every registered `model.head`, sorted."""
    return HEADS.names()


def create_head(cfg: ModelConfig, embed_dim: int, spec: HeadSpec) -> nn.Module:
    """The head `cfg.head` names; unknown names raise `ConfigError` listing the valid ones."""
    return HEADS.get(cfg.head)(cfg, embed_dim, spec)


# --------------------------------------------------------------------------------------------
# flat
# --------------------------------------------------------------------------------------------


class FlatHead(nn.Module):
    """One linear layer over all classes (+ an independent parent layer)."""

    def __init__(self, embed_dim: int, num_classes: int, num_parents: int | None = None) -> None:
        super().__init__()
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.parent = nn.Linear(embed_dim, num_parents) if num_parents else None

    @property
    def has_parent_head(self) -> bool:
        return self.parent is not None

    def forward(self, h: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, Any]:
        out = {"logits": self.classifier(h)}  # (B, K)
        if self.parent is not None:
            out["parent_logits"] = self.parent(h)  # (B, P)
        return out


@register_head("flat")
def _flat(cfg: ModelConfig, embed_dim: int, spec: HeadSpec) -> nn.Module:
    return FlatHead(embed_dim, spec.num_classes, spec.num_parents if cfg.hierarchy else None)


# --------------------------------------------------------------------------------------------
# factorised
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildTable:
    """Each parent's children in slots 0..C-1 (C: the most children any parent has)."""

    children: np.ndarray  # (P, C) int64 class index per slot; padding repeats slot 0
    mask: np.ndarray  # (P, C) bool: True for a real child
    slot_of: np.ndarray  # (K,) int64: each class's slot within its parent

    @property
    def max_children(self) -> int:
        return int(self.children.shape[1])


def child_table(parent_of: np.ndarray, num_parents: int) -> ChildTable:
    """Slots of every class under its parent, in class order (vectorised; fine at K = 10^6)."""
    parent_of = np.asarray(parent_of, dtype=np.int64)
    k = parent_of.shape[0]
    counts = np.bincount(parent_of, minlength=num_parents)
    if counts.shape[0] != num_parents or (counts == 0).any():
        empty = np.flatnonzero(counts == 0)[:5].tolist() if counts.shape[0] == num_parents else []
        raise DataError(
            f"the label space's parent map does not cover parents 0..{num_parents - 1} with at "
            f"least one class each (childless parents: {empty}); rebuild the index"
        )
    order = np.argsort(parent_of, kind="stable")
    sorted_parents = parent_of[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slots_sorted = np.arange(k) - starts[sorted_parents]
    slot_of = np.empty(k, dtype=np.int64)
    slot_of[order] = slots_sorted
    width = int(counts.max())
    children = np.repeat(order[starts][:, None], width, axis=1)  # pad with each parent's first
    children[sorted_parents, slots_sorted] = order
    mask = np.zeros((num_parents, width), dtype=bool)
    mask[sorted_parents, slots_sorted] = True
    return ChildTable(children, mask, slot_of)


class FactorisedHead(nn.Module):
    """P(parent) x P(child | parent), child logits only for the parents asked for.

    Parameters: a parent layer (P x D) and one (C x D) child table per parent, stored as one
    (P, C, D) tensor and gathered per sample. See the module docstring for the outputs.

    `sparse` (`model.sparse_head`): the parent level is itself a `BlockTree` (a top layer and
    one (G, D) table per block, gathered like the child tables) and every gathered table gets a
    row-sparse gradient, so that a training step costs the same at K = 10^3 and 10^6. In training
    mode the outputs then carry `tree_logits` (the top layer's (B, n0) logits, then (B, G) for
    each level's true block) instead of `parent_logits`, and `child_parent_logp` (B, 1), the
    log-probability of the greedily chosen parent; at inference `parent_logits` (B, P) are the
    tree's exact log-probabilities.
    """

    def __init__(
        self,
        embed_dim: int,
        parent_of: np.ndarray,
        num_parents: int,
        topk_parents: int = 0,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        table = child_table(parent_of, num_parents)
        self.num_classes = int(len(parent_of))
        self.num_parents = int(num_parents)
        self.max_children = table.max_children
        self.topk_parents = int(topk_parents)
        self.sparse = bool(sparse)
        self.sparse_grads = self.sparse  # off under DDP (`use_dense_gradients`)
        self.tree = BlockTree.for_parents(self.num_parents) if self.sparse else None
        if self.tree is None:
            self.parent = nn.Linear(embed_dim, num_parents)
        else:
            # every level's blocks in one (N, G, D) table (level l's at rows offset[l]..), so a
            # step gathers the true path in one go and the optimizer sees one parameter
            self.parent_top = nn.Linear(embed_dim, self.tree.sizes[0])
            nodes, g = sum(self.tree.sizes[:-1]), self.tree.fanout
            self.tree_weight = _uniform((nodes, g, embed_dim), embed_dim)
            self.tree_bias = _uniform((nodes, g), embed_dim)
            masks = [self.tree.mask(level) for level in range(1, self.tree.depth)]
            self.register_buffer("tree_mask", torch.cat(masks), persistent=False)
            offsets = torch.tensor((0, *self.tree.sizes[:-1])).cumsum(0)[:-1]
            self.register_buffer("tree_offset", offsets, persistent=False)  # level l at [l - 1]
        self.child_weight = _uniform((num_parents, self.max_children, embed_dim), embed_dim)
        self.child_bias = _uniform((num_parents, self.max_children), embed_dim)
        # derived from the label space; the layout is saved too so that a checkpoint loaded
        # against other classes fails (`_load_from_state_dict`) instead of scoring wrong cells
        self.register_buffer("child_index", torch.from_numpy(table.children))
        self.register_buffer("slot_of", torch.from_numpy(table.slot_of))
        self.register_buffer("child_mask", torch.from_numpy(table.mask), persistent=False)

    @property
    def has_parent_head(self) -> bool:
        return True

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """The gathered tables, whose gradients are row-sparse (none unless `sparse`)."""
        if not self.sparse:
            return []
        return [self.child_weight, self.child_bias, self.tree_weight, self.tree_bias]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        error_msgs = args[-1]
        for name in ("child_index", "slot_of"):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape == mine.shape and not torch.equal(
                saved.to(mine.device), mine
            ):
                error_msgs.append(
                    f"{prefix}{name}: the checkpoint's parent/child layout is not this label "
                    "space's"
                )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _table_logits(
        self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """(B, D) embeddings, (B, R) rows of a (N, W, D) table -> (B, R, W) logits, padding -inf."""
        b, r = rows.shape
        w = gather_rows(weight, rows, self.sparse_grads)  # (B, R, W, D): only the rows asked for
        if self.sparse:  # a broadcast product: ~3x faster than B tiny bmm's on CPU, both ways
            z = (w * h[:, None, None, :]).sum(dim=3)
        else:
            z = torch.bmm(w.view(b, r * weight.shape[1], -1), h.unsqueeze(2)).view(b, r, -1)
        z = z + gather_rows(bias, rows, self.sparse_grads)
        return z.masked_fill(~mask[rows], float("-inf"))

    def child_logits(self, h: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings, (B, R) parent indices -> (B, R, C) child logits, padding -inf."""
        return self._table_logits(h, self.child_weight, self.child_bias, self.child_mask, parents)

    def _all_child_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, P, C) child logits of every parent (the exact, K x D per sample, path)."""
        z = torch.einsum("bd,pcd->bpc", h, self.child_weight) + self.child_bias
        return z.masked_fill(~self.child_mask, float("-inf"))

    def _tree_parent_logp(self, h: torch.Tensor) -> torch.Tensor:
        """(B, P) exact log P(parent) through every block of the tree (P x D per sample)."""
        tree = self.tree
        assert tree is not None
        logp = torch.log_softmax(self.parent_top(h).float(), dim=1)  # (B, n0)
        for level in range(1, tree.depth):
            start = int(self.tree_offset[level - 1])
            rows = slice(start, start + tree.sizes[level - 1])
            z = torch.einsum("bd,ngd->bng", h, self.tree_weight[rows]) + self.tree_bias[rows]
            z = z.float().masked_fill(~self.tree_mask[rows], float("-inf"))
            logp = (logp[:, :, None] + torch.log_softmax(z, dim=2)).flatten(1)
            logp = logp[:, : tree.sizes[level]]
        return logp

    def _tree_path(
        self, h: torch.Tensor, parents: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Training-time tree outputs: the logits the loss needs along the true parents' path
        ((B, n0), then (B, G) per level), and the greedy best parent (B, 1) with its log P."""
        tree = self.tree
        assert tree is not None
        top = self.parent_top(h)  # (B, n0)
        path = [top]
        table = (self.tree_weight, self.tree_bias, self.tree_mask)
        if parents is not None:  # every level's true block in one gather
            rows = torch.stack([tree.ancestor(parents[:, 0], level - 1)
                                for level in range(1, tree.depth)], dim=1)  # fmt: skip
            z = self._table_logits(h, *table, rows + self.tree_offset)  # (B, L - 1, G)
            path += list(z.unbind(dim=1))
        with torch.no_grad():  # greedy descent: the training-time prediction only
            node = top.argmax(dim=1)
            logp = torch.log_softmax(top.float(), dim=1).gather(1, node[:, None])
            for level in range(1, tree.depth):
                row = node[:, None] + self.tree_offset[level - 1]
                z = self._table_logits(h, *table, row)[:, 0].float()
                slot = z.argmax(dim=1)
                logp = logp + torch.log_softmax(z, dim=1).gather(1, slot[:, None])
                node = node * tree.fanout + slot
        return path, node[:, None], logp

    def forward(self, h: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if parents is not None:
            out["target_parents"] = parents
            out["target_child_logits"] = self.child_logits(h, parents)
        if self.tree is not None and self.training:
            out["tree_logits"], top, out["child_parent_logp"] = self._tree_path(h, parents)
            with torch.no_grad():
                scored = self.child_logits(h, top)
        else:
            # (B, P): the tree's exact log-probabilities, or the parent layer's logits
            tree = self.tree is not None
            parent_logits = self._tree_parent_logp(h) if tree else self.parent(h)
            out["parent_logits"] = parent_logits
            k = 1 if self.training else self.topk_parents
            with torch.no_grad() if self.training else nullcontext():
                if 0 < k < self.num_parents:
                    top = parent_logits.detach().topk(k, dim=1).indices  # (B, k), best first
                    scored = self.child_logits(h, top)
                else:  # every parent, still best first so that the first k are the top-k
                    top = parent_logits.detach().argsort(dim=1, descending=True)  # (B, P)
                    every = self._all_child_logits(h)  # (B, P, C)
                    scored = every.gather(1, top[:, :, None].expand(-1, -1, every.shape[2]))
        out["child_parents"] = top
        out["child_logits"] = scored
        out["child_classes"] = self.child_index[top]  # (B, k, C)
        return out


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """nn.Linear's default init, per table."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def use_dense_gradients(model: nn.Module) -> bool:
    """Give every sparse factorised head dense gradients (DDP all-reduces dense ones only);
    True if one had sparse gradients."""
    changed = False
    for module in model.modules():
        if isinstance(module, FactorisedHead) and module.sparse_grads:
            module.sparse_grads, changed = False, True
    return changed


@register_head("factorised")
def _factorised(cfg: ModelConfig, embed_dim: int, spec: HeadSpec) -> nn.Module:
    if spec.parent_of is None or not spec.num_parents:
        raise ConfigError(
            "model.head=factorised needs the label space's parent level (parent_of); build the "
            "model from an index with parent_resolution < resolution, or set model.head=flat"
        )
    return FactorisedHead(
        embed_dim, spec.parent_of, spec.num_parents, spec.topk_parents, cfg.sparse_head
    )
