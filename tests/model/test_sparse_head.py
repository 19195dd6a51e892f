"""The sparse factorised head (`model.sparse_head`): a block tree over the parents and row-sparse
updates, so a step does not grow with K, while it stays a normalised model that trains, resumes
and checkpoints like the dense one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geoloc.config import TrainConfig, load_config
from geoloc.errors import ConfigError
from geoloc.model import FactorisedHead, FactorisedLoss, GeoSoftNeighbours
from geoloc.model.scores import class_scores, predicted_classes
from geoloc.model.sparse_rows import MAX_FANOUT, BlockTree
from geoloc.paths import DATA_DIR_ENV, runs_dir
from geoloc.runfolder.layout import RunPaths
from geoloc.train.optim import RowSparseAdamW, build_optimizer
from geoloc.train.run import train_run


def r7_like(num_parents: int, seed: int = 0) -> np.ndarray:
    """(K,) parent of each class: 1-7 children per parent, as r7 cells under r6 ones."""
    counts = np.random.default_rng(seed).integers(1, 8, num_parents)
    return np.repeat(np.arange(num_parents), counts)


def lat_lon(k: int) -> torch.Tensor:
    """Class centroids on a line of ~1 km steps (GeoSoft neighbours are then nearby classes)."""
    return torch.stack([torch.full((k,), 45.0), 5.0 + 0.01 * torch.arange(k)], dim=1)


@pytest.mark.parametrize("num_parents", [1, 2, 7, 143, 238, 4097, 142_858])
def test_block_tree_reaches_every_parent_through_small_blocks(num_parents: int) -> None:
    tree = BlockTree.for_parents(num_parents)
    assert tree.fanout <= MAX_FANOUT and tree.sizes[0] <= tree.fanout
    assert tree.sizes[-1] == num_parents
    for level in range(1, tree.depth):  # each level's nodes fill its blocks' real slots
        assert int(tree.mask(level).sum()) == tree.sizes[level]
    parents = torch.arange(num_parents)
    path = sum(tree.slot(parents, lv) * tree.fanout ** (tree.depth - 1 - lv)
               for lv in range(1, tree.depth))  # fmt: skip
    top = tree.ancestor(parents, 0) * tree.fanout ** (tree.depth - 1)
    assert torch.equal(top + path, parents)


@pytest.mark.parametrize("num_parents", [5, 143])
def test_sparse_head_ce_loss_is_the_nll_of_what_it_predicts(num_parents: int) -> None:
    """Training reads only the true path, yet its CE loss is exactly -log of the probability
    the same head gives the true class at inference (all parents scored)."""
    torch.manual_seed(0)
    parent_of = r7_like(num_parents)
    head, loss = FactorisedHead(16, parent_of, num_parents, 0, sparse=True), None
    loss = FactorisedLoss(parent_of, num_parents)
    h, y = torch.randn(12, 16), torch.randint(0, len(parent_of), (12,))
    train_loss = loss(head.train()(h, parents=loss.head_parents(y)), y)
    with torch.no_grad():
        probs = class_scores(head.eval()(h), parent_of, 0)
    assert probs.sum(dim=1).sub(1).abs().max() < 1e-5
    expected = -probs[torch.arange(12), y].log().mean()
    assert torch.allclose(train_loss, expected, atol=1e-5)


def test_a_step_reads_and_updates_only_the_rows_of_the_true_path() -> None:
    torch.manual_seed(0)
    parent_of, p = r7_like(4097), 4097
    head = FactorisedHead(8, parent_of, p, 0, sparse=True).train()
    centroids = lat_lon(len(parent_of))
    loss = FactorisedLoss(parent_of, p, GeoSoftNeighbours(centroids, 2.0, 16))
    y = torch.tensor([0, 5000, 9000])
    loss(head(torch.randn(3, 8), parents=loss.head_parents(y)), y).backward()
    true_parents = torch.as_tensor(parent_of)[y]
    assert torch.equal(head.child_weight.grad.coalesce().indices()[0], true_parents.sort().values)
    tree = head.tree
    path = torch.cat([tree.ancestor(true_parents, lv - 1) + head.tree_offset[lv - 1]
                      for lv in range(1, tree.depth)])  # fmt: skip
    assert torch.equal(head.tree_weight.grad.coalesce().indices()[0], path.unique())
    assert not head.parent_top.weight.grad.is_sparse  # the top layer (<= 64 rows) stays dense
    opt = build_optimizer(head, TrainConfig(lr=0.1, weight_decay=0.1))
    before = head.child_weight.detach().clone()
    opt.step()
    changed = (head.child_weight != before).flatten(1).any(dim=1).nonzero().flatten()
    assert torch.equal(changed, true_parents.sort().values)


def test_a_dense_gradient_in_the_sparse_group_is_exactly_adamw() -> None:
    """Under DDP the tables take dense gradients: the update is then plain AdamW's."""
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, 4)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = RowSparseAdamW([{"params": [a], "sparse": True}], lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for step in range(4):
        g = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_the_sparse_group_state_survives_a_checkpoint_round_trip() -> None:
    torch.manual_seed(0)
    parent_of = r7_like(143)
    loss = FactorisedLoss(parent_of, 143)
    heads = [FactorisedHead(8, parent_of, 143, 0, sparse=True).train() for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    opts = [build_optimizer(hd, TrainConfig(lr=0.05)) for hd in heads]
    batches = [(torch.randn(4, 8), torch.randint(0, len(parent_of), (4,))) for _ in range(6)]

    def step(i: int, k: int) -> None:
        h, y = batches[k]
        opts[i].zero_grad(set_to_none=True)
        loss(heads[i](h, parents=loss.head_parents(y)), y).backward()
        opts[i].step()

    for k in range(3):
        step(0, k)
        step(1, k)
    saved = opts[1].state_dict()
    opts[1] = build_optimizer(heads[1], TrainConfig(lr=0.05))
    opts[1].load_state_dict(saved)
    for k in range(3, 6):
        step(0, k)
        step(1, k)
    assert all(torch.equal(x, y) for x, y in zip(heads[0].parameters(), heads[1].parameters(),
                                                  strict=True))  # fmt: skip


def test_training_time_prediction_is_a_real_class_of_the_greedy_parent() -> None:
    torch.manual_seed(0)
    parent_of = r7_like(238)
    head = FactorisedHead(16, parent_of, 238, 5, sparse=True).train()
    out = head(torch.randn(8, 16))
    assert "parent_logits" not in out  # no (B, P) layer while training
    pred = predicted_classes(out)
    assert torch.equal(torch.as_tensor(parent_of)[pred], out["child_parents"][:, 0])


def test_sparse_head_needs_the_factorised_head_and_adamw() -> None:
    with pytest.raises(ConfigError, match="model.head=factorised"):
        load_config(None, {"model.sparse_head": "true"})
    with pytest.raises(ConfigError, match="train.optimizer=adamw"):
        load_config(None, {"model.head": "factorised", "model.sparse_head": "true",
                           "train.optimizer": "sgd"})  # fmt: skip


TINY = {"epochs": 2, "batch_size": 8, "image_size": 16,
        "arch": "multiscale_cnn", "width": 8, "depth": 3,
        "embed_dim": 16, "lr": 3e-3, "tracking.enabled": False, "rerank.enabled": False,
        "device": "cpu", "cache_mb": 0, "shuffle_buffer": 16, "model.head": "factorised",
        "model.sparse_head": True, "checkpoint_every_steps": 4, "loss": "ce"}  # fmt: skip


@pytest.mark.slow
def test_a_sparse_head_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    sharded_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the dense head's test in test_streaming.py: the sparse group's optimizer state is in
    the checkpoint, so the resumed run ends with the very weights of an uninterrupted one."""
    monkeypatch.setenv(DATA_DIR_ENV, str(sharded_index.parent))
    whole = train_run(load_config(None, {**TINY, "name": "whole"}), progress=False)
    sets = [arg for k, v in {**TINY, "name": "cut"}.items() for arg in ("--set", f"{k}={v}")]
    env = dict(os.environ, GEOLOC_FAULT_AFTER="train:18")
    killed = subprocess.run([sys.executable, "-m", "geoloc", "train", *sets], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    cut = next(p for p in runs_dir().iterdir() if "cut" in p.name and p.is_dir())
    resumed = train_run(load_config(str(RunPaths(cut).config), {}), resume=cut, progress=False)
    a, b = (torch.load(RunPaths(r).last_checkpoint, weights_only=True)["model"]
            for r in (whole, resumed))  # fmt: skip
    assert any(k.startswith("head.tree_weight") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_sparse_head_trains_under_ddp_with_dense_gradients(demo_data) -> None:
    """Two gloo ranks: the tables fall back to dense gradients (one warning) and the run
    completes like any other."""
    from geoloc.compose.training import run_training
    from geoloc.runfolder.summary import read_summary

    cfg = load_config(None, {"name": "ddp", "epochs": 1, "batch_size": 64, "image_size": 24,
                             "arch": "multiscale_cnn", "width": 8, "depth": 3,
                             "embed_dim": 32, "lr": 3e-3,
                             "tracking.enabled": False, "rerank.enabled": False, "nproc": 2,
                             "model.head": "factorised", "model.sparse_head": True,
                             "loss": "geosoft_sparse"})  # fmt: skip
    run = run_training(cfg, progress=False)
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    state = torch.load(RunPaths(run).last_checkpoint, weights_only=True)
    assert any(k.startswith("head.tree_weight") for k in state["model"])


def test_a_sparse_head_steps_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    parent_of = r7_like(143)
    head = FactorisedHead(16, parent_of, 143, 5, sparse=True).train()
    loss = FactorisedLoss(parent_of, 143)
    opt = build_optimizer(head, TrainConfig(lr=0.01))
    h, y = torch.randn(8, 16), torch.randint(0, len(parent_of), (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(head(h, parents=loss.head_parents(y)), y)
    value.backward()
    assert torch.isfinite(value) and head.tree_weight.grad.is_sparse
    assert head.child_weight.grad.dtype == torch.float32  # master weights stay float32
    opt.step()
    assert all(torch.isfinite(p).all() for p in head.parameters())
