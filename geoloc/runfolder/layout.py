"""The fixed layout of a run directory, and run ids.

`runs/<run_id>/` is a product: every module that reads or writes a run goes through `RunPaths`
so file names are defined once.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def new_run_id(name: str = "run", now: datetime | None = None) -> str:
    """Sortable and unique under concurrency: `20261125T133500Z-<name>-<6 hex>`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    slug = _UNSAFE.sub("-", name).strip("-")[:40] or "run"
    return f"{stamp}-{slug}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunPaths:
    """Paths inside `runs/<run_id>/`."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"

    @property
    def dashboard(self) -> Path:
        return self.root / "dashboard.html"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def plots(self) -> Path:
        return self.artifacts / "plots"

    @property
    def tables(self) -> Path:
        return self.artifacts / "tables"

    @property
    def data(self) -> Path:
        return self.artifacts / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics_csv(self) -> Path:
        return self.tables / "metrics.csv"

    @property
    def rerank_eval(self) -> Path:
        return self.tables / "rerank_eval.csv"

    @property
    def rerank_eval_val(self) -> Path:
        """The val evaluation table of rerank (the test one is `rerank_eval`)."""
        return self.tables / "rerank_eval_val.csv"

    @property
    def gallery(self) -> Path:
        """The train gallery that rerank searches and `geoloc predict` reuses."""
        return self.data / "gallery.npz"

    @property
    def rerank_params(self) -> Path:
        """Every parameter rerank chose on val (`RerankParams`)."""
        return self.data / "rerank_params.json"

    def outputs(self, split: str) -> Path:
        """The cached model outputs of `split` (logits, embeddings) that rerank reuses."""
        return self.data / f"outputs_{split}.npz"

    @property
    def val_predictions(self) -> Path:
        return self.data / "val_predictions.parquet"

    @property
    def test_predictions(self) -> Path:
        return self.data / "test_predictions.parquet"

    @property
    def rerank_test_predictions(self) -> Path:
        """Per test image, the rerank variant chosen on val: point, error, radius, set size."""
        return self.data / "rerank_test_predictions.parquet"

    def make(self) -> RunPaths:
        for d in (self.plots, self.tables, self.data, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        return self
