"""`geoloc report RUN_DIR` and `geoloc aggregate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoloc.errors import GeolocError
from geoloc.paths import runs_dir

WeightsOption = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="Score weights, e.g. acc=0.4,p90=0.4,median=0.2 (names not given keep defaults).",
    ),
]
PenaltiesOption = Annotated[
    str | None,
    typer.Option(
        "--penalties",
        "-p",
        help="Penalties, e.g. checkpoint_best=0.2,report=0,status.failed=0.5 "
        "(artifact flags from summary.json, or status.<status>).",
    ),
]
RunsDirOption = Annotated[
    Path | None,
    typer.Option("--runs-dir", help="Folder of runs (default: $GEOLOC_RUNS_DIR or ./runs)."),
]


def resolve_run_dir(run: str) -> Path:
    """A run folder path, or a run id under the runs folder."""
    path = Path(run)
    if path.is_dir():
        return path
    candidate = runs_dir() / run
    if candidate.is_dir():
        return candidate
    raise GeolocError(f"run '{run}' is neither a folder nor a run id under {runs_dir()}")


def _num(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, float) and value == value else "—"


def _print_table(rows: list[dict[str, object]], limit: int) -> None:
    typer.echo(f"{'rank':>4} {'score':>7} {'val top-1':>9} {'P90 km':>9} {'median km':>9}  run")
    for row in rows[:limit]:
        typer.echo(
            f"{row['rank']:>4} {_num(row['score'], '7.3f'):>7} "
            f"{_num(row['best_val_acc'], '9.4f'):>9} {_num(row['best_p90_km'], '9.1f'):>9} "
            f"{_num(row['last_geo_median_km'], '9.1f'):>9}  {row['run_id']}"
        )
    if len(rows) > limit:
        typer.echo(f"... {len(rows) - limit} more in the CSV")


def register(app: typer.Typer) -> None:
    """Add `report` and `aggregate` to the top-level app."""

    @app.command("report")
    def _cmd(
        run: Annotated[str, typer.Argument(help="Run folder, or a run id under the runs folder.")],
    ) -> None:
        """Write plots, REPORT.md and dashboard.html for a run."""
        from geoloc.presentation.report import write_report
        from geoloc.runfolder.layout import RunPaths

        run_dir = resolve_run_dir(run)
        write_report(run_dir)
        rp = RunPaths(run_dir)
        typer.echo(f"report: {rp.report}")
        typer.echo(f"dashboard: {rp.dashboard}")
        typer.echo(f"plots: {rp.plots}")

    @app.command("aggregate")
    def _aggregate(
        runs: RunsDirOption = None,
        weights: WeightsOption = None,
        penalties: PenaltiesOption = None,
        top: Annotated[int, typer.Option(help="Ranked runs to print.")] = 10,
    ) -> None:
        """Rank all runs into runs/_aggregate/ (CSV, Parquet, sortable dashboard)."""
        from geoloc.presentation.leaderboard import aggregate_runs
        from geoloc.presentation.leaderboard_score import Penalties, ScoreWeights

        result = aggregate_runs(runs, ScoreWeights.parse(weights), Penalties.parse(penalties))
        typer.echo(f"ranked {len(result.ranked)} runs, skipped {len(result.skipped)}")
        if len(result.ranked):
            _print_table(result.ranked.to_dict("records"), top)
        for skipped in result.skipped:
            typer.echo(f"skipped {skipped.run_id}: {skipped.reason}")
        for path in result.paths:
            typer.echo(f"wrote {path}")
