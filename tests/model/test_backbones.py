"""Pretrained torchvision backbones: weights come from torchvision's weights API and the torch hub
cache, and offline a missing file is one line naming the folder, the file and how to get it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from fixtures.tiny_index import write_tiny_index

from geoloc.config import ModelConfig, load_config
from geoloc.errors import ConfigError, GeolocError
from geoloc.model import create_model
from geoloc.model.backbones import pretrained_weights, weights_cache_file
from geoloc.train.run import train_run


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty torch hub cache, and no download possible: any attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts: list[str] = []

    def no_download(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(url)
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    yield tmp_path / "torch"
    assert attempts == []


def _seed_cache(name: str) -> dict[str, torch.Tensor]:
    """Save a recognisable state dict where torchvision's weights API looks for `name`'s weights."""
    torch.manual_seed(123)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    assert weights_cache_file(url) == path
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_resnet_loads_the_cached_weights(torch_home: Path) -> None:
    saved = _seed_cache("resnet18")
    torch.manual_seed(0)  # a fresh init would differ from the saved tensors
    model = create_model(ModelConfig(arch="resnet18", pretrained=True), num_classes=3)
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k for k in saved if not k.startswith("fc.")}
    for key, tensor in loaded.items():
        assert torch.equal(tensor, saved[key]), key
    random_init = create_model(ModelConfig(arch="resnet18"), num_classes=3).backbone
    assert not torch.equal(random_init.conv1.weight, saved["conv1.weight"])
    assert pretrained_weights(ModelConfig(arch="resnet18", pretrained=True)) == (
        "ResNet18_Weights.IMAGENET1K_V1"
    )


def test_missing_weights_name_the_folder_the_file_and_the_fix(torch_home: Path) -> None:
    with pytest.raises(GeolocError) as info:
        create_model(ModelConfig(arch="resnet18", pretrained=True), num_classes=3)
    message = str(info.value)
    folder = torch_home / "hub" / "checkpoints"
    assert "\n" not in message
    assert str(folder) in message and "resnet18-f37072fd.pth" in message
    assert "curl" in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in (
        message
    )
    assert "model.download_weights=true" in message and "model.pretrained=false" in message


def test_a_corrupt_cached_file_is_one_line_naming_it(torch_home: Path) -> None:
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    path = weights_cache_file(url)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(GeolocError, match="resnet18-f37072fd.pth") as info:
        create_model(ModelConfig(arch="resnet18", pretrained=True), num_classes=3)
    assert "\n" not in str(info.value) and "pretrained=false" in str(info.value)


def test_only_torchvision_archs_have_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="multiscale_cnn.*no published weights"):
        create_model(ModelConfig(arch="multiscale_cnn", pretrained=True), num_classes=3)


def test_a_run_without_cached_weights_fails_before_its_folder_exists(
    torch_home: Path, tmp_path: Path
) -> None:
    index = write_tiny_index(tmp_path / "data")
    cfg = load_config(None, {"arch": "resnet18", "pretrained": True, "index_dir": str(index),
                             "tracking.enabled": False})  # fmt: skip
    with pytest.raises(GeolocError, match="model.arch 'resnet18'.*not cached"):
        train_run(cfg, run_dir=tmp_path / "runs" / "r", progress=False)
    assert not (tmp_path / "runs").exists()


def test_allowed_download_offline_fails_fast_with_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model.download_weights=true` really goes to the network; offline (a closed proxy port)
    that is a one-line error naming the URL, within seconds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # closed port: the download fails at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    start = time.monotonic()
    cfg = ModelConfig(arch="resnet18", pretrained=True, download_weights=True)
    with pytest.raises(GeolocError, match="resnet18-f37072fd.pth.*pretrained=false") as info:
        create_model(cfg, num_classes=3)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 60
