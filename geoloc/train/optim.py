"""Optimiser and learning-rate schedule: AdamW/SGD, warmup then cosine or constant, per step."""

from __future__ import annotations

import math

import torch
from torch import nn

from geoloc.config import TrainConfig
from geoloc.errors import ConfigError


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over all trainable parameters.

    Tables a head gathers with row-sparse gradients (`row_sparse_parameters`, the factorised
    head with `model.sparse_head`) go in a param group of their own (`sparse: True`) that
    `RowSparseAdamW` updates row by row; AdamW then covers the rest as usual.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sparse_ids = {
        id(p)
        for m in model.modules()
        if hasattr(m, "row_sparse_parameters")
        for p in m.row_sparse_parameters()
        if p.requires_grad
    }
    if train_cfg.optimizer == "sgd":
        if sparse_ids:
            raise ConfigError("model.sparse_head=true needs train.optimizer=adamw")
        return torch.optim.SGD(
            params,
            lr=train_cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=train_cfg.weight_decay,
        )
    if not sparse_ids:
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    groups = [
        {"params": [p for p in params if id(p) not in sparse_ids]},
        {"params": [p for p in params if id(p) in sparse_ids], "sparse": True},
    ]
    return RowSparseAdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW whose `sparse: True` groups take row-sparse gradients and update only the rows a
    step touched (lazy Adam, as `torch.optim.SparseAdam`, plus AdamW's decoupled weight decay on
    those rows). One optimizer, so the LR schedule, the AMP grad scaler and checkpoints
    (`state_dict`) treat it as any other.

    Untouched rows keep their moments and weights until a batch reads them again, so a row's
    update differs from dense AdamW's (which decays every row's moments and weights each step);
    a dense gradient in a sparse group (DDP) updates every row, which is exactly AdamW.
    """

    def __init__(self, params, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("sparse", False)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse_groups = [g for g in self.param_groups if g.get("sparse")]
        held = [(p, p.grad) for g in sparse_groups for p in g["params"]]
        for p, _ in held:
            p.grad = None  # AdamW refuses sparse gradients: it steps the dense groups only
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        for group in sparse_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._row_step(p, group)
        return loss

    def _row_step(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()  # duplicate rows (two images, one parent) summed
            rows, g = grad.indices()[0], grad.values()
        else:
            rows, g = slice(None), grad
        m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
        w = p[rows].mul_(1 - lr * decay).addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        p[rows] = w


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warm-up, then cosine or flat."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the whole run (warm-up epochs, then cosine to 0 or constant)."""
    total = train_cfg.epochs * steps_per_epoch
    warmup = train_cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, train_cfg.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(num_samples: int, train_cfg: TrainConfig) -> int:
    steps = math.ceil(num_samples / train_cfg.batch_size)
    return min(steps, train_cfg.max_steps_per_epoch) if train_cfg.max_steps_per_epoch else steps
