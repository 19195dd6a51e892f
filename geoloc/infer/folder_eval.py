"""`geoloc evaluate`: a reranked run on a folder of GPS-tagged photos it has never seen.

The test split shares the index's placement of images (near cities for the demo); a shift split
(`geoloc data demo --placement uniform-land`) or any other folder of photos with GPS in EXIF
asks how the run does elsewhere. Every variant is evaluated with the parameters `geoloc rerank`
chose on val (nothing is tuned here): the same columns as `rerank_eval.csv`, with the truth from
each photo's EXIF. The true class, for cell-set coverage and top-1, is the class of the photo's
own H3 cell, else the class whose centre is nearest (as the index labels images).

Writes `artifacts/tables/rerank_eval_<name>.csv` and, for the variant chosen on val,
`artifacts/data/rerank_<name>_predictions.parquet` (the columns of `rerank_test_predictions`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from geoloc.atomic import atomic_path, write_text
from geoloc.data.process import gps_from_exif
from geoloc.errors import DataError, GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.evaluation import answer_table, variants_for
from geoloc.infer.gallery import Gallery
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.predict import Predictor, collect_images
from geoloc.infer.tuning import evaluation_table
from geoloc.model.scores import SCORE_INPUTS
from geoloc.progress import track

__all__ = ["FolderEvaluation", "evaluate_folder", "exif_location", "true_classes"]

log = logging.getLogger(__name__)


@dataclass
class FolderEvaluation:
    """What `evaluate_folder` measured and wrote."""

    table: pd.DataFrame  # one row per variant (rerank_eval.csv columns)
    answers: pd.DataFrame  # per image, the variant chosen on val
    best_variant: str
    table_path: Path
    answers_path: Path
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


def exif_location(path: Path) -> tuple[float, float]:
    """(lat, lon) from a photo's EXIF GPS; `DataError` naming why there is none."""
    try:
        with Image.open(path) as im:
            fix = gps_from_exif(im.getexif())
    except (OSError, ValueError) as exc:
        raise DataError(f"not a readable image: {type(exc).__name__}: {exc}") from exc
    if fix is None:
        raise DataError("no GPS position in EXIF")
    lat, lon = fix
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        raise DataError(f"unusable GPS position in EXIF ({lat}, {lon})")
    return float(lat), float(lon)


def true_classes(lat: np.ndarray, lon: np.ndarray, label_space: LabelSpace) -> np.ndarray:
    """(N,) the class of each point's own H3 cell, else the class with the nearest centre."""
    import h3

    labels = np.empty(len(lat), dtype=np.int64)
    for i, (a, b) in enumerate(zip(lat, lon, strict=True)):
        cell = h3.latlng_to_cell(float(a), float(b), label_space.resolution)
        try:
            labels[i] = label_space.index_of(cell)
        except GeolocError:
            labels[i] = int(np.argmin(haversine_km(a, b, label_space.lat, label_space.lon)))
    return labels


def _outputs(predictor: Predictor, files: list[Path], progress: bool) -> tuple[SplitOutputs, dict]:
    """The model's outputs for the photos that have a GPS fix and decode; reasons for the rest."""
    skipped: dict[str, str] = {}
    located: list[Path] = []
    coords: list[tuple[float, float]] = []
    for path in files:
        try:
            coords.append(exif_location(path))
            located.append(path)
        except DataError as exc:
            skipped[str(path)] = str(exc)
    heads: dict[str, list[np.ndarray]] = {}
    embs, kept = [], []
    n_batches = (len(located) + predictor.batch_size - 1) // predictor.batch_size
    batches = predictor.batches(located)  # the decode path of `geoloc predict`
    for batch in track(batches, total=n_batches, desc="evaluate", unit="batch", bars=progress):
        for i, reason in batch.errors.items():
            skipped[str(batch.paths[i])] = reason
        if batch.images is None:
            continue
        head, emb = predictor.forward(batch.images)
        for name, value in head.items():
            heads.setdefault(name, []).append(value)
        embs.append(emb)
        kept += [batch.paths[i] for i in batch.ok]
    if not kept:
        first = next(iter(skipped.items()), ("", "none found"))
        raise DataError(
            f"no photo with a usable GPS position could be evaluated ({len(files)} files; "
            f"e.g. {first[0]}: {first[1]})"
        )
    where = dict(zip(located, coords, strict=True))
    lat = np.array([where[p][0] for p in kept])
    lon = np.array([where[p][1] for p in kept])
    out = SplitOutputs(
        **{name: np.concatenate(heads[name]) if name in heads else None for name in SCORE_INPUTS},
        embeddings=np.concatenate(embs),
        labels=true_classes(lat, lon, predictor.label_space),
        lat=lat,
        lon=lon,
        image_ids=np.array([str(p) for p in kept]),
    )
    return out, skipped


def evaluate_folder(
    run_dir: Path,
    paths: list[Path],
    *,
    name: str = "folder",
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> FolderEvaluation:
    """Every rerank variant of a reranked run on GPS-tagged photos under `paths`.

    Nothing is tuned: the run's `rerank_params.json` (chosen on val) is applied as
    `geoloc predict` applies it. Photos without a usable GPS fix or that do not decode are
    skipped with a reason. Writes the table and the per-image answers into the run.
    """
    if not name.replace("-", "").replace("_", "").isalnum():
        raise GeolocError(f"evaluation name '{name}' must be letters, digits, '-' or '_'")
    predictor = Predictor(Path(run_dir), rerank=True, batch_size=batch_size, device=device)
    params = predictor.params
    if params is None:
        raise DataError(f"run '{run_dir}' has no rerank params: run `geoloc rerank` on it first")
    files = collect_images(paths)
    if not files:
        raise DataError(f"no image files under {', '.join(str(p) for p in paths)}")
    out, skipped = _outputs(predictor, files, progress)
    ls = predictor.label_space
    gallery = predictor.gallery or Gallery.load(predictor.paths.gallery)
    variants = variants_for(out, gallery, ls, params)
    table = evaluation_table(variants, out, params, ls)
    best = params.best_variant
    answers = answer_table(best, variants[best], out, params, ls, variants["gated"].nbrs)
    table_path = predictor.paths.tables / f"rerank_eval_{name}.csv"
    answers_path = predictor.paths.data / f"rerank_{name}_predictions.parquet"
    write_text(table_path, table.to_csv(index=False, float_format="%.6g"))
    with atomic_path(answers_path) as tmp:
        answers.to_parquet(tmp, index=False)
    if skipped:
        log.warning("%d of %d files skipped (no GPS or unreadable)", len(skipped), len(files))
    return FolderEvaluation(table, answers, best, table_path, answers_path, skipped)
