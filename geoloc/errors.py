"""Errors that the CLI turns into a one-line reason and a non-zero exit."""

from __future__ import annotations


class GeolocError(Exception):
    """A user-facing failure: the message names the input and the reason."""


class ConfigError(GeolocError):
    """A config file or override is invalid (unknown key, bad value)."""


class DataError(GeolocError):
    """Input data as a whole is unusable (missing folder, manifest without coordinates...)."""


class IndexMissingError(DataError):
    """The canonical index is missing or empty."""


class TrialPruned(GeolocError):  # noqa: N818 - mirrors optuna's name on purpose
    """Raised by an epoch callback to stop a run early; the run ends with status `pruned`."""


class TrainingError(GeolocError):
    """Training cannot go on (NaN loss, incompatible checkpoint...); the message says why."""
