"""Optimiser and learning-rate schedule: AdamW/SGD, warmup then cosine or constant, per step."""

from __future__ import annotations

import math

import torch
from torch import nn

from geoloc.config import TrainConfig


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=train_cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=train_cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


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
