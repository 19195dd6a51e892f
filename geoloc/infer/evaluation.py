"""Rerank evaluation of a trained run: the artifacts `geoloc rerank` produces.

One pass of the run's best model over train, val and test (`geoloc.infer.outputs`, cached), the
train gallery, every parameter chosen on val (`geoloc.infer.tuning`), then all variants evaluated
on val and test. The tables go to `artifacts/tables/rerank_eval.csv` (test) and
`rerank_eval_val.csv`; every chosen parameter goes to `artifacts/data/rerank_params.json`, which
`geoloc predict` reuses; the best variant on val goes to `summary.json` with its test numbers, and
its per-image test answers (point, error, calibrated probability, error radius, set size) to
`artifacts/data/rerank_test_predictions.parquet` (the dashboard's radius circles).
Reporting is not done here: the composer writes the report once the run's artifacts are in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.atomic import atomic_path, file_sha256, write_text
from geoloc.config import RerankConfig
from geoloc.formatting import fmt_km
from geoloc.geo import LabelSpace, haversine_km
from geoloc.heap import bound_heap_growth
from geoloc.infer.ann import AnnSettings, use_run_index
from geoloc.infer.calibration import Calibration
from geoloc.infer.candidates import TopCells, radius_km_top, set_size_top
from geoloc.infer.gallery import Gallery, IndexKind
from geoloc.infer.gate_search import block_rows
from geoloc.infer.ood import (
    OOD_VARIANT,
    OodAnswer,
    OodModel,
    fit_ood,
    ood_for,
    widened_members,
)
from geoloc.infer.outputs import (
    SplitOutputs,
    base_probs,
    model_probs,
    scored_columns,
    split_outputs,
)
from geoloc.infer.rerank import (
    VARIANTS,
    Neighbours,
    RerankParams,
    VariantOutput,
    class_log_prior,
    land_fraction_for,
    run_variants,
)
from geoloc.infer.trained import check_same_classes
from geoloc.infer.tuning import (
    TABLE_COLUMNS,
    TOPK_PARENTS,
    GateGrid,
    choose_best_variant,
    choose_topk_parents,
    ood_row_stats,
    row_stats,
    stratified_sample,
    table_row,
    tune,
)
from geoloc.progress import progress_log, track
from geoloc.runfolder.layout import RunPaths

__all__ = [
    "RerankResult",
    "answer_table",
    "evaluate_rerank",
    "rerank_run",
    "search_split",
    "split_evaluation",
    "split_sample",
    "variants_for",
]

log = logging.getLogger(__name__)

SEARCH_BATCH = 4_096
"""Queries per gallery search call (`search_split`)."""
COMPACT_VALUES, COMPACT_MIN_ROWS = 2_048, 8
"""A factorised head's evaluation block: about this many (scored children + neighbours) in
all, at least this many rows (`table_block_rows`; `benchmarks/bench_rerank_classes.py`)."""


@dataclass
class RerankResult:
    """What `rerank_run` wrote, for the CLI and flows to show."""

    run_dir: Path
    test_table: pd.DataFrame
    val_table: pd.DataFrame
    params: RerankParams
    best_variant: str


def evaluate_rerank(
    outs: dict[str, SplitOutputs],
    label_space: LabelSpace,
    cfg: RerankConfig,
    *,
    land_fraction: np.ndarray | None = None,
    hier_topk_parents: int = 0,
    grid: GateGrid = GateGrid(),
    progress: bool = True,
    gallery: Gallery | None = None,
    answers: list[pd.DataFrame] | None = None,
) -> tuple[RerankParams, dict[str, pd.DataFrame]]:
    """Choose every parameter on `outs["val"]`, then evaluate all variants on val and test.

    `outs` holds the model outputs of `train` (the gallery), `val` and `test`. No I/O: this is
    the part tests drive with synthetic outputs. Test labels are read only by the final tables.
    `answers`, when given, receives the chosen variant's per-image test answers
    (`answer_table`), made in the same pass as the test table.
    """
    bound_heap_growth()  # thousands of (block x classes) arrays follow
    gallery = gallery or outs["train"].to_gallery()
    k_search = min(max(*grid.k, cfg.k_neighbors, 50), len(gallery))
    val = outs["val"].subset(stratified_sample(outs["val"].labels, cfg.tune_images))
    model_topk_parents = hier_topk_parents  # `base` stays the model as training evaluated it
    if val.scored_parents:  # factorised head: its k is one more choice made on val
        hier_topk_parents, k_table = choose_topk_parents(val, label_space)
        log.info("factorised head: children of the top %d parents kept (chosen on val)\n%s",
                 hier_topk_parents, k_table.to_string(index=False))  # fmt: skip
    nbrs = search_split(gallery, val.embeddings, k_search, cfg.index, "val", progress)
    params = RerankParams(
        log_prior=class_log_prior(label_space, cfg.prior_alpha, land_fraction),
        hier_topk_parents=hier_topk_parents,
        model_topk_parents=model_topk_parents,
        neighbours=k_search,
        index=cfg.index,
    )

    def probs_of(out: SplitOutputs) -> np.ndarray:
        return base_probs(out.head_arrays(), label_space, hier_topk_parents)

    params = tune(params, val, nbrs, probs_of, label_space, cfg, grid, progress)

    def val_table() -> pd.DataFrame:  # on the tuning sample (all of val up to `tune_images`)
        return split_evaluation(val, gallery, label_space, params, "val", progress=progress,
                                nbrs=nbrs)[0]  # fmt: skip

    tables = {"val": val_table()}
    params.best_variant = choose_best_variant(tables["val"])
    params.ood = fit_ood_on_val(val, nbrs, probs_of, label_space, params, cfg)
    if params.ood is not None:  # the val table gains the OOD row (neighbours reused)
        tables["val"] = val_table()
    # test once: the table and the chosen variant's per-image answers in the same pass
    tables["test"], test_answers = split_evaluation(
        outs["test"], gallery, label_space, params, "test",
        answers_of=params.best_variant if answers is not None else None, progress=progress,
    )  # fmt: skip
    if answers is not None and test_answers is not None:
        answers.append(test_answers)
    return params, tables


def fit_ood_on_val(
    val: SplitOutputs,
    nbrs: Neighbours,
    probs_of: Callable[[SplitOutputs], np.ndarray],
    label_space: LabelSpace,
    params: RerankParams,
    cfg: RerankConfig,
) -> OodModel | None:
    """The OOD model of the chosen variant (`geoloc.infer.ood`), on the calibration sample of
    the val tuning sample; None without an error radius or when both OOD quantiles are 1."""
    name = params.best_variant
    radius = params.radius.get(name)
    if radius is None or min(cfg.ood_flag_quantile, cfg.ood_widen_quantile) >= 1.0 or not len(val):
        return None
    rows = stratified_sample(val.labels, cfg.calibration_images)
    fit, fit_nbrs = val.subset(rows), nbrs.subset(rows)
    tops, answers = [], []
    step = block_rows(label_space.num_classes)
    for s in range(0, len(fit), step):  # blocks: no (images x classes) array
        part = np.arange(s, min(s + step, len(fit)))
        v = run_variants(probs_of(fit.subset(part)), fit_nbrs.subset(part), label_space,
                         params)[name]  # fmt: skip
        tops.append(params.calibrated_top(name, v))
        answers.append((v.lat, v.lon, v.pred))
    lat, lon, pred = (np.concatenate(x) for x in zip(*answers, strict=True))
    return fit_ood(fit_nbrs, TopCells.concat(tops), lat, lon, pred, fit.lat, fit.lon,
                   radius, label_space, flag_quantile=cfg.ood_flag_quantile,
                   widen_quantile=cfg.ood_widen_quantile, decode=cfg.ood_decode,
                   set_level=cfg.coverage)  # fmt: skip


def split_evaluation(
    out: SplitOutputs,
    gallery: Gallery,
    label_space: LabelSpace,
    params: RerankParams,
    split: str,
    answers_of: str | None = None,
    progress: bool = True,
    block: int | None = None,
    nbrs: Neighbours | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Every variant on a split in blocks of `block` images (default `block_rows`; no split x
    classes array):
    the `TABLE_COLUMNS` table and, for the variant `answers_of`, the `answer_table`.
    `nbrs`: the split's gallery neighbours when already searched (row-aligned with `out`)."""
    bound_heap_growth()  # also reached without evaluate_rerank (`geoloc evaluate`)
    names = (*VARIANTS, OOD_VARIANT) if params.ood is not None else VARIANTS
    stats: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    answers = []
    if nbrs is None:  # searched up front in large batches, not per block (the costly part)
        k = min(params.neighbours, len(gallery))
        nbrs = search_split(gallery, out.embeddings, k, params.index, split, progress)  # type: ignore[arg-type]
    block = block or table_block_rows(out, label_space.num_classes, params.neighbours)
    starts = range(0, max(len(out), 1), block)  # an empty split is one empty block
    for s in track(starts, desc=f"rerank variants ({split})", unit="block", bars=progress):
        part = out.subset(slice(s, s + block))
        rows = np.arange(s, min(s + block, len(out)))
        known = None if nbrs is None else nbrs.subset(rows)
        variants = variants_for(part, gallery, label_space, params, nbrs=known)
        tops = _calibrated_tops(variants, params)
        for name, v in variants.items():
            stats[name].append(row_stats(name, v, part, params, label_space, cal=tops[name]))
        if params.ood is not None:
            chosen = tops[params.best_variant]
            stats[OOD_VARIANT].append(ood_row_stats(variants, part, params, label_space, chosen))
        if answers_of:
            answers.append(answer_table(answers_of, variants[answers_of], part, params,
                                        label_space, variants["gated"].nbrs,
                                        cal=tops[answers_of]))  # fmt: skip
    rows = []
    for name in names:
        joined = {k: np.concatenate([b[k] for b in stats[name]]) for k in stats[name][0]}
        rows.append(table_row(name, joined, params))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return table, (pd.concat(answers, ignore_index=True) if answers else None)


def table_block_rows(out: SplitOutputs, num_classes: int, neighbours: int) -> int:
    """Images per evaluation block: `block_rows` for dense (images x classes) scores; fewer
    when a factorised head's blocks are scored on their own classes only (`scored_columns`),
    whose number grows with the rows (each adds its scored children and neighbours' classes),
    so a block costs rows x columns: small blocks keep that well under rows x classes."""
    dense = block_rows(num_classes)
    if out.child_classes is None:
        return dense
    per_row = int(np.prod(out.child_classes.shape[1:])) + neighbours
    rows = max(COMPACT_MIN_ROWS, COMPACT_VALUES // per_row)
    if 2 * rows * per_row > num_classes:  # few classes: blocks would keep all K columns
        return dense
    return min(dense, rows)


def search_split(
    gallery: Gallery,
    queries: np.ndarray,
    k: int,
    kind: IndexKind,
    split: str,
    progress: bool = True,
    batch: int = SEARCH_BATCH,
) -> Neighbours:
    """The `k` gallery neighbours of every query of a split, exact, searched `batch` at a time.

    One call per few thousand queries, not per evaluation block of ~500: faiss's exact search
    runs one parallel region per 1,024 gallery rows and call, so small calls pay that start-up
    many times over. In batches this large, exact search is also faster than the run's IVF
    index at its default `ann_nprobe` (800,000 gallery vectors: 3.5 vs 5.6 ms a query), so the
    IVF serves `geoloc predict`'s few photos only (`benchmarks/bench_gallery.py`, docs/scale.md).
    """
    starts = range(0, max(len(queries), 1), batch)  # no queries: one empty search
    bar = track(starts, desc=f"neighbours ({split})", unit="batch", bars=progress)
    parts = [Neighbours.search(gallery, queries[s : s + batch], k, kind=kind, exact=True)
             for s in bar]  # fmt: skip
    return Neighbours.concat(parts)


def _calibrated_tops(
    variants: dict[str, VariantOutput], params: RerankParams
) -> dict[str, TopCells]:
    """Each variant's calibrated candidates, computed once per distribution and calibration."""
    memo: dict[tuple[int, Calibration], TopCells] = {}
    out = {}
    for name, v in variants.items():
        key = (id(v.scores), params.calibration.get(name, Calibration()))
        if key not in memo:
            memo[key] = params.calibrated_top(name, v)
        out[name] = memo[key]
    return out


def variants_for(
    out: SplitOutputs,
    gallery: Gallery,
    label_space: LabelSpace,
    params: RerankParams,
    nbrs: Neighbours | None = None,
) -> dict[str, VariantOutput]:
    """Every variant's answer for the images of `out`, with parameters chosen on val (`nbrs`:
    their gallery neighbours when already searched; the search is most of the cost)."""
    if nbrs is None:
        k = min(params.neighbours, len(gallery))
        nbrs = Neighbours.search(gallery, out.embeddings, k, kind=params.index)  # type: ignore[arg-type]
    cols = scored_columns(out, nbrs.labels, label_space.num_classes)
    probs = base_probs(out.head_arrays(), label_space, params.hier_topk_parents, cols)
    own = model_probs(out, label_space, params.hier_topk_parents, params.base_topk_parents, cols)
    return run_variants(probs, nbrs, label_space, params, own, cols)


def answer_table(
    name: str,
    v: VariantOutput,
    true: SplitOutputs,
    params: RerankParams,
    label_space: LabelSpace,
    nbrs: Neighbours | None = None,
    cal: TopCells | None = None,
) -> pd.DataFrame:
    """Per image: the variant's point and error, calibrated top-1 probability, error radius
    (NaN when none was fitted), conformal set size, and the OOD score and flag (NaN / False
    without an OOD model). With an OOD model the point, radius and set are those of the OOD step
    (`geoloc.infer.ood`): widened with the score (and moved, when `ood_decode` is on)."""
    top = params.calibrated_top(name, v) if cal is None else cal
    radius, sets = params.radius.get(name), params.conformal.get(name)
    n = len(v.pred)
    lat, lon, pred = v.lat, v.lon, v.pred
    r = (radius_km_top(radius, top, v.lat, v.lon, label_space, v.nbrs) if radius
         else np.full(n, np.nan))  # fmt: skip
    size = set_size_top(top, sets) if sets else np.full(n, -1)
    nbrs = nbrs if nbrs is not None else v.nbrs
    ans: OodAnswer | None = (None if nbrs is None
                             else ood_for(params, name, v, nbrs, label_space, cal=top))  # fmt: skip
    if ans is not None:
        lat, lon, pred, r = ans.lat, ans.lon, ans.pred, ans.radius_km
        if sets:
            member, extra = widened_members(top, sets, ans)
            size = member.sum(axis=1) + extra
    error = haversine_km(true.lat, true.lon, lat, lon)
    return pd.DataFrame({
        "image_id": true.image_ids, "true_lat": true.lat, "true_lon": true.lon,
        "pred_lat": lat, "pred_lon": lon, "pred_label": pred, "error_km": error,
        "prob": top.prob_of(v.pred), "radius_km": r, "within_radius": error <= r,
        "radius_coverage": radius.coverage if radius else np.nan,
        "set_size": size,
        "ood_score": ans.score if ans is not None else np.full(n, np.nan),
        "ood_flag": ans.flag if ans is not None else np.zeros(n, dtype=bool),
        "variant": name,
    })  # fmt: skip


def rerank_run(
    run_dir: Path,
    *,
    index_dir: Path | None = None,
    cfg: RerankConfig | None = None,
    use_cache: bool = True,
    progress: bool = True,
    grid: GateGrid = GateGrid(),
) -> RerankResult:
    """Rerank evaluation of a trained run; writes tables, params, gallery and the summary.

    `cfg` defaults to the run's own `rerank` section. Every parameter is chosen on val; test is
    only evaluated. The report is left to the caller (`geoloc.presentation.report.write_report`).
    """
    from geoloc.data.run_data import resolve_index_dir
    from geoloc.infer.trained import load_trained
    from geoloc.runfolder.summary import finite_or_none, update_summary

    paths = RunPaths(Path(run_dir))
    trained = load_trained(paths.root, "best")
    cfg = cfg or trained.config.rerank
    index_dir = Path(index_dir) if index_dir else resolve_index_dir(trained.config)
    check_same_classes(trained.checkpoint, trained.label_space, index_dir)
    label_space = trained.label_space
    key = f"{file_sha256(trained.checkpoint)}:{label_space.fingerprint}"
    if trained.config.model.head == "factorised":  # enough parents scored to choose k on val
        trained.model.topk_parents = max(trained.config.train.hier_topk_parents, *TOPK_PARENTS)
        key = f"{key}:parents{trained.model.topk_parents}"
    paths.data.mkdir(parents=True, exist_ok=True)
    # val: the model's pass covers the tuning sample only (all of val up to `tune_images`);
    # train (the gallery): all of it, or a sample of `gallery_images`
    rows = {"val": split_sample(index_dir, "val", cfg.tune_images),
            "train": split_sample(index_dir, "train", cfg.gallery_images or None)}  # fmt: skip
    outs = {
        s: split_outputs(trained, index_dir, s, paths, key, use_cache, progress, rows.get(s))
        for s in ("train", "val", "test")
    }
    gallery = outs["train"].to_gallery()
    gallery.save(paths.gallery)
    use_run_index(gallery, paths.gallery, AnnSettings.from_config(cfg), cfg.index)
    gallery.use_index(None)  # built and saved for `geoloc predict`; the tables search exactly
    land = (
        land_fraction_for(label_space, index_dir / "h3_features.parquet")
        if cfg.use_land_prior
        else None
    )
    answers: list[pd.DataFrame] = []
    params, tables = evaluate_rerank(
        outs,
        label_space,
        cfg,
        land_fraction=land,
        hier_topk_parents=trained.config.train.hier_topk_parents,
        grid=grid,
        progress=progress,
        gallery=gallery,
        answers=answers,
    )
    params.checkpoint_sha256 = key.split(":")[0]
    params.save(paths.rerank_params)
    _write_table(paths.rerank_eval, tables["test"])
    _write_table(paths.rerank_eval_val, tables["val"])
    with atomic_path(paths.rerank_test_predictions) as tmp:
        answers[0].to_parquet(tmp, index=False)
    served = OOD_VARIANT if params.ood is not None else params.best_variant  # what predict gives
    best_row = tables["test"].set_index("variant").loc[served]
    metrics = {k: finite_or_none(v) for k, v in best_row.to_dict().items()}
    update_summary(paths.root, rerank={"variant": params.best_variant, "metrics": metrics})
    base = tables["test"].set_index("variant").loc["base"]
    progress_log.info(
        "rerank: %s chosen on val; test median %s -> %s, P90 %s -> %s", params.best_variant,
        fmt_km(base["median_km"]), fmt_km(metrics.get("median_km")), fmt_km(base["p90_km"]),
        fmt_km(metrics.get("p90_km")),
    )  # fmt: skip
    return RerankResult(paths.root, tables["test"], tables["val"], params, params.best_variant)


def split_sample(index_dir: Path, split: str, n: int | None) -> np.ndarray | None:
    """The rows of a split rerank reads (`stratified_sample` of the index's labels: val's
    tuning sample, the gallery's train sample); None when the split has at most `n` images
    (all of it) or `n` is None."""
    from geoloc.data.dataset import read_split_table

    if n is None:
        return None
    labels = read_split_table(index_dir, split)["label"].to_numpy(dtype=np.int64)
    return stratified_sample(labels, n) if len(labels) > n else None


def _write_table(path: Path, table: pd.DataFrame) -> None:
    write_text(path, table.to_csv(index=False, float_format="%.6g"))
