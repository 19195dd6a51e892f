"""The typed sections of a run's configuration: one pydantic model per concern.

Unknown keys are errors and assignments are validated (`StrictModel`), so a typo in a YAML file or a
`--set` fails before any work starts.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from geoloc.errors import split_password

TRACKING_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
TRACKING_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
"""MLflow's own HTTP basic-auth variables: where a tracking password lives (never in a file)."""


class StrictModel(BaseModel):
    """Base: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Index build
# --------------------------------------------------------------------------------------------


class IndexConfig(StrictModel):
    """How raw images become the canonical index under `data/index/`."""

    resolution: int = Field(7, ge=0, le=15, description="H3 resolution of the classes.")
    parent_resolution: int = Field(6, ge=0, le=15, description="H3 resolution of the parent head.")
    extra_resolutions: list[int] = Field(
        default_factory=list, description="More `h3_r*` columns to write in images.parquet."
    )
    min_images_per_class: int = Field(
        10, ge=1, description="Cells with fewer train images are merged into the nearest kept cell."
    )
    split: Literal["random", "geographic", "sequence"] = Field(
        "geographic", description="Split strategy."
    )
    split_resolution: int = Field(
        3,
        ge=0,
        le=15,
        description="Coarse H3 ancestor whose groups stay in one split (geographic).",
    )
    val_frac: float = Field(0.1, ge=0.0, lt=1.0, description="Share of images in val.")
    test_frac: float = Field(0.1, ge=0.0, lt=1.0, description="Share of images in test.")
    seed: int = Field(0, description="Seed of the split.")
    max_side: int = Field(512, ge=16, description="Processed images are resized to this max side.")
    shard_size_mb: int = Field(
        256, ge=1, le=4096,
        description="Processed images are stored in tar shards of about this many MiB.",
    )  # fmt: skip
    workers: int = Field(2, ge=1, description="Processes for image processing.")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Refuse images above this many pixels (decompression bombs)."
    )
    external_layers: list[str] = Field(
        default_factory=list,
        description="Extra GeoTIFF layers (paths, relative to data/external/) for h3_features.",
    )

    @model_validator(mode="after")
    def _check(self) -> IndexConfig:
        if self.parent_resolution >= self.resolution:
            fix = (
                f"set parent_resolution to at most {self.resolution - 1}"
                if self.resolution > 0
                else "set resolution to at least 1 (resolution 0 has no coarser level)"
            )
            raise ValueError(
                f"parent_resolution ({self.parent_resolution}) must be coarser than resolution "
                f"({self.resolution}): {fix}"
            )
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError("val_frac + test_frac must be < 1")
        return self

    @property
    def resolutions(self) -> list[int]:
        """Every H3 resolution that images.parquet carries, finest first."""
        res = {
            self.resolution,
            self.parent_resolution,
            self.split_resolution,
            *self.extra_resolutions,
        }
        return sorted(res, reverse=True)


# --------------------------------------------------------------------------------------------
# Model, training, hard negatives
# --------------------------------------------------------------------------------------------


class ModelConfig(StrictModel):
    """Which network maps an image to cell logits."""

    arch: str = Field(
        "multiscale_cnn",
        description="Backbone from the model registry (multiscale_cnn, resnet18, resnet50, "
        "efficientnet_b0, convnext_tiny).",
    )
    width: int = Field(32, ge=4, description="MultiScaleCNN: channels of the first stage.")
    depth: int = Field(4, ge=2, le=6, description="MultiScaleCNN: number of stages.")
    embed_dim: int = Field(256, ge=8, description="Embedding size before the heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the heads.")
    pretrained: bool = Field(
        False,
        description="Start from the arch's published ImageNet weights (torchvision), read from "
        "the torch hub cache ($TORCH_HOME/hub/checkpoints).",
    )
    download_weights: bool = Field(
        False,
        description="Download missing pretrained weights into the torch hub cache (else a "
        "missing file is an error that says how to pre-seed it).",
    )
    freeze_backbone: bool = Field(
        False,
        description="Keep the backbone fixed (eval mode, no gradients): only neck and heads train.",
    )
    hierarchy: bool = Field(True, description="Train a parent head jointly with the child head.")
    head: str = Field(
        "flat",
        description="Classifier head from the head registry: flat (one layer over all K classes) "
        "or factorised (P(parent) x P(child | parent), child logits only for the parents needed).",
    )
    sparse_head: bool = Field(
        False,
        description="Factorised head: the parent level as a tree of blocks and row-sparse "
        "updates of every table (a step costs the same at 10^3 and 10^6 classes; needs adamw).",
    )

    @model_validator(mode="after")
    def _factorised_has_parents(self) -> ModelConfig:
        if self.head == "factorised" and not self.hierarchy:
            raise ValueError(
                "model.head=factorised always predicts the parent cell: set model.hierarchy=true "
                "(or model.head=flat)"
            )
        if self.sparse_head and self.head != "factorised":
            raise ValueError("model.sparse_head=true needs model.head=factorised")
        return self


class HardNegConfig(StrictModel):
    """Hard negatives from the cells the model confuses: oversampled images (`mode=oversample`)
    or a distance-weighted margin against far cells' prototypes (`mode=margin`)."""

    enabled: bool = Field(False, description="Turn hard negatives on (`mode` says how).")
    share: float = Field(0.25, ge=0.0, le=0.9, description="Share of each epoch from the pool.")
    top_pairs: int = Field(50, ge=1, description="Most-confused (true, predicted) cell pairs kept.")
    pool_split: Literal["train", "val"] = Field(
        "train",
        description="Which split's confusion builds the pool (val leaks val into training).",
    )
    start_epoch: int = Field(1, ge=0, description="First epoch (0-based) that draws from the pool.")
    mode: Literal["oversample", "margin"] = Field(
        "oversample",
        description="oversample: re-draw images of confused cells; margin: a distance-weighted "
        "margin between each image's embedding and the prototypes of far cells its true cell "
        "is confused with (mined from the train split each epoch).",
    )
    margin: float = Field(0.2, ge=0.0, le=2.0, description="margin: cosine margin to keep.")
    margin_weight: float = Field(0.5, ge=0.0, description="margin: weight of the margin term.")
    negatives_per_cell: int = Field(
        4, ge=1, description="margin: far confused cells kept per true cell (the most confused)."
    )
    min_km: float | None = Field(
        None,
        gt=0,
        description="margin: only cells at least this far from the truth are negatives "
        "(None: 4x the class cells' mean edge length, so neighbours are never pushed away).",
    )

    @model_validator(mode="after")
    def _margin_mines_train(self) -> HardNegConfig:
        if self.mode == "margin" and self.pool_split != "train":
            raise ValueError(
                "hardneg.mode=margin mines from the train split only: set hardneg.pool_split=train"
            )
        return self


class TrainConfig(StrictModel):
    """The optimisation loop."""

    epochs: int = Field(10, ge=1, description="Training epochs.")
    batch_size: int = Field(128, ge=1, description="Global batch size.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    scheduler: Literal["cosine", "none"] = Field("cosine", description="LR schedule.")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs.")
    image_size: int = Field(64, ge=16, description="Model input side in pixels.")
    augment: bool = Field(True, description="Random flips/colour jitter on train images.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    cache_mb: int = Field(
        1024, ge=0,
        description="Splits whose decoded pixels fit in this many MiB are decoded once into "
        "memory (random access, hard negatives); larger ones stream from their shards.",
    )  # fmt: skip
    shuffle_buffer: int = Field(
        4096, ge=1,
        description="Streamed splits: images each loader worker holds to shuffle the "
        "sequential shard stream (a row leaves within this many reads).",
    )  # fmt: skip
    shards_url: str | None = Field(
        None,
        description="Read image shards from this pushed index (s3://bucket/prefix, as "
        "`geoloc s3 push --index` wrote it) instead of data/processed/shards/.",
    )
    checkpoint_every_steps: int = Field(
        1000, ge=0,
        description="Also save checkpoints/last.pt every N steps inside an epoch, so a killed "
        "run resumes mid-epoch (0: only at epoch ends).",
    )  # fmt: skip
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    amp: bool = Field(
        True, description="Mixed precision (autocast) on CUDA; on CPU only with amp_dtype=bf16."
    )
    amp_dtype: Literal["auto", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype: auto = bf16 where the GPU supports it, else fp16 (with a "
        "GradScaler); bf16 also autocasts on CPU.",
    )
    channels_last: bool = Field(
        True, description="channels_last memory format for conv backbones on CUDA."
    )
    compile: bool = Field(
        False, description="torch.compile the model for training (the first steps compile)."
    )
    deterministic: bool = Field(
        True,
        description="Reproducible cuDNN algorithms; false lets cuDNN benchmark and pick the "
        "fastest (GPU speed over bit-equal reruns).",
    )
    embeddings: Literal["online", "cache"] = Field(
        "online",
        description="cache: embed each image once with the frozen backbone (needs "
        "model.freeze_backbone), store it beside the index and train the heads on it.",
    )
    loss: Literal["ce", "geosoft", "geosoft_sparse"] = Field(
        "geosoft",
        description="Loss on the classes: ce, geosoft (dense distance-soft targets) or "
        "geosoft_sparse (the same over each cell's geosoft_neighbours nearest classes).",
    )
    geosoft_neighbours: int = Field(
        64,
        ge=1,
        description="geosoft_sparse: soft targets over this many nearest classes (the true one "
        "included); 64 keep ~99.4% of the dense target mass on a full H3 grid.",
    )
    tau_km: float | None = Field(
        None, gt=0, description="GeoSoft temperature in km; None scales it with the resolution."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="CE label smoothing.")
    sampling: Literal["uniform", "inverse_density", "class_balanced"] = Field(
        "uniform",
        description="How an epoch draws its N train images: uniform (a permutation), "
        "inverse_density (with replacement, p ~ density ** -density_power, density = train "
        "images in the image's H3 cell at density_resolution, as OSV-5M) or class_balanced "
        "(with replacement, every class equally likely).",
    )
    density_power: float = Field(
        0.75, ge=0.0, le=1.0, description="inverse_density: exponent of the density."
    )
    density_resolution: int | None = Field(
        None, ge=0, le=15, description="inverse_density: H3 resolution (None: the classes' + 1)."
    )
    class_weighting: Literal["none", "inverse", "effective"] = Field(
        "none", description="Per-class loss weights from train frequencies."
    )
    class_weight_beta: float = Field(
        0.999, gt=0.0, lt=1.0, description="Beta of effective-number weighting."
    )
    parent_loss_weight: float = Field(0.5, ge=0.0, description="Weight of the parent-head loss.")
    hier_topk_parents: int = Field(
        0,
        ge=0,
        description="At eval, score only children of the top-k parents (0: all; the factorised "
        "head then computes every child, K x D per image; rerank re-chooses k on val).",
    )
    early_stopping_metric: str = Field("val_p90_km", description="Metric for best/early stopping.")
    early_stopping_mode: Literal["min", "max"] = Field("min", description="min or max.")
    early_stopping_patience: int = Field(0, ge=0, description="Epochs without gain (0: off).")
    max_steps_per_epoch: int = Field(0, ge=0, description="Cap on steps per epoch (0: no cap).")
    checkpoint_every: int = Field(1, ge=1, description="Save checkpoints/last.pt every N epochs.")
    nproc: int = Field(1, ge=1, description="Processes for DistributedDataParallel.")


class RerankConfig(StrictModel):
    """Post-hoc reranking, refinement and calibration."""

    enabled: bool = Field(True, description="Run rerank evaluation after training.")
    prior_alpha: float = Field(0.3, ge=0.0, description="Class prior: train frequency ** alpha.")
    use_land_prior: bool = Field(True, description="Multiply by a land-fraction prior.")
    k_neighbors: int = Field(20, ge=1, description="Gallery neighbours that vote.")
    top_k: int = Field(10, ge=1, description="Model top-k cells the votes are blended into.")
    refine: bool = Field(True, description="Refine the coordinate from in-cell neighbours.")
    coverage: float = Field(0.9, gt=0.0, lt=1.0, description="Conformal set coverage.")
    conformal: Literal["auto", "lac", "aps", "raps"] = Field(
        "auto", description="Conformal cell-set score; auto: the smallest sets on val."
    )
    radius_coverage: float = Field(
        0.9, gt=0.0, lt=1.0, description="Share of truths the per-image error radius holds."
    )
    ood_flag_quantile: float = Field(
        0.95, gt=0.0, le=1.0,
        description="Out-of-distribution flag: photos whose gallery-distance score is above "
        "this quantile of val's are flagged as unlike the training photos (1.0: never).",
    )  # fmt: skip
    ood_widen_quantile: float = Field(
        0.8, gt=0.0, le=1.0,
        description="Above this quantile of val's OOD scores the radius and cell set cover "
        "where on land the photo may be (the land prior; 1.0: never). 0.8 meets the "
        "shift-split coverage goals on two demo seeds with test sets of 5.5% of the classes; "
        "0.9 keeps them at 2.7% but covers the shift split at 0.77 (docs/quality.md).",
    )  # fmt: skip
    ood_decode: Literal["none", "cells", "land"] = Field(
        "none",
        description="Widened photos: keep the answer (none) or move it to the least expected "
        "distance under the widened distribution among the top cells (cells) or land points too.",
    )
    index: Literal["auto", "faiss", "brute"] = Field("auto", description="Neighbour search.")
    gallery_images: int = Field(
        0, ge=0,
        description="Train images in the neighbour gallery (a class-stratified sample: the "
        "model's pass over train and every search cost this many); 0: all of train.",
    )  # fmt: skip
    tune_images: int = Field(
        20_000, ge=100,
        description="Val images (a class-stratified sample) the gate, prior and refinement are "
        "chosen on, the model's val pass covers and the val table reports; all of val when it "
        "is smaller.",
    )  # fmt: skip
    calibration_images: int = Field(
        2_000, ge=100,
        description="Of those, the images calibration, conformal sets, the error radius and "
        "min-risk decoding are fitted on.",
    )  # fmt: skip
    calibration_cells: int = Field(
        512, ge=64,
        description="Candidate cells per image that calibration, conformal sets, the error "
        "radius and min-risk decoding read; the rest of the mass is one tail term (memory: "
        "images x this, not images x classes; at least the classes: exact).",
    )  # fmt: skip
    ann_min_gallery: int = Field(
        200_000,
        ge=1,
        description="Galleries of at least this many images are searched through a faiss IVF "
        "index saved in the run (gallery_ivf.npz); smaller ones exactly.",
    )
    ann_nlist: int = Field(0, ge=0, description="IVF lists of that index (0: sqrt(gallery size)).")
    ann_nprobe: int = Field(
        320, ge=1, description="IVF lists scanned per query (more: higher recall, slower)."
    )


class TrackingConfig(StrictModel):
    """MLflow mirroring."""

    enabled: bool = Field(True, description="Mirror the run into MLflow.")
    experiment: str = Field("geoloc", description="MLflow experiment name.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db); "
        "a password in it is never saved: it goes to MLFLOW_TRACKING_PASSWORD for this process.",
    )
    register_model: bool | Literal["auto"] = Field(
        "auto",
        description="Register the model as `geoloc`: auto = only when the run beats the current "
        "champion on the leaderboard score (fixed reference); true = always; false = never.",
    )
    parent_run_id: str | None = Field(None, description="MLflow parent run (sweeps).")

    @field_validator("tracking_uri")
    @classmethod
    def _password_stays_in_the_environment(cls, v: str | None) -> str | None:
        # the config is saved (config.json, checkpoints, MLflow params, reports): keep the URI
        # without its password and hand the credentials to MLflow the way it reads them itself
        if v is None:
            return v
        uri, user, password = split_password(v)
        if password is not None:
            os.environ[TRACKING_USERNAME_ENV] = user or ""
            os.environ[TRACKING_PASSWORD_ENV] = password
        return uri


class RunConfig(StrictModel):
    """Everything one training run needs; saved whole as `runs/<run_id>/config.json`."""

    name: str = Field("run", min_length=1, max_length=64, description="Human name of the run.")
    seed: int = Field(0, description="Seeds python, numpy, torch and DataLoader workers.")
    index_dir: str | None = Field(
        None, description="Canonical index folder (default: $GEOLOC_DATA_DIR/index)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    hardneg: HardNegConfig = Field(default_factory=HardNegConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if "/" in v or "\\" in v or v.startswith("."):
            raise ValueError("name may not contain path separators or start with '.'")
        return v

    @model_validator(mode="after")
    def _embedding_cache_needs_a_fixed_input(self) -> RunConfig:
        # cached embeddings are computed once, with the eval transform, by a backbone that
        # never changes: anything else would train on stale or unaugmented features silently
        if self.train.embeddings == "cache":
            if not self.model.freeze_backbone:
                raise ValueError(
                    "train.embeddings=cache needs model.freeze_backbone=true (a backbone that "
                    "trains makes stored embeddings stale)"
                )
            if self.train.augment:
                raise ValueError(
                    "train.embeddings=cache embeds each image once without augmentation: set "
                    "train.augment=false"
                )
        if self.model.sparse_head and self.train.optimizer != "adamw":
            raise ValueError(
                "model.sparse_head=true updates its tables with a row-sparse AdamW: set "
                "train.optimizer=adamw"
            )
        return self
