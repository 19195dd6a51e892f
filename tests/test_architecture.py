"""The house as documented is the house as built: the module map in docs/ARCHITECTURE.md names
every module of geoloc/ and nothing that is gone, and training and inference load no plotting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROW_PATH = re.compile(r"`geoloc/([a-z_/]*?)(/|\.py)`")
MODULE_NAME = re.compile(r"`([a-z_0-9]+\.py)`")


def documented_modules(architecture: str) -> set[str]:
    """Module paths under geoloc/ that the module map lists: a row's first path names a package
    (`geoloc/data/`) or a module (`geoloc/errors.py`); each backticked `name.py` in a package's
    row is one of its modules."""
    table = architecture.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed: set[str] = set()
    for row in (line for line in table.splitlines() if line.startswith("| `geoloc/")):
        first = ROW_PATH.search(row)
        assert first is not None, row
        path, kind = first.groups()
        if kind == ".py":
            listed.add(f"{path}.py")
        else:
            listed.update(f"{path}/{name}" for name in MODULE_NAME.findall(row))
    return listed


def test_module_map_lists_every_module_and_only_those(repo_root: Path) -> None:
    architecture = (repo_root / "docs" / "ARCHITECTURE.md").read_text()
    built = {
        p.relative_to(repo_root / "geoloc").as_posix()
        for p in (repo_root / "geoloc").rglob("*.py")
        if p.name != "__init__.py"
    }
    listed = documented_modules(architecture)
    assert not built - listed, f"modules missing from the module map: {sorted(built - listed)}"
    assert not listed - built, f"the module map lists gone modules: {sorted(listed - built)}"


def test_training_and_inference_load_no_presentation(repo_root: Path) -> None:
    """A training job or a model server never pays for matplotlib or the report code."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import geoloc.train, geoloc.infer\n"
        "for pkg in (geoloc.train, geoloc.infer):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "loaded = [m for m in sys.modules if m.startswith(('matplotlib', 'geoloc.presentation'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root, timeout=300)
