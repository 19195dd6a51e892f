"""`geoloc predict`: where were these photos taken, with a trained run.

`Predictor(run_dir)` loads the run's best checkpoint (model + label space), and, when the run has
been through `geoloc rerank`, its train gallery and `rerank_params.json`: the variant chosen on
val, its temperature and its conformal threshold. `predict(paths)` returns one row per image:

`path, lat, lon, cell, prob, topk_cells, topk_lats, topk_lons, topk_probs, conformal_set,
conformal_coverage, radius_km, radius_coverage, ood_score, ood_flag, variant, error`

`prob` and `topk_probs` are calibrated on val; `topk_lats`/`topk_lons` are the centres of
`topk_cells` (a user reads places, not H3 ids); `conformal_set` holds the cells that contain
the true cell with probability `conformal_coverage` (split conformal on val); the true location
lies within `radius_km` of (`lat`, `lon`) with probability `radius_coverage`
(`geoloc.infer.radius`). `ood_score` says how far the photo's embedding is from the training
gallery and `ood_flag` that it is further than 95% of val's (`geoloc.infer.ood`): a flagged
photo's answer is hedged and its radius and set widen with the score. A file that is not a
readable image gets a row with `error` set and empty predictions; the others are predicted.
Images go through what training's images went through: ingest's decode (EXIF orientation, alpha
over white, 16-bit scaling, decompression-bomb limit), its shrink to the index's `max_side` and
JPEG, the dataset's decode and the eval transform; then they are predicted in batches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geoloc.atomic import atomic_path, write_text
from geoloc.config import IndexConfig
from geoloc.data import rejects as R
from geoloc.data.dataset import image_tensor
from geoloc.data.decode import Rejected
from geoloc.data.process import clean_image
from geoloc.errors import DataError, GeolocError
from geoloc.infer.ann import AnnSettings, use_run_index
from geoloc.infer.calibration import ConformalSets
from geoloc.infer.candidates import TopCells, radius_km_top, set_members_top
from geoloc.infer.gallery import Gallery, l2_normalize
from geoloc.infer.ood import OodAnswer, is_degenerate, ood_for, widened_members
from geoloc.infer.outputs import base_probs
from geoloc.infer.radius import ErrorRadius
from geoloc.infer.rerank import Neighbours, RerankParams, VariantOutput, run_variants
from geoloc.model.scores import SCORE_INPUTS
from geoloc.runfolder.layout import RunPaths

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_COLUMNS",
    "Predictor",
    "collect_images",
    "error_row",
    "write_predictions",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
OUTPUT_COLUMNS = (
    "path", "lat", "lon", "cell", "prob", "topk_cells", "topk_lats", "topk_lons", "topk_probs",
    "conformal_set", "conformal_coverage", "radius_km", "radius_coverage", "ood_score",
    "ood_flag", "variant", "error",
)  # fmt: skip
LIST_COLUMNS = ("topk_cells", "topk_lats", "topk_lons", "topk_probs", "conformal_set")


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files to predict, in a stable order: given files as they are, folders recursively.

    Inside folders only files with an image suffix count (a `.DS_Store` is not a photo); a file
    named explicitly is always tried, so a broken one gets an error row instead of vanishing.
    A path that does not exist is kept too and reported as an error row.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                log.warning("folder '%s' holds no image files", p)
            out.extend(found)
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def prepare_image(path: Path, max_side: int, max_pixels: int) -> torch.Tensor:
    """(3, H, W) uint8 pixels of a photo exactly as ingest + the dataset would give them.

    Ingest decodes (`geoloc.data.decode`), shrinks to `max_side` and stores a JPEG; the dataset
    decodes that JPEG. Doing the same here in memory is what makes a prediction see the pixels
    training saw, bit for bit. `DataError` with a one-line reason for anything unusable.
    """
    if not path.exists():
        raise DataError("file does not exist")
    if not path.is_file():
        raise DataError("not a regular file")
    return prepare_image_bytes(path.read_bytes(), max_side, max_pixels)


def prepare_image_bytes(data: bytes, max_side: int, max_pixels: int) -> torch.Tensor:
    """`prepare_image` of a photo's encoded bytes (a file's content, an upload)."""
    if not data:
        raise DataError("empty image (0 bytes)")
    try:
        jpeg, *_ = clean_image(bytes(data), max_side, max_pixels)
    except OSError as exc:
        raise DataError(f"not a readable image: {type(exc).__name__}: {exc}") from exc
    except Rejected as exc:
        raise DataError(_reason(exc)) from exc
    return image_tensor(jpeg)


def _reason(rej: Rejected) -> str:
    if rej.reason == R.DECOMPRESSION_BOMB:
        return f"refused as a decompression bomb ({rej.reason}): {rej.detail}"
    return f"not a readable image ({rej.reason}): {rej.detail}"


@dataclass
class Batch:
    paths: list[Path | bytes]
    images: torch.Tensor | None  # (B, 3, S, S) for the readable ones
    ok: list[int]  # positions in `paths` that decoded
    errors: dict[int, str]
    degenerate: np.ndarray | None = None  # (B,) bool: blank, one colour or noise (not a photo)


class Predictor:
    """A trained run ready to answer: model, labels, and (optionally) gallery + rerank params."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rerank: bool = True,
        top_k: int = 5,
        batch_size: int = 64,
        device: str | None = None,
        max_side: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        from geoloc.infer.trained import load_trained

        if top_k < 1:
            raise GeolocError(f"top-k must be >= 1, got {top_k}")
        self.paths = RunPaths(Path(run_dir))
        self.trained = load_trained(self.paths.root, "best", device=device)
        self.label_space = self.trained.label_space
        self.transform = self.trained.transform()
        self.top_k = min(top_k, self.label_space.num_classes)
        self.batch_size = batch_size
        # the index's processing settings travel in the checkpoint's label space (labels.json)
        processing = self.label_space.extra.get("processing") or {}
        defaults = IndexConfig()
        self.max_side = int(max_side or processing.get("max_side") or defaults.max_side)
        self.max_pixels = int(max_pixels or processing.get("max_pixels") or defaults.max_pixels)
        self.params = self._load_params()
        if self.trained.config.model.head == "factorised" and self.params is not None:
            # the k rerank chose on val, and the model's own for `base`: score enough for both
            self.trained.model.topk_parents = max(self.hier_topk_parents,
                                                  self.params.base_topk_parents)  # fmt: skip
        self.gallery: Gallery | None = None
        self.variant = "base"
        if rerank and self.params is not None:
            self.variant = self.params.best_variant
            if self.variant != "base" or self.params.ood is not None:
                self.gallery = Gallery.load(self.paths.gallery)
                ann = AnnSettings.from_config(self.trained.config.rerank)
                use_run_index(self.gallery, self.paths.gallery, ann, self.params.index)
        elif rerank:
            log.warning(
                "run '%s' has no rerank params (run `geoloc rerank` first): predicting with the "
                "base model, uncalibrated, without conformal sets",
                self.paths.root,
            )

    def _load_params(self) -> RerankParams | None:
        path = self.paths.rerank_params
        if not path.is_file():
            return None
        return RerankParams.load(path)

    def model_input(self, image: Path | bytes) -> torch.Tensor:
        """(3, S, S) model input of one photo (a file or its bytes): ingest's decode and shrink,
        then eval transform."""
        return self.transform(self._pixels(image))

    def _pixels(self, image: Path | bytes) -> torch.Tensor:
        if isinstance(image, bytes | bytearray | memoryview):
            return prepare_image_bytes(bytes(image), self.max_side, self.max_pixels)
        return prepare_image(Path(image), self.max_side, self.max_pixels)

    @property
    def hier_topk_parents(self) -> int:
        """The k rerank chose on val (`rerank_params.json`), else the run's config."""
        if self.params is not None:
            return self.params.hier_topk_parents
        return self.trained.config.train.hier_topk_parents

    def batches(self, files: Sequence[Path | bytes]) -> Iterator[Batch]:
        """`batch_size` images (files or bytes) at a time: model inputs of those that decode,
        reasons for the others."""
        for start in range(0, len(files), self.batch_size):
            chunk = list(files[start : start + self.batch_size])
            tensors, ok, errors, degenerate = [], [], {}, []
            for i, path in enumerate(chunk):
                try:
                    pixels = self._pixels(path)
                    tensors.append(self.transform(pixels))
                    degenerate.append(is_degenerate(pixels.numpy()))
                    ok.append(i)
                except DataError as exc:
                    errors[i] = str(exc)
            images = torch.stack(tensors) if tensors else None
            yield Batch(chunk, images, ok, errors, np.array(degenerate, dtype=bool))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The head outputs `base_probs` reads, and L2-normalised embeddings."""
        out = self.trained.model(images.to(self.trained.device))
        head = {
            name: (v.float() if v.is_floating_point() else v).cpu().numpy()
            for name, v in out.items()
            if name in SCORE_INPUTS
        }
        return head, l2_normalize(out["embedding"].float().cpu())

    def _answer(
        self, images: torch.Tensor, degenerate: np.ndarray | None = None
    ) -> tuple[VariantOutput, OodAnswer | None]:
        head, emb = self.forward(images)
        probs = base_probs(head, self.label_space, self.hier_topk_parents)
        if self.variant == "base" and self.params is not None:  # the model alone, as trained
            probs = base_probs(head, self.label_space, self.params.base_topk_parents)
        if self.params is None or self.gallery is None:
            pred = probs.argmax(axis=1)
            ls = self.label_space
            closed = np.zeros(len(pred), bool)
            return VariantOutput(probs, pred, ls.lat[pred], ls.lon[pred], closed), None
        nbrs = Neighbours.search(
            self.gallery, emb, min(self.params.neighbours, len(self.gallery)), self.params.index
        )  # type: ignore[arg-type]
        answer = run_variants(probs, nbrs, self.label_space, self.params)[self.variant]
        ood = ood_for(self.params, self.variant, answer, nbrs, self.label_space, degenerate)
        return answer, ood

    def _rows(
        self, answer: VariantOutput, ood: OodAnswer | None = None, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        sets: ConformalSets | None = None
        radius: ErrorRadius | None = None
        if self.params is not None:  # calibrated, on each image's candidate cells
            top = self.params.calibrated_top(self.variant, answer)
            sets = self.params.conformal.get(self.variant)
            radius = self.params.radius.get(self.variant)
        else:
            top = TopCells.from_dense(answer.scores, None, 0)
        set_cells: list[np.ndarray] | None = None  # each row's set, most likely first
        if sets is not None and ood is not None:  # widened sets: the land cells too
            dense = widened_members(top, sets, ood)[0]
            set_cells = [np.flatnonzero(row) for row in dense]
        elif sets is not None:
            member = set_members_top(top, sets.threshold, sets.method, sets.k_reg, sets.penalty)[0]
            set_cells = [top.cells[i, np.flatnonzero(row)] for i, row in enumerate(member)]
        radii = (
            radius_km_top(radius, top, answer.lat, answer.lon, self.label_space, answer.nbrs)
            if radius is not None
            else None
        )
        lat, lon, pred_cells = answer.lat, answer.lon, answer.pred
        if ood is not None:  # hedged answers for flagged photos, radii and sets widened
            lat, lon, radii, pred_cells = ood.lat, ood.lon, ood.radius_km, ood.pred
        cells = np.asarray(self.label_space.cells, dtype=object)
        k = self.top_k if top_k is None else max(1, min(top_k, self.label_space.num_classes))
        order = np.argsort(-top.p, axis=1, kind="stable")[:, :k]  # candidate columns
        prob = top.prob_of(answer.pred)
        rows = []
        for i, pred in enumerate(pred_cells):
            in_set = _by_probability(top, i, set_cells[i]) if set_cells is not None else []
            best = top.cells[i, order[i]]
            rows.append(
                {
                    "lat": float(lat[i]),
                    "lon": float(lon[i]),
                    "cell": str(cells[pred]),
                    "prob": float(prob[i]),
                    "topk_cells": [str(cells[c]) for c in best],
                    "topk_lats": [float(self.label_space.lat[c]) for c in best],
                    "topk_lons": [float(self.label_space.lon[c]) for c in best],
                    "topk_probs": [float(top.p[i, c]) for c in order[i]],
                    "conformal_set": [str(cells[c]) for c in in_set],
                    "conformal_coverage": None if sets is None else sets.coverage,
                    "radius_km": None if radii is None else _finite(radii[i]),
                    "radius_coverage": None if radius is None else radius.coverage,
                    "ood_score": None if ood is None else float(ood.score[i]),
                    "ood_flag": None if ood is None else bool(ood.flag[i]),
                    "variant": self.variant,
                    "error": None,
                }
            )
        return rows

    def predict(self, paths: Iterable[str | Path], progress: bool = True) -> pd.DataFrame:
        """One row per image file under `paths` (see the module docstring for the columns)."""
        files = collect_images(paths)
        return self._table(files, [str(f) for f in files], progress=progress)

    def predict_images(
        self,
        images: Sequence[bytes | Path],
        names: Sequence[str] | None = None,
        *,
        top_k: int | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """`predict` of photos given as encoded bytes (uploads, a served model's input) or
        single files, in their order; `path` holds `names` (default `image-<i>`). The same
        decode and scoring as files, so an upload gets the answer its file would."""
        names = [f"image-{i}" for i in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise GeolocError(f"{len(images)} images but {len(names)} names")
        return self._table(list(images), names, top_k=top_k, progress=progress)

    def _table(
        self, items: Sequence[Path | bytes], names: Sequence[str], *, top_k: int | None = None,
        progress: bool = True,
    ) -> pd.DataFrame:  # fmt: skip
        rows: list[dict[str, Any]] = []
        n_batches = (len(items) + self.batch_size - 1) // self.batch_size
        start = 0
        for batch in tqdm(
            self.batches(items), total=n_batches, desc="predict", unit="batch",
            disable=not progress, leave=False,
        ):  # fmt: skip
            answers = (
                self._rows(*self._answer(batch.images, batch.degenerate), top_k=top_k)
                if batch.images is not None
                else []
            )
            by_pos = dict(zip(batch.ok, answers, strict=True))
            for i in range(len(batch.paths)):
                row = by_pos.get(i) or error_row(batch.errors[i], self.variant)
                rows.append({"path": names[start + i], **row})
            start += len(batch.paths)
        table = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        n_err = int(table["error"].notna().sum()) if len(table) else 0
        if n_err:
            log.warning("%d of %d files could not be predicted (see the error column)", n_err,
                        len(table))  # fmt: skip
        return table


def error_row(reason: str, variant: str) -> dict[str, Any]:
    """The output row of an input that could not be predicted: no answer, `error` says why."""
    return {
        "lat": None, "lon": None, "cell": None, "prob": None, "topk_cells": [], "topk_lats": [],
        "topk_lons": [], "topk_probs": [],
        "conformal_set": [], "conformal_coverage": None, "radius_km": None,
        "radius_coverage": None, "ood_score": None, "ood_flag": None, "variant": variant,
        "error": reason,
    }  # fmt: skip


def _by_probability(top: TopCells, row: int, classes: np.ndarray) -> list[int]:
    """`classes` of image `row`, most likely first (tail cells: the tail's equal share)."""
    mass = dict(zip(top.cells[row].tolist(), top.p[row].tolist(), strict=True))
    share = float(top.tail[row]) / max(top.tail_count, 1)
    return sorted((int(c) for c in classes), key=lambda c: (-mass.get(c, share), c))


def _finite(x: float) -> float | None:
    """A number for the table, None for an unbounded radius (too few val images to calibrate)."""
    return float(x) if np.isfinite(x) else None


def write_predictions(table: pd.DataFrame, out: Path) -> None:
    """Write by extension: `.csv` (list columns as JSON strings), `.parquet`, `.json` (records)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".csv":
        flat = table.copy()
        for col in LIST_COLUMNS:
            flat[col] = flat[col].map(json.dumps)
        write_text(out, flat.to_csv(index=False))
    elif suffix == ".parquet":
        with atomic_path(out) as tmp:
            table.to_parquet(tmp, index=False)
    elif suffix == ".json":
        records = json.loads(table.to_json(orient="records"))
        write_text(out, json.dumps(records, indent=2) + "\n")
    else:
        raise GeolocError(
            f"output '{out}': unknown format '{suffix}' (use .csv, .parquet or .json)"
        )
