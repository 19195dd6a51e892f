"""Checkpoints: everything to rebuild and resume a run, loadable with `weights_only=True`."""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoloc.atomic import atomic_path
from geoloc.errors import TrainingError
from geoloc.geo import LabelSpace

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("epoch", "model", "config", "label_space")
"""What every reader of a checkpoint (predict, rerank, resume) takes from it."""


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/lists (safe for `weights_only=True`)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [int(version), list(internal), gauss],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            *(int(v) if i < 2 else float(v) for i, v in enumerate(np_state[2:])),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(ckpt: dict[str, Any], rank: int) -> dict[str, Any]:
    """The RNG state `rank` saved (`rng_ranks`, DDP), else the one of `rng` (rank 0 / 1 process).

    Each DDP rank draws its own augmentation and dropout: restoring rank 0's on every rank
    would resume a different run from the one that was interrupted."""
    ranks = ckpt.get("rng_ranks") or []
    return ranks[rank] if rank < len(ranks) else ckpt["rng"]


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    config: dict[str, Any],
    label_space: LabelSpace,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> None:
    """Everything to rebuild the model and resume: one dict of tensors and plain values.

    Written atomically, so a crash mid-save never leaves a broken `last.pt`. Loadable with
    `torch.load(weights_only=True)`: RNG states are tensors/lists, configs are JSON dicts.
    `rng_ranks`: every DDP rank's RNG state, by rank (`rank_rng_state` picks one back).
    """
    state = {
        "version": CHECKPOINT_VERSION,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state() if not rng_ranks else rng_ranks[0],
        "rng_ranks": rng_ranks or [],
        "config": config,
        "label_space": label_space.to_dict(),
        "best": best,
        "history": history,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict (`weights_only=True`); `TrainingError` naming the file when unusable."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint '{path}' does not exist")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes on a file it refuses
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # objects beyond tensors and plain values: refused
        raise TrainingError(
            f"checkpoint '{path}' is refused: a weights-only load takes tensors and plain "
            f"values, not this file ({_torch_reason(exc)}); use a checkpoint written by geoloc"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise TrainingError(
            f"checkpoint '{path}' could not be loaded: {_torch_reason(exc)}"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise TrainingError(
            f"checkpoint '{path}' has version {version!r}; this geoloc reads {CHECKPOINT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise TrainingError(f"checkpoint '{path}' lacks {', '.join(missing)}; it is incomplete")
    return state


# torch's weights-only refusal wraps the one useful line in paragraphs of advice (including
# "load with weights_only=False", which would run the file's code): keep only that line
_TORCH_BOILERPLATE = (
    "weights only load failed", "please file an issue", "check the documentation",
    "in pytorch 2.6", "re-running `torch.load`",
)  # fmt: skip


def _torch_reason(exc: Exception) -> str:
    """The one informative line of a torch load error (its messages span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [
        line.removeprefix("WeightsUnpickler error:").strip()
        for line in lines
        if not line.lower().startswith(_TORCH_BOILERPLATE)
    ]
    useful = [line for line in useful if line]
    return useful[0] if useful else (lines[0] if lines else type(exc).__name__)
