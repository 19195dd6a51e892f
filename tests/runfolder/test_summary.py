"""summary.json: a stable, validated, versioned record that old runs keep forever."""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest

from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import (
    SCHEMA_VERSION,
    SummaryError,
    load_schema,
    new_summary,
    read_summary,
    update_summary,
    validate_summary,
    write_summary,
)

V1_FIXTURE = Path(__file__).parents[1] / "fixtures" / "summary_v1.json"


def test_v1_fixture_stays_readable(tmp_path: Path) -> None:
    """A summary written by v1 code must read back with the same values in every later version."""
    run = tmp_path / "20261125T133500000000Z-geosoft-a1b2c3"
    run.mkdir()
    shutil.copy(V1_FIXTURE, run / "summary.json")
    summary = read_summary(run)
    assert summary["schema_version"] == 1
    assert summary["status"] == "completed"
    assert summary["best_val_acc"] == pytest.approx(0.36606)
    assert summary["best_p90_km"] == pytest.approx(4985.821318)
    assert summary["test"]["test_median_km"] == pytest.approx(41.5)
    assert summary["rerank"]["variant"] == "gated+refined"
    assert summary["artifacts"]["checkpoint_best"] is True


def test_schema_ships_inside_the_package() -> None:
    """An installed wheel validates without the source tree."""
    shipped = resources.files("geoloc") / "schemas" / f"summary.v{SCHEMA_VERSION}.json"
    assert json.loads(shipped.read_text())["properties"]["schema_version"]["const"] == 1


def test_new_summary_is_valid_and_running() -> None:
    summary = new_summary("rid", "name", {"model.arch": "resnet18"})
    validate_summary(summary)
    assert summary["status"] == "running"


def test_write_refuses_an_invalid_summary_and_keeps_the_good_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_summary(run, new_summary("run", "n"))
    before = (run / "summary.json").read_text()
    bad = new_summary("run", "n")
    bad["status"] = "exploded"
    with pytest.raises(SummaryError, match="status"):
        write_summary(run, bad)
    assert (run / "summary.json").read_text() == before
    assert [p.name for p in run.iterdir()] == ["summary.json"]  # no temp file left behind


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "corrupt JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"schema_version": 2, "run_id": "x"}', "unknown schema_version 2"),
        ('{"schema_version": 1, "run_id": "x"}', "does not match schema v1"),
    ],
)
def test_unusable_summary_names_the_file_and_the_reason(
    tmp_path: Path, content: str, reason: str
) -> None:
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(SummaryError, match=re.escape(reason)) as err:
        read_summary(tmp_path)
    assert str(tmp_path / "summary.json") in str(err.value)


def test_update_refreshes_artifact_flags_from_disk(tmp_path: Path) -> None:
    rp = RunPaths(tmp_path / "run").make()
    write_summary(rp.root, new_summary("run", "n"))
    assert read_summary(rp.root)["artifacts"]["metrics_csv"] is False
    rp.metrics_csv.write_text("epoch\n0\n")
    updated = update_summary(rp.root, status="completed", epochs_completed=1)
    assert updated["artifacts"]["metrics_csv"] is True
    assert read_summary(rp.root)["status"] == "completed"


def test_docs_document_every_summary_field(repo_root: Path) -> None:
    """Users learn the fields from docs/reporting.md; a new field must be documented there too."""
    doc = (repo_root / "docs" / "reporting.md").read_text()
    section = doc.split("## `summary.json` (schema v1)")[1].split("\n## ")[0]
    missing = [k for k in load_schema(1)["properties"] if f"`{k}`" not in section]
    assert not missing, f"docs/reporting.md summary.json section does not document: {missing}"


_ODD_VALUES = [
    None, "", "x", 1, 2.5, 3.0, True, [], {}, {"a": 1}, {"a": "s"}, {"variant": "v"},
    {"variant": 1}, {"variant": "v", "metrics": {"m": "x"}}, {"variant": "v", "metrics": {"m": 1}},
]  # fmt: skip


def _mutations(base: dict) -> list[dict]:
    """Each key replaced by odd values or removed; in nested objects, a few keys likewise."""
    out = []
    for key in [*base, "unknown_key"]:
        out += [{**base, key: value} for value in _ODD_VALUES]
        out.append({k: v for k, v in base.items() if k != key})
        if isinstance(base.get(key), dict):
            for sub in [*list(base[key])[:3], "unknown_sub"]:
                out += [{**base, key: {**base[key], sub: value}} for value in _ODD_VALUES]
    return out


def test_fast_validation_agrees_with_jsonschema() -> None:
    """Reading thousands of summaries uses a compiled check; it must accept exactly what the
    JSON Schema accepts, or a leaderboard would rank a summary that `read_summary` refuses."""
    from geoloc.runfolder.summary import _fast_check, _validator

    fast, reference = _fast_check(1), _validator(1)
    assert fast is not None
    base = json.loads(V1_FIXTURE.read_text())
    cases = _mutations(base)
    valid = sum(reference.is_valid(c) for c in cases)
    assert 50 < valid < len(cases) - 50  # both sides are exercised
    disagree = [c for c in cases if fast(c) != reference.is_valid(c)]
    assert not disagree, f"{len(disagree)} disagreements, first: {disagree[0]}"


def test_best_epoch_is_one_based_like_metrics_csv() -> None:
    """`best_epoch` names a row of metrics.csv (epochs count from 1); 0 is not an epoch."""
    schema = load_schema()["properties"]["best_epoch"]
    assert "1-based" in schema["description"] and "0-based" not in schema["description"]
    summary = new_summary("rid", "name")
    summary.update(epochs_completed=1, best_epoch=1)
    validate_summary(summary)
    summary["best_epoch"] = 0
    with pytest.raises(SummaryError, match="best_epoch"):
        validate_summary(summary)
