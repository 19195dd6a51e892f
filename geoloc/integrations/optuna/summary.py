"""What a sweep leaves under `runs/_sweeps/<study>/`: the trials table, the best trial(s) or
Pareto front, `summary.md` and plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.atomic import write_json, write_parquet, write_text
from geoloc.errors import redact
from geoloc.integrations.optuna.settings import SweepConfig
from geoloc.integrations.optuna.study import default_storage
from geoloc.paths import sweeps_dir
from geoloc.runfolder.layout import RunPaths

if TYPE_CHECKING:
    import optuna
    import pandas as pd


@dataclass
class SweepResult:
    """What a sweep process leaves: the study's trials table, best trial(s), summary files."""

    study_name: str
    storage: str
    trials: pd.DataFrame
    best: dict[str, Any]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value(s), params, run id/dir/dashboard, reason."""
    import pandas as pd

    multi = len(study.directions) > 1
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if multi:
            vals = t.values or [None, None]
            row["val_top1"], row["val_p90_km"] = vals[0], vals[1]
        else:
            row["value"] = t.value
        row.update({f"param_{k}": v for k, v in t.params.items()})
        run_dir = t.user_attrs.get("run_dir")
        dashboard = RunPaths(Path(run_dir)).dashboard if run_dir else None
        row["run_id"] = t.user_attrs.get("run_id")
        # a trial that crashed before its run started has no dashboard to link
        row["dashboard"] = str(dashboard) if dashboard and dashboard.is_file() else None
        row["reason"] = t.user_attrs.get("reason") or t.system_attrs.get("fail_reason")
        row["duration_s"] = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(row)
    return pd.DataFrame(rows)


def best_of(study: optuna.Study) -> dict[str, Any]:
    """The best trial, or the Pareto front of a multi-objective study, for `best.json`."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return {"trials_complete": 0}
    if len(study.directions) > 1:
        front = study.best_trials
        return {
            "trials_complete": len(complete),
            "pareto_front": [
                {
                    "number": t.number,
                    "val_top1": t.values[0],
                    "val_p90_km": t.values[1],
                    "params": t.params,
                    "run_id": t.user_attrs.get("run_id"),
                }
                for t in front
            ],
        }
    best = study.best_trial
    return {
        "trials_complete": len(complete),
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "run_id": best.user_attrs.get("run_id"),
    }


def write_sweep_summary(study: optuna.Study, cfg: SweepConfig) -> SweepResult:
    """`runs/_sweeps/<study>/`: trials.csv/.parquet, best.json, summary.md and plots."""
    out = sweeps_dir() / study.study_name
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    best = best_of(study)
    files = [out / "trials.csv", out / "trials.parquet", out / "best.json", out / "summary.md"]
    write_text(files[0], table.to_csv(index=False))
    write_parquet(files[1], table)
    write_json(files[2], best)
    from geoloc.presentation.sweep_plots import plot_sweep

    files += plot_sweep(study, out)
    write_text(files[3], sweep_markdown(study.study_name, cfg, table, best, files[4:]))
    return SweepResult(
        study_name=study.study_name,
        storage=redact(cfg.storage or default_storage()),
        trials=table,
        best=best,
        out_dir=out,
        files=files,
    )


def best_markdown(best: Mapping[str, Any]) -> str:
    """The best trial (or the Pareto front of a multi-objective study) as markdown."""
    if not best.get("trials_complete"):
        return "No trial has completed yet.\n"
    if "pareto_front" in best:
        lines = [
            f"Pareto front (maximise val top-1, minimise val P90 km) of "
            f"{best['trials_complete']} complete trials:",
            "",
            "| trial | val_top1 | val_p90_km | run | params |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {t['number']} | {t['val_top1']:.4f} | {t['val_p90_km']:.1f} | {t['run_id']} | "
            f"`{json.dumps(t['params'], default=str)}` |"
            for t in best["pareto_front"]
        ]
        return "\n".join(lines) + "\n"
    lines = [
        f"Best of {best['trials_complete']} complete trials: trial {best['number']}, "
        f"best val P90 **{best['value']:.1f} km**, run `{best['run_id']}`.",
        "",
        "| param | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in best["params"].items()]
    return "\n".join(lines) + "\n"


def sweep_markdown(
    name: str, cfg: SweepConfig, table: pd.DataFrame, best: dict[str, Any], plots: Sequence[Path]
) -> str:
    """summary.md: objective, storage, trial counts, best trial(s), the trials table, plots."""
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    lines = [
        f"# Sweep `{name}`",
        "",
        f"Objective: **{cfg.objective}** · storage `{redact(cfg.storage or default_storage())}`",
        "",
        "Trials: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())),
        "",
        "## Best",
        "",
        best_markdown(best),
        "## Trials",
        "",
        table.to_markdown(index=False) if len(table) else "(none)",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
