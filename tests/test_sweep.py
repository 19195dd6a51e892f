"""Sweeps: bad input fails before any trial; studies resume and are shared; trials are runs."""

from __future__ import annotations

import pytest

from geoloc.cli import main
from geoloc.sweep import ParamSpec, SweepConfig, SweepError, create_study, redact, validate_sweep


def _cfg(**kw) -> SweepConfig:
    return SweepConfig.model_validate(kw)


def test_empty_space_is_refused_before_any_trial() -> None:
    with pytest.raises(SweepError, match="search space is empty"):
        validate_sweep(_cfg(space=[]))


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ([{"key": "no_such_key", "type": "float", "low": 0, "high": 1}], "unknown config key"),
        ([{"key": "lr", "type": "float", "low": -1.0, "high": 0.1}], "lr=-1.0 is not a valid"),
        (
            [
                {"key": "lr", "type": "float", "low": 1e-4, "high": 1e-2},
                {"key": "train.lr", "type": "float", "low": 1e-4, "high": 1e-2},
            ],
            "set the same key",
        ),
        ([{"key": "loss", "type": "categorical", "choices": ["ce", "hinge"]}], "hinge"),
    ],
)
def test_inconsistent_space_names_the_parameter(space, needle) -> None:
    with pytest.raises(SweepError, match=needle):
        validate_sweep(_cfg(space=space))


def test_spec_bounds_are_checked_when_the_space_is_read() -> None:
    with pytest.raises(ValueError, match="low .* must be < high"):
        ParamSpec(key="lr", type="float", low=1.0, high=0.1)
    with pytest.raises(ValueError, match="log scale needs low > 0"):
        ParamSpec(key="lr", type="float", low=0.0, high=0.1, log=True)


def test_searching_a_key_fixed_by_set_is_refused() -> None:
    with pytest.raises(SweepError, match="both searched and fixed"):
        validate_sweep(_cfg(base_overrides={"lr": 0.01}))


def test_unreachable_storage_is_one_clear_error_without_the_password() -> None:
    cfg = _cfg(storage="postgresql+psycopg://user:s3cret@127.0.0.1:9/optuna")
    with pytest.raises(SweepError, match="unreachable") as err:
        create_study(cfg)
    assert "s3cret" not in str(err.value)
    assert redact("postgresql://u:pw@h:1/db") == "postgresql://u:***@h:1/db"


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("- {key: epochz, type: int, low: 1, high: 3}\n")
    code = main(["sweep", "--n-trials", "1", "--space", str(space)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "epochz" in err[0]


def test_studies_resume_from_the_same_storage(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = create_study(_cfg(study="resume-me", storage=storage))
    first.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = create_study(_cfg(study="resume-me", storage=storage))
    assert len(again.trials) == 2
