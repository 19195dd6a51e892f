"""The tested environment is the installed one: constraints.txt pins every package `make venv`
installs, so a fresh clone runs the suite on the very versions it last passed with."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_normalise(name)] = version
    return pins


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values()
                                       for d in ds]
    return [_normalise(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in specs]


def test_every_declared_dependency_is_pinned() -> None:
    missing = sorted(set(_declared()) - set(_pins()))
    assert not missing, f"pyproject.toml names packages constraints.txt does not pin: {missing}"


@pytest.mark.skipif(os.environ.get("GEOLOC_UNPINNED") == "1",
                    reason="make test-latest runs on the newest allowed versions on purpose")
def test_installed_versions_are_the_pinned_ones() -> None:
    drifted = {}
    for name, pinned in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a pin of another platform's or an optional package
        if installed.split("+", 1)[0] != pinned:
            drifted[name] = f"{installed} (pinned {pinned})"
    assert not drifted, f"installed versions differ from constraints.txt (run make venv): {drifted}"


def test_the_editable_install_of_make_venv_prints_no_setuptools_warning(tmp_path: Path) -> None:
    """`make venv` runs `pip install -e .`: its output is clean (setuptools warned "Editable
    installation" on every install when the package root was left implicit).

    The check calls setuptools' editable build hook (PEP 660, what pip calls) on a copy of the
    project: nothing is installed anywhere. (`pip install --prefix` of the same project name
    uninstalled geoloc from the running venv, and later tests that run `python -m geoloc`
    outside the repository failed.)"""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "geoloc", copy / "geoloc", ignore=shutil.ignore_patterns("__pycache__"))
    hook = f"from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", hook], cwd=copy, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert list(tmp_path.glob("geoloc-*.whl")), output
    assert "Editable installation" not in output and "Warning" not in output, output
