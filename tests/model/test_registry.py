"""Model and loss registries, GeoSoft targets, class weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_runs import TINY_MODEL_CONFIG

from geoloc.config import ModelConfig, TrainConfig
from geoloc.errors import ConfigError, DataError, GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.model import (
    GeoModel,
    GeoSoftTargetLoss,
    MultiScaleCNN,
    class_weights_from_counts,
    compute_class_weights_from_parquet,
    create_loss,
    create_model,
    default_tau_km,
    loss_names,
    model_names,
)


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """Seed, and one torch thread: on a busy shared 2-core machine, two OpenMP threads make
    small ops up to ~50x slower (threads spin-waiting on each other)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", model_names())
def test_every_registered_model_builds_and_returns_the_contract_outputs(arch):
    cfg = ModelConfig(arch=arch, width=8, depth=3, embed_dim=16, hierarchy=True)
    model = create_model(cfg, num_classes=7, num_parents=3)
    assert isinstance(model, GeoModel)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        embedding = model.embed(x)
    assert out["logits"].shape == (2, 7)
    assert out["embedding"].shape == (2, 16)
    assert out["parent_logits"].shape == (2, 3)
    assert all(torch.isfinite(v).all() for v in out.values())
    # embed() gives the same features the heads see, for neighbour search
    assert torch.allclose(embedding, out["embedding"], atol=1e-5)


def test_parent_head_only_with_hierarchy():
    flat = create_model(TINY_MODEL_CONFIG.model_copy(update={"hierarchy": False}), 5, 3)
    assert not flat.has_parent_head
    assert "parent_logits" not in flat(torch.randn(2, 3, 32, 32))


def test_no_parent_head_without_parents():
    model = create_model(ModelConfig(hierarchy=True), num_classes=5, num_parents=None)
    assert not model.has_parent_head
    assert "parent_logits" not in model(torch.randn(2, 3, 64, 64))


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(
        ConfigError, match="unknown model arch 'vit_huge'.*multiscale_cnn.*resnet18"
    ):
        create_model(ModelConfig(arch="vit_huge"), num_classes=3)


def test_multiscale_cnn_pools_every_stage_and_honours_width_and_depth():
    net = MultiScaleCNN(width=8, depth=4)
    assert net.out_dim == 8 + 16 + 32 + 64  # one pooled vector per stage, concatenated
    assert net(torch.randn(3, 3, 64, 64)).shape == (3, net.out_dim)
    small = sum(p.numel() for p in MultiScaleCNN(width=8, depth=3).parameters())
    wide = sum(p.numel() for p in MultiScaleCNN(width=16, depth=3).parameters())
    deep = sum(p.numel() for p in MultiScaleCNN(width=8, depth=4).parameters())
    assert small < wide and small < deep


def test_multiscale_cnn_features_are_every_stage_pooled_and_concatenated():
    """Fine texture (early stages) reaches the head directly, not only through later stages."""
    net = MultiScaleCNN(width=8, depth=3).eval()
    stage_outputs: list[torch.Tensor] = []
    for stage in net.stages:
        stage.register_forward_hook(lambda _m, _i, out: stage_outputs.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net(x)
    sizes = [o.shape[-1] for o in stage_outputs]
    assert sizes == [16, 8, 4]  # each stage halves the resolution (stem: 64 -> 32)
    expected = torch.cat([o.mean(dim=(2, 3)) for o in stage_outputs], dim=1)
    assert torch.allclose(feats, expected)


def test_tiny_model_learns_a_small_problem():
    """The demo model must fit: 16 images, 4 classes, a few dozen Adam steps."""
    model = create_model(TINY_MODEL_CONFIG, num_classes=4, num_parents=2)
    y = torch.arange(16) % 4
    x = torch.randn(16, 3, 32, 32) + 2.0 * y[:, None, None, None].float()  # brightness cue
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    assert (model(x)["logits"].argmax(1) == y).float().mean() > 0.9


# ---- losses -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", loss_names())
@pytest.mark.parametrize("weighted", [False, True])
def test_every_registered_loss_gives_a_finite_scalar_and_gradients(
    loss, weighted, tiny_label_space: LabelSpace
):
    k = tiny_label_space.num_classes
    weights = torch.linspace(0.5, 2.0, k) if weighted else None
    fn = create_loss(TrainConfig(loss=loss, label_smoothing=0.1), tiny_label_space, weights)
    logits = torch.randn(6, k, requires_grad=True)
    value = fn(logits, torch.tensor([0, 1, 2, 3, 4, 5]))
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_unknown_loss_lists_the_valid_names(tiny_label_space):
    cfg = TrainConfig.model_construct(loss="focal", label_smoothing=0.0, tau_km=None)
    with pytest.raises(ConfigError, match="unknown loss 'focal'; valid names: ce, geosoft"):
        create_loss(cfg, tiny_label_space)


def test_soft_targets_peak_at_the_true_cell_and_decay_with_distance(tiny_label_space):
    ls = tiny_label_space
    loss = GeoSoftTargetLoss(ls.centroids_tensor(), tau_km=2.0)
    q = loss.soft_targets(torch.tensor([0, 5]))
    assert torch.allclose(q.sum(1), torch.ones(2))
    for row, true in zip(q, [0, 5], strict=True):
        assert row.argmax().item() == true
        assert row[true] > 0.4  # "most mass" at tau ~ one cell spacing
        d = haversine_km(ls.lat[true], ls.lon[true], ls.lat, ls.lon)
        by_distance = row.numpy()[np.argsort(d, kind="stable")]
        assert np.all(np.diff(by_distance) <= 1e-7)  # farther never gets more mass


def test_soft_targets_follow_the_formula(tiny_label_space):
    """q_k ∝ exp(-(d(y, c_k) - d(y, c_true)) / tau), checked in float64 with haversine_km."""
    ls = tiny_label_space
    tau = 3.0
    q = GeoSoftTargetLoss(ls.centroids_tensor(), tau_km=tau).soft_targets(torch.tensor([4]))[0]
    d = haversine_km(ls.lat[4], ls.lon[4], ls.lat, ls.lon)
    expected = np.exp(-(d - d[4]) / tau)
    # float32 centroids are rounded to ~0.5 m, i.e. ~1e-4 of tau here
    np.testing.assert_allclose(q.numpy(), expected / expected.sum(), rtol=1e-3, atol=1e-6)


def test_geosoft_with_tiny_tau_is_cross_entropy(tiny_label_space):
    ls = tiny_label_space
    logits = torch.randn(8, ls.num_classes)
    targets = torch.randint(0, ls.num_classes, (8,))
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    GeoSoftTargetLoss(ls.centroids_tensor(), tau_km=1e-3)(ours, targets).backward()
    F.cross_entropy(ref, targets).backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6)


def test_geosoft_gradient_matches_autograd_of_the_definition(tiny_label_space):
    """The hand-written backward equals autograd on -sum(q * log_softmax(z)), weighted."""
    ls = tiny_label_space
    weights = torch.rand(ls.num_classes) + 0.1
    loss = GeoSoftTargetLoss(ls.centroids_tensor(), tau_km=2.0, class_weights=weights)
    z = torch.randn(5, ls.num_classes, dtype=torch.float64)
    targets = torch.tensor([0, 3, 3, 7, ls.num_classes - 1])
    ours, ref = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    value = loss(ours, targets)
    value.backward()
    q = loss.soft_targets(targets).double()
    w = weights[targets].double()
    expected = ((-(q * F.log_softmax(ref, 1)).sum(1)) * w).sum() / w.sum()
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6)


def test_geosoft_refuses_a_second_backward_on_one_graph(tiny_label_space):
    """Its backward reuses a buffer in place; a retained graph must not give silent garbage."""
    loss = GeoSoftTargetLoss(tiny_label_space.centroids_tensor(), tau_km=2.0)
    logits = torch.randn(3, tiny_label_space.num_classes, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 2]))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_geosoft_class_weights_scale_samples(tiny_label_space):
    """A zero-weight class contributes nothing: the loss equals the loss on the rest."""
    ls = tiny_label_space
    weights = torch.ones(ls.num_classes)
    weights[2] = 0.0
    logits = torch.randn(4, ls.num_classes)
    weighted = GeoSoftTargetLoss(ls.centroids_tensor(), 2.0, weights)
    plain = GeoSoftTargetLoss(ls.centroids_tensor(), 2.0)
    got = weighted(logits, torch.tensor([2, 2, 5, 6]))
    assert got.item() == pytest.approx(plain(logits[2:], torch.tensor([5, 6])).item(), rel=1e-6)


def test_geosoft_rewards_near_misses_over_far_misses(tiny_label_space):
    """What the loss is for: predicting the neighbour cell costs less than a far one."""
    ls = tiny_label_space
    loss = GeoSoftTargetLoss(ls.centroids_tensor(), tau_km=2.0)
    near, far = torch.full((1, ls.num_classes), -5.0), torch.full((1, ls.num_classes), -5.0)
    near[0, 1], far[0, ls.num_classes - 1] = 5.0, 5.0
    target = torch.tensor([0])
    assert loss(near, target) < loss(far, target)
    ce_near, ce_far = F.cross_entropy(near, target), F.cross_entropy(far, target)
    assert ce_near.item() == pytest.approx(ce_far.item())  # CE cannot tell them apart


def test_geosoft_handles_100k_classes_at_batch_256():
    """O(B*K) memory: a (K, K) matrix would be 40 GB here, so this runs only if none exists."""
    k, b = 100_000, 256
    g = torch.Generator().manual_seed(0)
    centroids = torch.stack(
        [torch.rad2deg(torch.asin(torch.rand(k, generator=g) * 2 - 1)), torch.rand(k) * 360 - 180],
        dim=1,
    )
    loss = GeoSoftTargetLoss(centroids, tau_km=75.0)
    logits = torch.randn(b, k, requires_grad=True)
    value = loss(logits, torch.randint(0, k, (b,), generator=g))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # gradient rows of softmax - q sum to zero (each q row is a distribution)
    assert logits.grad.sum(1).abs().max() < 1e-6


def test_geosoft_rejects_logits_of_the_wrong_width(tiny_label_space):
    loss = GeoSoftTargetLoss(tiny_label_space.centroids_tensor(), tau_km=2.0)
    with pytest.raises(GeolocError, match="logits must be"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))


def test_default_tau_scales_with_cell_size(tiny_label_space):
    taus = [default_tau_km(r) for r in range(0, 16)]
    assert all(a > b for a, b in zip(taus, taus[1:], strict=False))  # finer cells, smaller tau
    assert 60 <= default_tau_km(3) <= 80  # PIGEON-like at PIGEON-like cell sizes
    with pytest.raises(ConfigError, match="resolution"):
        default_tau_km(16)
    # the config's tau wins; None falls back to the resolution's default
    set_tau = create_loss(TrainConfig(loss="geosoft", tau_km=12.5), tiny_label_space)
    auto_tau = create_loss(TrainConfig(loss="geosoft"), tiny_label_space)
    assert set_tau.tau_km == 12.5
    assert auto_tau.tau_km == pytest.approx(default_tau_km(tiny_label_space.resolution))


# ---- class weights ------------------------------------------------------------------------------


def _write_splits(path: Path, train: list[int], val: list[int]) -> Path:
    labels = train + val
    pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(len(labels))],
            "split": ["train"] * len(train) + ["val"] * len(val),
            "label": labels,
        }
    ).to_parquet(path)
    return path


def test_inverse_weights_favour_rare_classes_and_average_one(tmp_path):
    # class 0: 8 train images, class 1: 2, class 2: none in train (only val)
    path = _write_splits(tmp_path / "splits.parquet", [0] * 8 + [1] * 2, [2] * 50 + [0] * 50)
    w = compute_class_weights_from_parquet(path, num_classes=3, scheme="inverse")
    assert w.dtype == torch.float32 and w.shape == (3,)
    assert w[1] / w[0] == pytest.approx(4.0)  # 1/n
    assert w[2] == 0.0  # no train image: never a target, does not skew the mean
    assert w[:2].mean() == pytest.approx(1.0)


def test_val_rows_do_not_change_train_weights(tmp_path):
    a = compute_class_weights_from_parquet(_write_splits(tmp_path / "a.parquet", [0, 0, 1], []), 2)
    b = compute_class_weights_from_parquet(
        _write_splits(tmp_path / "b.parquet", [0, 0, 1], [1] * 100), 2
    )
    assert torch.equal(a, b)


def test_effective_number_weights_lie_between_uniform_and_inverse():
    counts = np.array([1000, 10, 1])
    inverse = class_weights_from_counts(counts, "inverse")
    effective = class_weights_from_counts(counts, "effective", beta=0.99)
    uniform = class_weights_from_counts(counts, "none")
    assert torch.equal(uniform, torch.ones(3))
    assert effective[2] > effective[1] > effective[0]  # still favours rare classes
    assert effective[2] / effective[0] < inverse[2] / inverse[0]  # but less than 1/n
    assert effective.mean().item() == pytest.approx(1.0)
    # beta -> 1 approaches inverse frequency
    near_inverse = class_weights_from_counts(counts, "effective", beta=0.999999)
    assert torch.allclose(near_inverse, inverse, rtol=1e-2)


def test_class_weight_inputs_are_checked(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        compute_class_weights_from_parquet(tmp_path / "nope.parquet", 3)
    only_val = _write_splits(tmp_path / "v.parquet", [], [0, 1])
    with pytest.raises(DataError, match="no train rows"):
        compute_class_weights_from_parquet(only_val, 3)
    too_big = _write_splits(tmp_path / "t.parquet", [0, 5], [])
    with pytest.raises(DataError, match="outside 0..2"):
        compute_class_weights_from_parquet(too_big, 3)
    with pytest.raises(ConfigError, match="unknown class weighting"):
        class_weights_from_counts(np.array([1, 2]), "sqrt")  # type: ignore[arg-type]
    assert math.isclose(float(class_weights_from_counts(np.array([3, 3]), "inverse").sum()), 2.0)
