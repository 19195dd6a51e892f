"""One decode path: `geoloc predict` sees a photo exactly as ingest + the dataset fed training.

Phone photos carry an EXIF orientation, PNGs carry alpha or 16-bit samples, print workflows
produce CMYK JPEGs: each is fed to `predict` and to ingest -> index -> `GeoDataset`, and the model
inputs must be the same tensors, bit for bit. A decompression bomb is refused by both.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.image_files import image_bytes
from PIL import ExifTags, Image

from geoloc.cli import main
from geoloc.config import IndexConfig
from geoloc.data.dataset import GeoDataset
from geoloc.data.index import build_index
from geoloc.data.ingest import ingest
from geoloc.infer.predict import Predictor, prepare_image
from geoloc.paths import DataPaths


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG")
    return buf.getvalue()


def _rgba_half_transparent() -> bytes:
    rng = np.random.default_rng(7)
    px = rng.integers(0, 255, (40, 90, 4), dtype=np.uint8)
    px[:, :45, 3] = 0  # left half fully transparent: must become white, not its hidden colour
    px[:, 45:, 3] = 255
    return _png(px)


def _sixteen_bit_mid_grey() -> bytes:
    return _png(np.full((50, 70), 32768, dtype=np.uint16))  # half of 0..65535


def _oriented(orientation: int | None) -> bytes:
    """The same 96x40 landscape pixels, with or without an EXIF Orientation tag."""
    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 255, (40, 96, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


PHOTOS = {
    "rotated.jpg": lambda: _oriented(6),  # a phone held upright: stored landscape, shown portrait
    "rgba.png": _rgba_half_transparent,
    "sixteen.png": _sixteen_bit_mid_grey,
    "cmyk.jpg": lambda: image_bytes(size=(80, 60), mode="CMYK", seed=4),
    "grey.jpg": lambda: image_bytes(size=(70, 90), mode="L", seed=5),
    "palette.png": lambda: image_bytes(size=(30, 30), mode="P", fmt="PNG", seed=6),
}


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels (a few bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, make in PHOTOS.items():
        (folder / name).write_bytes(make())
    return folder


def _ingested_inputs(photos: Path, predictor: Predictor, root: Path) -> dict[str, torch.Tensor]:
    """photo name -> the eval-transformed tensor training's dataset yields for it."""
    names = sorted(PHOTOS)
    rows = [f"{Path(n).stem},{10 + 3 * i},{20 + 3 * i},{n}" for i, n in enumerate(names)]
    (photos / "m.csv").write_text("id,lat,lon,path\n" + "\n".join(rows) + "\n")
    paths = DataPaths(root)
    cfg = IndexConfig(
        max_side=predictor.max_side, max_pixels=predictor.max_pixels, workers=1, resolution=2,
        parent_resolution=1, split="random", val_frac=0.0, test_frac=0.0, min_images_per_class=1,
    )  # fmt: skip
    report = ingest(str(photos / "m.csv"), paths, cfg)
    assert (report.accepted, report.rejected, report.duplicates) == (len(names), 0, 0)
    build_index(paths, cfg)
    ds = GeoDataset(paths.index, "train", predictor.transform, cache=False)
    ids = ds.table["image_id"].tolist()
    return {f"{i}{Path(n).suffix}": ds[ids.index(i)][0] for n in names for i in [Path(n).stem]}


def test_predict_sees_exactly_what_ingest_and_the_dataset_feed_training(
    trained_run: Path, photos: Path, tmp_path: Path
) -> None:
    predictor = Predictor(trained_run, rerank=False)
    # the index's processing settings reached predict through the checkpoint
    assert (predictor.max_side, predictor.max_pixels) == (64, IndexConfig().max_pixels)
    trained = _ingested_inputs(photos, predictor, tmp_path / "data")
    for name in PHOTOS:
        given = predictor.model_input(photos / name)
        assert given.dtype == torch.float32 and given.shape == trained[name].shape
        assert torch.equal(given, trained[name]), f"{name}: predict and training inputs differ"


def test_the_decode_rules_show_in_the_pixels(photos: Path, tmp_path: Path) -> None:
    """Orientation turns the image, alpha becomes white, 16-bit keeps its grey level."""
    rotated = prepare_image(photos / "rotated.jpg", 512, 10**8)
    assert tuple(rotated.shape) == (3, 96, 40), "Orientation=6 is shown portrait"
    (tmp_path / "plain.jpg").write_bytes(_oriented(None))
    plain = prepare_image(tmp_path / "plain.jpg", 512, 10**8)
    assert tuple(plain.shape) == (3, 40, 96)
    # same stored pixels, turned a quarter clockwise (JPEG noise aside)
    turned = torch.rot90(plain.float(), k=-1, dims=(1, 2))
    assert (turned - rotated.float()).abs().mean() < 4
    rgba = prepare_image(photos / "rgba.png", 512, 10**8).float()
    assert rgba[:, :, :40].mean() > 250, "transparent pixels are composited over white"
    grey = prepare_image(photos / "sixteen.png", 512, 10**8).float()
    assert abs(grey.mean().item() - 128) < 2, "16-bit samples are scaled, not clipped to white"


def test_a_decompression_bomb_is_refused_by_predict_as_by_ingest(
    trained_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    bomb = folder / "bomb.png"
    bomb.write_bytes(_bomb_png(10_000, 10_000))  # 100 megapixels, 1 kB on disk
    (folder / "ok.jpg").write_bytes(image_bytes(size=(40, 30), seed=1))
    out = tmp_path / "pred.json"
    assert main(["predict", "--run", str(trained_run), str(folder), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert "decompression_bomb" in rows["bomb.png"]["error"]
    assert "100000000 pixels > max_pixels 89478485" in rows["bomb.png"]["error"]
    assert rows["bomb.png"]["cell"] is None and rows["ok.jpg"]["error"] is None
    (folder / "m.csv").write_text("id,lat,lon,path\nb,10,10,bomb.png\n")
    paths = DataPaths(tmp_path / "data")
    report = ingest(str(folder / "m.csv"), paths, IndexConfig(workers=1))
    assert report.reasons == {"decompression_bomb": 1}
    assert pd.read_parquet(paths.rejects)["reason"].tolist() == ["decompression_bomb"]
