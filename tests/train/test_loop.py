"""The loop's pieces: seeding, schedule, epoch composition, scores, checkpoints, NaN guard."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from geoloc.compute import seed_everything
from geoloc.config import HardNegConfig, RunConfig, TrainConfig
from geoloc.errors import TrainingError
from geoloc.geo import LabelSpace
from geoloc.model.scores import class_scores
from geoloc.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from geoloc.train.loop import epoch_order
from geoloc.train.optim import lr_factor
from geoloc.train.steps import train_one_epoch


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_one_seed_fixes_python_numpy_and_torch() -> None:
    seed_everything(5)
    first = _draws()
    seed_everything(5)
    assert _draws() == first
    seed_everything(5, rank=1)
    assert _draws() != first


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    seed_everything(1)
    model = nn.Linear(3, 2)
    labels = LabelSpace.from_dict(
        {
            "resolution": 1, "parent_resolution": 0, "fingerprint": "x",
            "classes": [{"index": i, "cell": f"c{i}", "parent_index": 0, "lat": 0.0, "lon": i}
                        for i in range(2)],
            "parents": [{"index": 0, "cell": "p", "lat": 0.0, "lon": 0.0}],
        }
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        tmp_path / "c.pt", model=model, optimizer=opt, scheduler=None, scaler=None, epoch=3,
        config=RunConfig().model_dump(mode="json"), label_space=labels, best={"value": 1.0},
        history=[{"epoch": 1, "val_top1": 0.5}],
    )  # fmt: skip
    expected = _draws()
    ckpt = load_checkpoint(tmp_path / "c.pt")  # weights_only=True inside
    assert ckpt["epoch"] == 3 and ckpt["version"] == 1
    assert LabelSpace.from_dict(ckpt["label_space"]).cells == labels.cells
    assert torch.equal(ckpt["model"]["weight"], model.state_dict()["weight"])
    set_rng_state(ckpt["rng"])
    # the checkpoint was taken before `expected` was drawn, so restoring replays it
    assert isinstance(rng_state()["torch"], torch.Tensor)
    assert _draws() == expected


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="last.pt"):
        load_checkpoint(bad)
    with pytest.raises(TrainingError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_warmup_then_cosine_to_zero() -> None:
    total, warm = 100, 10
    factors = [lr_factor(s, warm, total, "cosine") for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warm - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1 :], strict=False))
    assert factors[-1] < 0.01
    assert [lr_factor(s, warm, total, "none") for s in range(warm, total)] == [1.0] * (total - warm)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    labels = np.repeat(np.arange(10), 10)
    cfg = HardNegConfig(enabled=False)
    a = epoch_order(labels, 2, 0, None, None, cfg)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(labels, 2, 0, None, None, cfg))
    assert not np.array_equal(a, epoch_order(labels, 3, 0, None, None, cfg))


def test_hard_negatives_take_their_share_of_the_epoch() -> None:
    """Confused classes 3 and 7 get about `share` of the epoch on top of their normal share."""
    labels = np.repeat(np.arange(10), 20)  # 200 train rows
    val_true = np.repeat(np.arange(10), 5)
    val_pred = val_true.copy()
    val_pred[val_true == 3] = 7  # the model confuses 3 -> 7
    cfg = HardNegConfig(enabled=True, share=0.5, start_epoch=1)
    before = epoch_order(labels, 0, 0, val_pred, val_true, cfg)
    after = epoch_order(labels, 1, 0, val_pred, val_true, cfg)
    assert len(after) == len(labels)  # same budget
    hard_share = np.isin(labels[after], [3, 7]).mean()
    assert np.isin(labels[before], [3, 7]).mean() == pytest.approx(0.2)
    assert 0.5 < hard_share < 0.7  # 0.5 from the pool + ~0.2 x 0.5 from the rest
    assert np.array_equal(after, epoch_order(labels, 1, 0, val_pred, val_true, cfg))


def test_hierarchical_scores_keep_only_children_of_top_parents() -> None:
    parent_of = np.array([0, 0, 1, 1, 2])
    outputs = {
        "logits": torch.tensor([[0.0, 1.0, 5.0, 0.0, 3.0]]),
        "parent_logits": torch.tensor([[4.0, 0.0, 3.0]]),
    }
    scores = class_scores(outputs, parent_of, hier_topk_parents=2)
    assert scores.sum().item() == pytest.approx(1.0)
    assert scores[0, 2] == 0 and scores[0, 3] == 0  # parent 1 is not in the top 2
    assert int(scores.argmax()) == 4  # child 4's own + parent probability wins over class 1
    plain = class_scores(outputs, parent_of, hier_topk_parents=0)
    assert int(plain.argmax()) == 2 and torch.allclose(plain, outputs["logits"].softmax(1))


class _NaNLoss(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.sum() * float("nan")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x.mean(dim=(2, 3)))}


def test_nan_loss_stops_with_a_clear_error() -> None:
    model = _Tiny()
    batch = (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 0]),
             torch.tensor([0, 1]))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match="loss is nan at epoch 1, step 0"):
        train_one_epoch(
            model, [batch], _NaNLoss(), opt, None, torch.amp.GradScaler("cpu", enabled=False),
            torch.device("cpu"), epoch=1, num_rows=2, progress=False,
        )  # fmt: skip
    assert TrainConfig().epochs > 0
