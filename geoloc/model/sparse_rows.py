"""Row-sparse pieces of the factorised head (`model.sparse_head`): a gather whose gradient is
sparse, and the block tree that factorises the parent level.

At 10^6 classes the factorised head's tables hold ~10^6 x D weights but a batch reads only a few
hundred rows of them. `gather_rows` gives the rows read a sparse COO gradient (indices x the
row's trailing shape) instead of a dense zero-filled one, and `geoloc.train.optim` updates only
those rows. `BlockTree` makes the parent level itself hierarchical: parents 0..P-1 are grouped
into consecutive blocks of G <= 8 (H3-sorted indices, so a block is a patch of neighbouring cells),
blocks into blocks of G, and so on until at most G nodes are left on top:
P(parent) = P(top node) x P(next node | top node) x ... x P(parent | its block). A training
step reads the top layer (<= G rows) and one G-row table per level on the true path, so its cost
does not grow with P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MAX_FANOUT", "BlockTree", "gather_rows"]

MAX_FANOUT = 8
"""Widest block of the parent tree: more levels rather than wider tables past this. Narrow
blocks read fewest rows per image (L levels x G rows, G^L >= P): at 1.4 x 10^5 parents,
fanout 8 (5 levels) stepped in about a tenth of the time of fanout 53 (2 levels) on CPU."""


class _GatherRows(torch.autograd.Function):
    """weight[index] whose weight gradient is a sparse COO tensor of the rows read."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        return weight[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        shape = ctx.weight_shape
        values = grad.reshape(-1, *shape[1:]).to(ctx.weight_dtype)  # (rows read, *row shape)
        rows = index.reshape(1, -1)
        return torch.sparse_coo_tensor(rows, values, shape, check_invariants=False), None


def gather_rows(weight: torch.Tensor, index: torch.Tensor, sparse: bool) -> torch.Tensor:
    """`weight[index]`; with `sparse` the gradient into `weight` is sparse (rows read only)."""
    if sparse and torch.is_grad_enabled() and weight.requires_grad:
        return _GatherRows.apply(weight, index)
    # index_select, not `weight[index]`: the backward of advanced indexing on CPU (index_put_
    # with accumulate) adds the rows of an index read by several samples from concurrent
    # threads, in an order that varies run to run (docs/training.md, "Determinism");
    # index_select's backward (index_add_) sums them in sample order.
    rows = weight.index_select(0, index.reshape(-1))
    return rows.view(*index.shape, *weight.shape[1:])


@dataclass(frozen=True)
class BlockTree:
    """Parents 0..P-1 under `depth - 1` levels of consecutive blocks of `fanout`.

    Level 0 is the top (at most `fanout` nodes), level `depth - 1` the parents. Node j of level
    l >= 1 sits in slot j % fanout of node j // fanout of level l - 1.
    """

    num_parents: int
    fanout: int
    sizes: tuple[int, ...]  # nodes per level, top first; sizes[-1] == num_parents

    @classmethod
    def for_parents(cls, num_parents: int, max_fanout: int = MAX_FANOUT) -> BlockTree:
        """The shallowest tree (at least two levels) whose blocks hold at most `max_fanout`."""
        depth = 2
        while math.ceil(num_parents ** (1.0 / depth) - 1e-9) > max_fanout:
            depth += 1
        fanout = max(1, math.ceil(num_parents ** (1.0 / depth) - 1e-9))
        while fanout**depth < num_parents:  # float rounding
            fanout += 1
        sizes = [num_parents]
        for _ in range(depth - 1):
            sizes.append(-(-sizes[-1] // fanout))
        return cls(num_parents, fanout, tuple(reversed(sizes)))

    @property
    def depth(self) -> int:
        return len(self.sizes)

    def ancestor(self, parents: torch.Tensor, level: int) -> torch.Tensor:
        """Each parent's node at `level` (level depth - 1: the parent itself)."""
        return parents // self.fanout ** (self.depth - 1 - level)

    def slot(self, parents: torch.Tensor, level: int) -> torch.Tensor:
        """Slot of each parent's level-`level` node (level >= 1) within its block."""
        return self.ancestor(parents, level) % self.fanout

    def mask(self, level: int) -> torch.Tensor:
        """(nodes of level - 1, fanout) bool: True where the slot holds a real level node."""
        n_above = self.sizes[level - 1]
        node = torch.arange(n_above)[:, None] * self.fanout + torch.arange(self.fanout)
        return node < self.sizes[level]
