"""`geoloc rerank RUN_DIR`, `geoloc predict --run RUN_DIR PATH...` and
`geoloc evaluate --run RUN_DIR FOLDER...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from geoloc.cli._common import SetOption

TABLE_COLUMNS = ("variant", "median_km", "p90_km", "p95_km", "acc_25km", "acc_750km",
                 "geoscore", "top1", "gate_share", "ece", "ece_calibrated", "coverage",
                 "set_size", "radius_coverage", "radius_median_km")  # fmt: skip


def register(app: typer.Typer) -> None:
    @app.command("rerank")
    def _cmd(
        run_dir: Annotated[Path, typer.Argument(help="The run directory (runs/<run_id>).")],
        overrides: SetOption = None,
        index_dir: Annotated[
            Path | None, typer.Option(help="Index folder (default: the run's, or data/index).")
        ] = None,
        cache: Annotated[
            bool, typer.Option(help="Reuse cached model outputs under artifacts/data/.")
        ] = True,
    ) -> None:
        """Rerank evaluation of a run: prior, gated neighbour rerank, in-cell refinement and
        calibration, tuned on val and reported on test (artifacts/tables/rerank_eval.csv)."""
        from geoloc.compose.training import rerank_and_publish

        cfg = _rerank_config(run_dir, overrides or [])
        result = rerank_and_publish(run_dir, index_dir=index_dir, cfg=cfg, use_cache=cache)
        table = result.test_table[list(TABLE_COLUMNS)]
        typer.echo("test (every parameter chosen on val):")
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        p = result.params
        typer.echo(f"gate: {p.gate}\nrefine: {p.refine}\nprior before gate: {p.gated_on_prior}")
        typer.echo(f"best variant on val: {result.best_variant} -> summary.json")
        typer.echo(f"tables: {result.run_dir / 'artifacts' / 'tables'}")

    @app.command("predict")
    def _predict(
        paths: Annotated[list[Path], typer.Argument(help="Images or folders (recursive).")],
        run: Annotated[Path, typer.Option("--run", help="The trained run directory.")],
        top_k: Annotated[int, typer.Option("--top-k", help="Cells listed per image.")] = 5,
        rerank: Annotated[
            bool, typer.Option("--rerank/--no-rerank", help="Use the run's rerank variant.")
        ] = True,
        out: Annotated[
            Path | None, typer.Option("--out", help="Write .csv, .parquet or .json instead.")
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: auto)")] = None,
    ) -> None:
        """Predict where each image was taken: cell, coordinate, calibrated probability, top-k
        cells and the conformal set of cells."""
        from geoloc.infer.predict import Predictor, write_predictions

        predictor = Predictor(run, rerank=rerank, top_k=top_k, batch_size=batch_size,
                              device=device)  # fmt: skip
        table = predictor.predict(paths)
        if out is not None:
            write_predictions(table, out)
            n_err = int(table["error"].notna().sum())
            typer.echo(f"{len(table)} rows ({n_err} errors) -> {out}")
        else:
            _show(table)

    @app.command("evaluate")
    def _evaluate(
        paths: Annotated[list[Path], typer.Argument(help="GPS-tagged images or folders.")],
        run: Annotated[Path, typer.Option("--run", help="A run after `geoloc rerank`.")],
        name: Annotated[
            str, typer.Option(help="Names the outputs: rerank_eval_<name>.csv in the run.")
        ] = "shift",
        batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
        device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: auto)")] = None,
    ) -> None:
        """Every rerank variant of a run on photos it has never seen, truth from their EXIF GPS
        (e.g. the shift split of `geoloc data demo --placement uniform-land`); nothing is tuned."""
        from geoloc.infer.folder_eval import evaluate_folder

        result = evaluate_folder(run, paths, name=name, batch_size=batch_size, device=device)
        n = len(result.answers)
        typer.echo(f"{n} photos evaluated, {len(result.skipped)} skipped (no GPS or unreadable)")
        table = result.table[list(TABLE_COLUMNS)]
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        typer.echo(f"variant chosen on val: {result.best_variant}")
        typer.echo(f"table: {result.table_path}\nper image: {result.answers_path}")


def _rerank_config(run_dir: Path, overrides: list[str]) -> Any:
    """The run's `rerank` section with `--set key=value` overrides (RerankConfig keys), or None
    (use the run's section as saved)."""
    if not overrides:
        return None
    import json

    from geoloc.config import RerankConfig, load_config
    from geoloc.runfolder.layout import RunPaths

    config_json = RunPaths(Path(run_dir)).config
    base = json.loads(config_json.read_text()).get("rerank", {}) if config_json.is_file() else {}
    keys = [o.removeprefix("rerank.") for o in overrides]
    cfg = load_config(None, keys, model=RerankConfig)
    given = cfg.model_dump(exclude_unset=True)
    return RerankConfig.model_validate({**base, **given})


def ood_words(score: Any, flag: Any) -> str:
    """The OOD column in words: a flagged photo is unlike the training photos, so its answer
    is a hedge and its radius wide."""
    if score is None or score != score:
        return "-"
    if flag:
        return f"[yellow]unlike training photos: a guess (score {score:.3f})[/yellow]"
    return f"like training photos ({score:.3f})"


def _show(table: Any) -> None:
    """A rich table on the terminal: one line per image, with the error radius and the top-k
    as places (lat, lon, probability), as in `--out`'s columns."""
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False)
    for col in ("path", "lat", "lon", "prob", "radius", "top-k (lat, lon) prob", "set", "seen?",
                "error"):  # fmt: skip
        t.add_column(col, overflow="fold")
    for row in table.itertuples(index=False):
        if row.error is not None and isinstance(row.error, str):
            t.add_row(row.path, "", "", "", "", "", "", "", f"[red]{row.error}[/red]")
            continue
        topk = "\n".join(
            f"({la:.2f}, {lo:.2f}) {p:.2f}"
            for la, lo, p in zip(row.topk_lats, row.topk_lons, row.topk_probs, strict=True)
        )
        radius = "-" if row.radius_km is None or row.radius_km != row.radius_km else (
            f"{row.radius_km:,.0f} km @ {row.radius_coverage:.0%}"
        )
        t.add_row(
            row.path, f"{row.lat:.4f}", f"{row.lon:.4f}", f"{row.prob:.3f}", radius, topk,
            f"{len(row.conformal_set)} cells", ood_words(row.ood_score, row.ood_flag), "",
        )  # fmt: skip
    Console().print(t)
