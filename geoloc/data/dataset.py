"""The dataset, once: index split -> (image tensor, label, parent label, row index).

`GeoDataset` reads the canonical index (`images.parquet` for where each image is stored and its
coordinates, `splits.parquet` for the split and the labels) and nothing else; training,
evaluation, rerank and prediction all go through it and through `build_transforms`, so an image
is decoded and normalised one way everywhere.

Images live in tar shards (`geoloc.data.imagestore`; older indexes name one file per image).
A small split is decoded into memory once, as uint8 tensors, by one sequential pass over its
shards: on 2 CPU cores JPEG decoding is a visible share of an epoch at 64x64 (see
`benchmarks/bench_dataloader.py`), and a cached split gives bit-identical samples to an uncached
one because both go through the same uint8 -> float transform. "Small" is `TrainConfig.cache_mb`
of decoded pixels; larger splits are streamed from their shards by `geoloc.data.streaming`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from geoloc.atomic import file_sha256
from geoloc.config import TrainConfig
from geoloc.data.decode import DEFAULT_MAX_PIXELS, Rejected, decode_image
from geoloc.data.imagestore import LOCATION_COLUMNS, ImageLocations, ShardError
from geoloc.errors import DataError, IndexMissingError
from geoloc.progress import track

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
DEFAULT_CACHE_BYTES = TrainConfig.model_fields["cache_mb"].default << 20
"""Splits whose decoded pixels fit in this many bytes are cached in memory (`train.cache_mb`)."""


class EmptySplitError(DataError):
    """A split of the index has no images."""


Transform = Callable[[torch.Tensor], torch.Tensor]
Sample = tuple[torch.Tensor, int, int, int]


def index_files(index_dir: Path) -> dict[str, Path]:
    """The three index files a training run needs, by name."""
    return {
        "images": index_dir / "images.parquet",
        "splits": index_dir / "splits.parquet",
        "labels": index_dir / "labels.json",
    }


def check_index(index_dir: Path) -> None:
    """Raise `IndexMissingError` naming the folder/file when the index cannot be trained on."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise IndexMissingError(
            f"index folder '{index_dir}' does not exist (run `geoloc index build` first)"
        )
    for name, path in index_files(index_dir).items():
        if not path.is_file():
            raise IndexMissingError(
                f"index file '{path}' is missing ({name}; run `geoloc index build` first)"
            )
        if path.stat().st_size == 0:
            raise IndexMissingError(f"index file '{path}' is empty (rebuild the index)")
    # labels.json names the images.parquet its splits were made from (by sha256, not by time, so
    # a pulled or copied index passes); an index built before it was recorded is not checked
    files = index_files(index_dir)
    try:
        made_from = json.loads(files["labels"].read_text()).get("images_sha256")
    except (OSError, ValueError, AttributeError):
        return  # reading labels.json reports its own error
    if made_from and made_from != file_sha256(files["images"]):
        raise IndexMissingError(
            f"index file '{files['splits']}' was made from another '{files['images'].name}': an "
            "index build stopped before its splits stage; run `geoloc index build` again"
        )


def read_split_table(index_dir: Path, split: str) -> pd.DataFrame:
    """One row per image of `split`: splits.parquet joined with images.parquet, in index order.

    Columns: image_id, path, lat, lon, label, parent_label, label_cell (plus width/height and the
    shard location columns when the index has them). Order is the order of splits.parquet, so
    row positions are stable.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    index_dir = Path(index_dir)
    check_index(index_dir)
    files = index_files(index_dir)
    try:
        splits = pd.read_parquet(files["splits"])
        images = pd.read_parquet(files["images"])
    except (OSError, ValueError) as exc:
        raise IndexMissingError(f"index in '{index_dir}' could not be read: {exc}") from exc
    _require_columns(splits, files["splits"], ("image_id", "split", "label", "parent_label"))
    _require_columns(images, files["images"], ("image_id", "path", "lat", "lon"))
    if images.empty or splits.empty:
        raise IndexMissingError(f"index in '{index_dir}' has no images (rebuild the index)")
    part = splits.loc[splits["split"] == split].reset_index(drop=True)
    if part.empty:
        raise EmptySplitError(f"split '{split}' of index '{files['splits']}' has no images")
    wanted = ("image_id", "path", "lat", "lon", "width", "height", *LOCATION_COLUMNS)
    keep = [c for c in wanted if c in images]
    table = part.merge(images[keep], on="image_id", how="left", validate="one_to_one")
    missing = table["path"].isna()
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} image(s) of split '{split}' in '{files['splits']}' are not in "
            f"'{files['images']}' (e.g. {table.loc[missing, 'image_id'].iloc[0]})"
        )
    if "label_cell" not in table:
        table["label_cell"] = ""
    return table


def _require_columns(df: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise IndexMissingError(f"index file '{path}' lacks column(s) {', '.join(missing)}")


def image_tensor(src: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> torch.Tensor:  # fmt: skip
    """(3, H, W) uint8 RGB tensor of an image file (or its bytes), decoded by the one decode every
    model input goes through (`geoloc.data.decode`); `DataError` naming the file (or `name`, for
    bytes) when unusable."""
    try:
        rgb = decode_image(src, max_pixels)
    except Rejected as exc:
        label = name or ("image bytes" if isinstance(src, bytes) else f"image '{src}'")
        raise DataError(f"{label} could not be read: {exc.reason}: {exc.detail}") from exc
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


class GeoDataset(Dataset[Sample]):
    """Images of one split of the canonical index: `(image (3,S,S), label, parent, row)`.

    `row` is the position in this split (0..len-1), so evaluation maps predictions back to
    `table.image_id` and the hard-negative pool returns train indices. Image locations in the index
    are relative to the data root, which is the index folder's parent unless `data_root` says
    otherwise; `shards_url` reads the shards from a pushed index on S3 instead.
    `cache=None` caches decoded pixels when they fit in `cache_bytes`; that decode (one
    sequential pass over the shards) shows a bar or log lines as `progress` says.
    `unreadable="skip"` leaves images that cannot be read out of the split, one warning line
    each naming the shard and member (training: the other shards still load); `"raise"` stops
    at the first with that line as a `DataError`.
    `rows` keeps only those positions of the split's table (a sample: rerank's val tuning
    sample), chosen before anything is decoded; `row` then counts within them.
    """

    def __init__(
        self,
        index_dir: Path,
        split: str,
        transform: Transform | None = None,
        *,
        data_root: Path | None = None,
        cache: bool | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        shards_url: str | None = None,
        unreadable: str = "raise",
        progress: bool | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.split = split
        self.transform = transform
        self.data_root = Path(data_root) if data_root is not None else self.index_dir.parent
        self.shards_url = shards_url
        self.unreadable = unreadable
        self.skipped = 0  # images left out as unreadable when decoded into memory
        self._cache: list[torch.Tensor] | None = None
        table = read_split_table(self.index_dir, split)
        self._set_table(table if rows is None else table.iloc[np.asarray(rows, dtype=np.int64)])
        use_cache = cache if cache is not None else self.decoded_bytes() <= cache_bytes
        if use_cache:
            self._cache = self._decode_all(progress)

    def _set_table(self, table: pd.DataFrame) -> None:
        self.table = table.reset_index(drop=True)
        self.labels = self.table["label"].to_numpy(dtype=np.int64)  # (N,)
        self.parent_labels = self.table["parent_label"].to_numpy(dtype=np.int64)  # (N,)
        self.locations = ImageLocations(self.table, self.data_root, self.shards_url)

    def __len__(self) -> int:
        return len(self.table)

    def decoded_bytes(self) -> int:
        """Bytes the decoded uint8 pixels of this split take (from the index's width/height)."""
        if {"width", "height"} <= set(self.table.columns):
            wh = self.table["width"].fillna(0).astype(np.int64) * self.table["height"].fillna(0)
            return int(wh.sum()) * 3
        return len(self) * 512 * 512 * 3  # unknown sizes: assume the processing default

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def _decode_all(self, progress: bool | None) -> list[torch.Tensor]:
        """Every image, read in storage order (sequential shard reads), kept by row."""
        order = self.locations.storage_order()
        pixels: list[torch.Tensor | None] = [None] * len(self)
        bad: list[int] = []
        it = track(self.locations.iter_bytes(order), total=len(order),
                   desc=f"decode {self.split}", unit="img", bars=progress)  # fmt: skip
        for row, data in it:
            try:
                if isinstance(data, ShardError):
                    raise data
                pixels[row] = self.image_from_bytes(row, data)
            except (DataError, OSError) as exc:
                self._unreadable(row, exc)
                bad.append(row)
        if bad:
            self.skipped = len(bad)
            keep = np.setdiff1d(np.arange(len(self)), bad)
            log.warning("split '%s': %d of %d images are unreadable and left out", self.split,
                        len(bad), len(self))  # fmt: skip
            self._set_table(self.table.iloc[keep])
            return [pixels[i] for i in keep]  # type: ignore[misc]
        return pixels  # type: ignore[return-value]

    def _unreadable(self, row: int, exc: Exception) -> None:
        msg = str(exc) if isinstance(exc, DataError) else f"{self.locations.describe(row)}: {exc}"
        if self.unreadable != "skip":
            raise exc if isinstance(exc, DataError) else DataError(msg) from exc
        log.warning("skipping an unreadable image: %s", msg)

    def image_from_bytes(self, i: int, data: bytes) -> torch.Tensor:
        """(3, H, W) uint8 pixels of row `i` from its stored bytes; errors name shard/member."""
        return image_tensor(data, name=self.locations.describe(i))

    def raw_image(self, i: int) -> torch.Tensor:
        """(3, H, W) uint8 pixels of row `i`, from the cache or its shard (or file)."""
        if self._cache is not None:
            return self._cache[i]
        file = self.locations.file(i)
        if file is not None:
            return image_tensor(file)
        return self.image_from_bytes(i, self.locations.read(i))

    def sample(self, i: int, image: torch.Tensor) -> Sample:
        x = self.transform(image) if self.transform is not None else image
        return x, int(self.labels[i]), int(self.parent_labels[i]), i

    def sample_from_bytes(self, i: int, data: bytes) -> Sample:
        """The sample of row `i` from bytes a sequential shard read delivered."""
        return self.sample(i, self.image_from_bytes(i, data))

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i, self.raw_image(i))


def build_transforms(train_cfg: TrainConfig, train: bool) -> Transform:
    """uint8 (3,H,W) -> float (3,S,S) normalised; light augmentation for training when asked.

    No flips: the demo images are satellite crops and street photos are not mirror-symmetric
    either, so a flipped image shows a place that does not exist. A mild crop/scale and colour
    jitter are what survive that argument.
    """
    size = train_cfg.image_size
    steps: list[torch.nn.Module] = []
    if train and train_cfg.augment:
        steps += [
            v2.RandomResizedCrop((size, size), scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15),
        ]
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: python and numpy follow the worker's torch seed.

    torch seeds each worker from the loader's generator; python's `random` and numpy are not,
    so without this every worker would draw the same augmentation numbers.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset[Sample],
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    sampler: Sampler[Any] | Sequence[int] | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> DataLoader[Sample]:
    """A DataLoader whose order and worker RNGs depend only on `seed` (and the sampler).

    `pin_memory` (page-locked batches, so `.to(cuda, non_blocking=True)` overlaps the copy)
    defaults to "a GPU is present"; pass `device.type == "cuda"` when the device is known.
    `persistent_workers` (default: whenever there are workers) keeps worker processes between
    passes over the loader instead of starting them again each time.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
        drop_last=drop_last,
    )
