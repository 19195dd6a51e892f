"""glibc's heap settings (`geoloc.heap`): process-level, the numbers never depend on them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")  # fmt: skip
def test_rerank_block_loops_get_a_fixed_mmap_threshold_and_one_arena() -> None:
    """glibc takes both settings (without them rerank's test table at 10^6 images grew ~15 MB
    a block to an OOM kill at 23 GB; docs/scale.md), in a fresh process so this one's heap is
    left alone, and asking twice is harmless."""
    code = (
        "from geoloc.heap import bound_heap_growth\n"
        "assert bound_heap_growth() and bound_heap_growth(16 << 20)\n"
        "import numpy as np\n"
        "assert float(np.ones((64, 62_000)).sum()) == 64 * 62_000\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rerank_and_evaluate_start_with_the_bounded_heap_settings() -> None:
    """The console script re-executes `geoloc rerank|evaluate` once with glibc's variables set
    (read before the first allocation); other commands, other systems and a user's own
    MALLOC_ARENA_MAX are left alone, which is also what stops a second re-execution."""
    from geoloc.heap import HEAP_ENV, heap_exec

    env = heap_exec(["geoloc", "rerank", "runs/x"], {"PATH": "/bin"}, "linux")
    assert env == {"PATH": "/bin", **HEAP_ENV}
    assert heap_exec(["geoloc", "evaluate", "--run", "r", "photos"], {}, "linux") is not None
    assert heap_exec(["geoloc", "rerank", "r"], env, "linux") is None  # already re-executed
    assert heap_exec(["geoloc", "rerank", "r"], {"MALLOC_ARENA_MAX": "4"}, "linux") is None
    assert heap_exec(["geoloc", "train"], {}, "linux") is None
    assert heap_exec(["geoloc"], {}, "linux") is None
    assert heap_exec(["geoloc", "rerank", "r"], {}, "darwin") is None


def test_a_data_command_starts_without_torch() -> None:
    """`geoloc data ...` (an ingest at 10^6 images) pays no torch import: the console script's
    heap check used to load it into every command, ~660 MB resident in the ingest process."""
    code = (
        "import sys\n"
        "sys.argv = ['geoloc', 'data', 'ingest', '--help']\n"
        "from geoloc.cli import run\n"
        "try:\n"
        "    run()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "False"
