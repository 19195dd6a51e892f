"""`summary.json`: the compact, versioned, comparable record of a run.

Every write validates against the JSON Schema shipped in `geoloc/schemas/` and is atomic.
Readers get a `SummaryError` with a reason (corrupt, unknown schema version) instead of a crash.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import jsonschema

import geoloc
from geoloc.atomic import write_json
from geoloc.errors import GeolocError
from geoloc.runfolder.layout import RunPaths

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_SCHEMA_DIR = Path(__file__).parents[1] / "schemas"


class SummaryError(GeolocError):
    """A summary.json that cannot be used; the message says why."""


@cache
def load_schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON Schema of a summary version, as shipped in `geoloc/schemas/`."""
    return json.loads((_SCHEMA_DIR / f"summary.v{version}.json").read_text())


@cache
def _validator(version: int) -> jsonschema.protocols.Validator:
    """One compiled validator per version: `jsonschema.validate` re-checks the schema each call."""
    schema = load_schema(version)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# --------------------------------------------------------------------------------------------
# Fast acceptance check. jsonschema costs ~0.5 ms per summary, which dominates a leaderboard of
# thousands of runs. The schema is ours and uses a handful of keywords, so it is compiled once
# into plain Python predicates that only *accept*: anything they reject (and any schema with a
# keyword they do not know) goes through jsonschema, which has the final word and the message.
# tests/test_summary.py checks both agree on many mutated summaries.
# --------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]
_ANNOTATIONS = {"$schema", "$id", "$defs", "$comment", "title", "description", "default"}


class _Unsupported(Exception):  # noqa: N818 - internal signal, never leaves this module
    """The schema uses a keyword the fast check does not implement."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_check(kinds: list[str]) -> Check:
    """One predicate for a `type` keyword (the hot path: every metric value goes through it)."""
    if unknown := set(kinds) - {
        "object",
        "array",
        "string",
        "boolean",
        "null",
        "number",
        "integer",
    }:
        raise _Unsupported(f"type {sorted(unknown)}")
    exact = tuple(t for k, t in (("object", dict), ("array", list), ("string", str)) if k in kinds)
    allow_none, allow_bool = "null" in kinds, "boolean" in kinds
    number, integer = "number" in kinds, "integer" in kinds

    def check(v: Any) -> bool:
        if v is None:
            return allow_none
        if v is True or v is False:
            return allow_bool
        if isinstance(v, exact):
            return True
        if isinstance(v, int):
            return number or integer
        if isinstance(v, float):
            # JSON Schema counts 1.0 as an integer
            return number or (integer and v.is_integer())
        return False

    return check


def _same(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers."""
    return isinstance(a, bool) == isinstance(b, bool) and type(a) is not dict and a == b


def _object_check(props: dict[str, Check], extra: Check | None) -> Check:
    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return True
        for k, x in v.items():
            c = props.get(k, extra)
            if c is not None and not c(x):
                return False
        return True

    return check


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda v: True
    if len(checks) == 1:
        return checks[0]

    def check(v: Any) -> bool:
        for c in checks:  # noqa: SIM110 - a plain loop: no generator on the hot path
            if not c(v):
                return False
        return True

    return check


def _compile(node: Any, root: dict[str, Any]) -> Check:
    if node is True or node == {}:
        return lambda v: True
    if node is False:
        return lambda v: False
    unknown = set(node) - _ANNOTATIONS - {
        "$ref", "type", "const", "enum", "required", "properties", "additionalProperties",
        "oneOf", "minLength", "minimum",
    }  # fmt: skip
    if unknown:
        raise _Unsupported(", ".join(sorted(unknown)))
    checks: list[Check] = []
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise _Unsupported(ref)
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        checks.append(_compile(target, root))
    if "type" in node:
        checks.append(
            _type_check([node["type"]] if isinstance(node["type"], str) else node["type"])
        )
    if "const" in node:
        const = node["const"]
        checks.append(lambda v: _same(v, const))
    if "enum" in node:
        options = node["enum"]
        checks.append(lambda v: any(_same(v, o) for o in options))
    if "required" in node:
        required = node["required"]
        checks.append(lambda v: not isinstance(v, dict) or all(k in v for k in required))
    props = {k: _compile(sub, root) for k, sub in node.get("properties", {}).items()}
    extra = _compile(node["additionalProperties"], root) if "additionalProperties" in node else None
    if props or extra is not None:
        checks.append(_object_check(props, extra))
    if "oneOf" in node:
        branches = [_compile(sub, root) for sub in node["oneOf"]]
        checks.append(lambda v: sum(1 for b in branches if b(v)) == 1)
    if "minLength" in node:
        n = node["minLength"]
        checks.append(lambda v: not isinstance(v, str) or len(v) >= n)
    if "minimum" in node:
        low = node["minimum"]
        checks.append(lambda v: not _is_number(v) or v >= low)
    return _all(checks)


@cache
def _fast_check(version: int) -> Check | None:
    """The compiled acceptance check, or None when the schema needs full jsonschema."""
    schema = load_schema(version)
    try:
        return _compile(schema, schema)
    except (_Unsupported, KeyError, TypeError):
        return None


def validate_summary(summary: dict[str, Any]) -> None:
    """Raise `SummaryError` naming the first violation of the schema."""
    version = summary.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise SummaryError(f"unknown schema_version {version!r} (supported: {SUPPORTED_VERSIONS})")
    fast = _fast_check(version)
    if fast is not None and fast(summary):
        return
    error = jsonschema.exceptions.best_match(_validator(version).iter_errors(summary))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise SummaryError(f"summary does not match schema v{version} at {where}: {error.message}")


def parse_summary(text: str | bytes) -> dict[str, Any]:
    """Parse and validate summary.json text; the `SummaryError` says why it is unusable."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SummaryError(f"corrupt JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SummaryError(f"not a JSON object but {type(data).__name__}")
    validate_summary(data)
    return data



def finite_or_none(value: Any) -> float | int | None:
    """A number JSON and MLflow accept: a finite int or float (or numeric text), else None.

    JSON has no NaN or infinity: summary.json stores null, MLflow skips the point.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def now_iso() -> str:
    """UTC now, to the second: summaries compare and sort as plain strings."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@cache
def git_commit() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@cache
def git_dirty() -> bool | None:
    """Whether the checkout that ran has uncommitted changes (a commit alone does not name the
    code then); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=normal"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


LIBRARIES = {"torch": "torch", "numpy": "numpy", "pillow": "pillow"}
"""Libraries whose version changes a run's numbers: summary key -> distribution name."""


def library_versions() -> dict[str, str | None]:
    """Python's and `LIBRARIES`' versions, read from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in LIBRARIES.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def code_version() -> dict[str, Any]:
    """Which code produced the run: package version, git commit, uncommitted changes and the
    versions of the libraries that compute its numbers."""
    return {
        "version": geoloc.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "libraries": library_versions(),
    }


def rerun_differences(
    recorded: Mapping[str, Any], current: Mapping[str, Any], sep: str = " -> "
) -> list[str]:
    """What differs between two summaries' library versions, thread counts, ranks and CPUs, e.g.
    `['torch 2.14.1 -> 2.15.0', 'threads 2 -> 1']`; a key one of them lacks is not compared."""
    diffs = []
    libs_a = (recorded.get("code") or {}).get("libraries") or {}
    libs_b = (current.get("code") or {}).get("libraries") or {}
    for key in sorted(set(libs_a) & set(libs_b)):
        if libs_a[key] != libs_b[key]:
            diffs.append(f"{key} {libs_a[key]}{sep}{libs_b[key]}")
    det_a = recorded.get("determinism") or {}
    det_b = current.get("determinism") or {}
    for key, label in (("threads", "threads"), ("world_size", "ranks"), ("cpu", "CPU"),
                       ("cpu_capability", "CPU kernels")):  # fmt: skip
        if key in det_a and key in det_b and det_a[key] != det_b[key]:
            diffs.append(f"{label} {det_a[key]}{sep}{det_b[key]}")
    return diffs


def artifact_flags(run_dir: Path) -> dict[str, bool]:
    """Which of a run's artifacts exist on disk (the aggregation penalises missing ones)."""
    rp = RunPaths(Path(run_dir))
    plots = rp.plots
    return {
        "config": rp.config.is_file(),
        "checkpoint_best": rp.best_checkpoint.is_file(),
        "checkpoint_last": rp.last_checkpoint.is_file(),
        "metrics_csv": rp.metrics_csv.is_file(),
        "val_predictions": rp.val_predictions.is_file(),
        "test_predictions": rp.test_predictions.is_file(),
        "plots": plots.is_dir() and any(plots.glob("*.png")),
        "report": rp.report.is_file(),
        "dashboard": rp.dashboard.is_file(),
        "rerank_eval": rp.rerank_eval.is_file(),
    }


def new_summary(run_id: str, run_name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fresh `running` summary."""
    ts = now_iso()
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "run_name": run_name,
        "status": "running",
        "failure_reason": None,
        "created_at": ts,
        "updated_at": ts,
        "epochs_completed": 0,
        "best_epoch": None,
        "best_val_acc": None,
        "best_p90_km": None,
        "last_geo_median_km": None,
        "last": {},
        "best": {},
        "test": None,
        "rerank": None,
        "config": config or {},
        "dataset": {},
        "code": code_version(),
        "artifacts": {},
        "tracking": {"mirrored": False, "mlflow_run_id": None, "error": None},
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Refresh artifact flags and `updated_at`, validate, write atomically; return it."""
    summary = dict(summary)
    summary["updated_at"] = now_iso()
    summary["artifacts"] = artifact_flags(Path(run_dir))
    validate_summary(summary)
    write_json(RunPaths(Path(run_dir)).summary, summary)
    return summary


def read_summary(path: Path) -> dict[str, Any]:
    """Load and validate a summary.json (a file or a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = RunPaths(path).summary
    if not path.is_file():
        raise SummaryError(f"{path}: no summary.json")
    try:
        return parse_summary(path.read_bytes())
    except OSError as exc:
        raise SummaryError(f"{path}: unreadable ({exc})") from exc
    except SummaryError as exc:
        raise SummaryError(f"{path}: {exc}") from exc


def update_summary(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Read, change top-level keys, write back."""
    summary = read_summary(Path(run_dir))
    summary.update(changes)
    return write_summary(Path(run_dir), summary)


SPACE_RESERVE = ".space-reserve"
RESERVE_BYTES = 256 << 10
"""Held in a run folder while a stage writes into it, freed to record the stage's failure when
the disk fills up (summary.json needs a few KiB, a full disk has none)."""


@contextmanager
def reserved_space(run_dir: Path) -> Iterator[None]:
    """Hold `RESERVE_BYTES` in `run_dir` while the body runs (see `record_failure`)."""
    reserve = Path(run_dir) / SPACE_RESERVE
    try:  # written, not truncated: a sparse file would reserve nothing
        reserve.write_bytes(b"\0" * RESERVE_BYTES)
    except OSError as exc:
        reserve.unlink(missing_ok=True)
        log.warning("could not reserve %d bytes in %s: %s", RESERVE_BYTES, run_dir, exc)
    try:
        yield
    finally:
        reserve.unlink(missing_ok=True)


def failure_text(exc: BaseException) -> str:
    """`Type: message` of an exception, as `failure_reason` records it."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def record_failure(run_dir: Path, reason: str, *, stage: str | None = None) -> None:
    """summary.json `status: failed` with `reason` (prefixed `<stage>: `), after freeing the
    run's space reserve so that a full disk still records it; never raises (the failure
    itself matters more than a failure to record it, which is one warning line)."""
    (Path(run_dir) / SPACE_RESERVE).unlink(missing_ok=True)
    reason = f"{stage}: {reason}" if stage else reason
    try:
        update_summary(Path(run_dir), status="failed", failure_reason=reason[:2000])
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record the failure in %s: %s", RunPaths(run_dir).summary, exc)


def clear_stage_failure(run_dir: Path, stage: str) -> None:
    """A stage after training that failed (`failure_reason` starts `<stage>: `) and has now
    run to its end: the run is `completed` again."""
    summary = read_summary(Path(run_dir))
    if summary.get("status") == "failed" and str(summary.get("failure_reason")).startswith(
        f"{stage}: "
    ):
        update_summary(Path(run_dir), status="completed", failure_reason=None)


TRAINING_LOCK = ".training.lock"
"""Held (flock) by the process training a run for as long as it trains."""
ABANDONED_REASON = (
    "the training process ended without recording its end (killed, or its machine stopped); "
    "`geoloc train --resume RUN` continues from its last checkpoint when it has one"
)


def hold_training_lock(run_dir: Path) -> IO[bytes]:
    """Take `run_dir`'s training lock for this process (closing the file releases it); a run
    another live process trains is a `GeolocError`."""
    import fcntl

    fh = open(Path(run_dir) / TRAINING_LOCK, "a+b")  # noqa: SIM115 - the caller closes it
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise GeolocError(f"run '{run_dir}' is being trained by another process") from None
    return fh


def settle_abandoned(run_dir: Path) -> bool:
    """Mark a `running` run whose trainer is gone (nobody holds its training lock) `failed`,
    with the reason; True when it did. Every command that lists runs calls it, so a run killed
    before its first checkpoint does not stay `running` forever."""
    import fcntl

    lock = Path(run_dir) / TRAINING_LOCK
    if not lock.is_file():  # trained before the lock existed, or not by `train_run`
        return False
    try:
        if read_summary(run_dir).get("status") != "running":
            return False
        with open(lock, "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # still training
            if read_summary(run_dir).get("status") != "running":  # ended meanwhile
                return False
            update_summary(run_dir, status="failed", failure_reason=ABANDONED_REASON)
    except (SummaryError, OSError) as exc:
        log.warning("could not check whether run %s was abandoned: %s", run_dir, exc)
        return False
    log.warning("run %s: %s; marked failed", Path(run_dir).name, ABANDONED_REASON)
    return True
