"""Where and how tensors compute: device, seeding, threads, mixed precision, torchrun's environment.

Training and inference both run models, so this sits below both (foundation): inference picks
its device here instead of climbing into `train/`, and torchrun's variables are read only here.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoloc.config import RunConfig, TrainConfig
from geoloc.errors import GeolocError

# --------------------------------------------------------------------------------------------
# torchrun's environment and threads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place among torchrun's ranks; one process of one when not under torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False
    """Whether torchrun set the variables (WORLD_SIZE), even for a world of one."""


def torchrun_env() -> TorchrunEnv:
    """RANK, LOCAL_RANK and WORLD_SIZE as torchrun sets them (LOCAL_RANK defaults to RANK)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return TorchrunEnv()
    rank = int(env.get("RANK", "0"))
    return TorchrunEnv(rank, int(env.get("LOCAL_RANK", rank)), int(env["WORLD_SIZE"]), True)


def under_torchrun() -> bool:
    """Whether this process was started as one rank of several by torchrun (WORLD_SIZE > 1)."""
    return torchrun_env().world_size > 1


def share_cores(world_size: int) -> None:
    """N CPU ranks on one host split its cores, unless OMP_NUM_THREADS already says how many."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))


# --------------------------------------------------------------------------------------------
# Seeding and devices
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int = 0, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one number; ranks get distinct streams.

    `deterministic` pins cuDNN to reproducible algorithms; without it cuDNN benchmarks and picks
    the fastest ones (`train.deterministic=false`, GPU runs that value speed over bit-equality).
    """
    s = (int(seed) + 1_000_003 * int(rank)) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def determinism_settings(cfg: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """What a rerun must match, besides code, data and library versions, to reproduce a run's
    numbers bit for bit (summary.json `determinism`; docs/training.md, "Determinism")."""
    deterministic = cfg.train.deterministic
    return {
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),  # CPU kernels split their sums by thread count
        # torch picks its CPU kernels by instruction set: the same run on another CPU can
        # differ in the last digits, and those grow over an epoch (docs/training.md)
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "world_size": world_size,
        "device": cfg.train.device,
        "num_workers": cfg.train.num_workers,  # 0 and >= 1 workers draw other augmentations
        "amp": cfg.train.amp,
        "amp_dtype": cfg.train.amp_dtype,
        "deterministic": deterministic,
        "cudnn_deterministic": deterministic,
        "cudnn_benchmark": not deterministic,
    }


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise GeolocError(f"train.device '{name}' is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GeolocError(f"train.device '{name}' asks for CUDA but no GPU is available")
    return device


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """How the steps run on their device: autocast dtype (None: float32) and memory format.

    fp16 autocast on CUDA scales the loss (`grad_scaler`); bf16 keeps float32's range and needs
    no scaling. `channels_last` stores image batches NHWC, which cuDNN's conv kernels (tensor
    cores) prefer; the model must be converted the same way (`prepare_model`).
    """

    device_type: str = "cpu"
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def precision(self) -> str:
        """`bf16`, `fp16` or `fp32`: what the forward pass computes in."""
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names.get(self.amp_dtype, "fp32")  # type: ignore[arg-type]

    def autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.bfloat16  # any supported dtype when disabled
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.amp_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is on only for fp16 on CUDA (the one case that underflows)."""
        enabled = self.amp_dtype == torch.float16 and self.device_type == "cuda"
        return torch.amp.GradScaler(self.device_type, enabled=enabled)

    def images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch onto `device` (asynchronously from pinned memory), NHWC when asked."""
        if self.channels_last and images.dim() == 4:
            return images.to(device, non_blocking=True, memory_format=torch.channels_last)
        return images.to(device, non_blocking=True)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Convert the model's conv weights to channels_last when this mode uses it."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


FP32 = Compute()
"""Plain float32, contiguous: what CPU runs use by default."""


def has_conv(model: nn.Module) -> bool:
    """Does the model convolve images (where channels_last pays off)?"""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_compute(train_cfg: TrainConfig, device: torch.device, model: nn.Module) -> Compute:
    """`train.amp`/`amp_dtype`/`channels_last` on `device` -> the `Compute` the steps use.

    CUDA autocasts to bf16 where the GPU supports it (`auto`), else fp16; CPU autocasts only with
    an explicit `amp_dtype=bf16` (CPUs without bf16 units run it slower than float32, but it is
    the way to exercise the mixed-precision path without a GPU). channels_last is for conv
    models on CUDA.
    """
    want = train_cfg.amp_dtype
    dtype: torch.dtype | None = None
    if train_cfg.amp and device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if want == "bf16" and not bf16_ok:
            raise GeolocError(
                f"train.amp_dtype=bf16 but {torch.cuda.get_device_name(device)} has no bf16 "
                "support; use train.amp_dtype=auto or fp16"
            )
        dtype = _AMP_DTYPES[("bf16" if bf16_ok else "fp16") if want == "auto" else want]
    elif train_cfg.amp and device.type == "cpu" and want == "bf16":
        dtype = torch.bfloat16
    channels_last = train_cfg.channels_last and device.type == "cuda" and has_conv(model)
    return Compute(device.type, dtype, channels_last)
