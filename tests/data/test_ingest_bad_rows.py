"""A large manifest with 1% bad rows (issue 28, "Bad input"), ingested through the CLI.

A user ingesting a big, imperfect manifest relies on three things: the counts add up
(read = accepted + rejected + duplicates), every refused row is a row in rejects.parquet with its
reason, and the terminal says one line per reason instead of one line per bad row.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

N_ROWS = 2_000
BAD = {"missing_file": 7, "nan_coords": 7, "corrupt": 6}  # 1% of the rows
DUPLICATES = 3


def _manifest(folder: Path) -> Path:
    """N_ROWS rows: distinct small JPEGs, then the bad rows and a few repeated images."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    good = N_ROWS - sum(BAD.values()) - DUPLICATES
    rows = []
    for i in range(good):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        (images / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append((f"img{i}", f"images/{i}.jpg", rng.uniform(-60, 60), rng.uniform(-170, 170)))
    for j in range(DUPLICATES):  # same bytes as an earlier image, another id
        (images / f"dup{j}.jpg").write_bytes((images / f"{j}.jpg").read_bytes())
        rows.append((f"dup{j}", f"images/dup{j}.jpg", 10.0, 10.0))
    for j in range(BAD["missing_file"]):
        rows.append((f"missing{j}", f"images/missing{j}.jpg", 10.0, 10.0))
    for j in range(BAD["nan_coords"]):
        rows.append((f"nan{j}", f"images/{j}.jpg", float("nan"), 10.0))
    for j in range(BAD["corrupt"]):  # a JPEG cut short after its header
        (images / f"corrupt{j}.jpg").write_bytes((images / f"{j}.jpg").read_bytes()[:200])
        rows.append((f"corrupt{j}", f"images/corrupt{j}.jpg", 10.0, 10.0))
    order = rng.permutation(len(rows))  # bad rows spread through the file
    table = pd.DataFrame([rows[i] for i in order], columns=["image_id", "path", "lat", "lon"])
    path = folder / "photos.csv"
    table.to_csv(path, index=False)
    return path


def test_one_percent_bad_rows_add_up_and_print_one_line_per_reason(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "src")
    done = subprocess.run(
        [sys.executable, "-m", "geoloc", "data", "ingest", str(manifest), "--workers", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    bad, accepted = sum(BAD.values()), N_ROWS - sum(BAD.values()) - DUPLICATES
    assert out[0].startswith(
        f"ingest {manifest}: read {N_ROWS} = accepted {accepted} + rejected {bad} + "
        f"duplicates {DUPLICATES}"
    ), out
    assert sorted(out[1:]) == sorted(f"  rejected {r}: {n}" for r, n in BAD.items())
    # nothing per row on either stream: a log line per bad row would be 20 lines here, 10^4 at 10^6
    for name in ("missing", "nan", "corrupt"):
        assert f"{name}0" not in done.stdout + done.stderr

    data = Path(os.environ["GEOLOC_DATA_DIR"])
    rejects = pd.read_parquet(data / "index" / "rejects.parquet")
    assert len(rejects) == bad + DUPLICATES
    assert rejects["reason"].value_counts().to_dict() == {**BAD, "duplicate": DUPLICATES}
    assert rejects["source_ref"].str.contains("photos.csv:").all()
    assert rejects["detail"].str.len().gt(0).all()
    for reason, named in (("missing_file", "missing"), ("corrupt", "corrupt")):
        refs = rejects.loc[rejects["reason"] == reason, "source_ref"]
        assert refs.str.contains(named).all(), refs.tolist()
    manifest_rows = pd.read_parquet(data / "processed" / "manifest.parquet")
    assert len(manifest_rows) == accepted
