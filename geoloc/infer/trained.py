"""Back from a run folder to its model: `load_trained(run_dir)` for rerank, predict and MLflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geoloc.compute import resolve_device
from geoloc.config import RunConfig
from geoloc.data.dataset import build_transforms
from geoloc.errors import GeolocError, TrainingError
from geoloc.geo import LabelSpace
from geoloc.model.scores import class_scores
from geoloc.runfolder.layout import RunPaths
from geoloc.train.checkpoint import load_checkpoint


@dataclass
class TrainedRun:
    """A run's model (eval mode, on `device`), label space and resolved config."""

    model: nn.Module
    label_space: LabelSpace
    config: RunConfig
    device: torch.device
    checkpoint: Path

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The eval transform the model was validated with (uint8 (3,H,W) -> float (3,S,S))."""
        return build_transforms(self.config.train, train=False)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) transformed images -> (B, K) class probabilities, as in evaluation."""
        outputs = self.model(images.to(self.device))
        return class_scores(
            outputs, self.label_space.parent_of, self.config.train.hier_topk_parents
        )


def check_same_classes(checkpoint: Path, label_space: LabelSpace, index_dir: Path) -> None:
    """`TrainingError` when the index at `index_dir` has other classes than the checkpoint."""
    from geoloc.data.dataset import index_files

    index_labels = LabelSpace.from_json(index_files(index_dir)["labels"])
    if (
        index_labels.num_classes != label_space.num_classes
        or index_labels.fingerprint != label_space.fingerprint
    ):
        raise TrainingError(
            f"checkpoint '{checkpoint}' has {label_space.num_classes} classes (index "
            f"{label_space.fingerprint!r}) but the index at '{index_dir}' has "
            f"{index_labels.num_classes} ({index_labels.fingerprint!r}): pass the index the run "
            "was trained on (--index-dir, index_dir), or retrain on this one"
        )


def load_trained(
    run_dir: Path,
    which: str = "best",
    device: str | None = None,
    *,
    index_dir: Path | None = None,
    topk_parents: int | None = None,
) -> TrainedRun:
    """Load `checkpoints/<which>.pt` of a run: model in eval mode, label space, config.

    With `index_dir`, the index the caller is about to read must be the one the checkpoint's
    classes come from (same class count and fingerprint). A factorised head scores
    `topk_parents` parents at inference (default: the run's `train.hier_topk_parents`).
    """
    if which not in ("best", "last"):
        raise GeolocError(f"checkpoint '{which}' is not one of: best, last")
    paths = RunPaths(Path(run_dir))
    path = paths.best_checkpoint if which == "best" else paths.last_checkpoint
    if not paths.root.is_dir():
        raise GeolocError(f"run directory '{paths.root}' does not exist")
    ckpt = load_checkpoint(path)
    try:
        cfg = RunConfig.model_validate(ckpt["config"])
    except Exception as exc:  # noqa: BLE001 - pydantic or a missing key
        raise TrainingError(f"checkpoint '{path}' carries an unreadable config: {exc}") from exc
    label_space = LabelSpace.from_dict(ckpt["label_space"], source=f"checkpoint '{path}'")
    if index_dir is not None:
        check_same_classes(path, label_space, Path(index_dir))
    from geoloc.model import create_model

    # the checkpoint holds every weight: no need for the pretrained ones (nor their cache)
    model_cfg = cfg.model.model_copy(update={"pretrained": False})
    k = cfg.train.hier_topk_parents if topk_parents is None else topk_parents
    model = create_model(model_cfg, label_space.num_classes, label_space.num_parents,
                         parent_of=label_space.parent_of, topk_parents=k)  # fmt: skip
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # shape mismatches: weights for another number of classes
        first = str(exc).strip().splitlines()[-1].strip() or type(exc).__name__
        raise TrainingError(
            f"checkpoint '{path}' does not fit its own config and label space "
            f"({cfg.model.head} head, {label_space.num_classes} classes, "
            f"{label_space.num_parents} parents): {first}; retrain, or restore the run's files"
        ) from exc
    dev = resolve_device(device or cfg.train.device)
    model.to(dev).eval()
    return TrainedRun(model, label_space, cfg, dev, path)
