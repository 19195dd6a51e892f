"""`geoloc.storage.s3` and `geoloc s3 push/pull` against moto's real HTTP S3 server."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest

from geoloc.cli import main
from geoloc.paths import DataPaths, runs_dir
from geoloc.storage import s3 as storage

pytestmark = pytest.mark.server


def _make_run(root: Path) -> dict[str, bytes]:
    """A small run-like tree; returns relative path -> bytes."""
    files = {
        "summary.json": b'{"schema_version": 1}\n',
        "config.json": b'{"model": {}}\n',
        "checkpoints/best.pt": os.urandom(4096),
        "artifacts/tables/metrics.csv": b"epoch,train_loss\n1,0.5\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_then_pull_round_trips_every_byte(s3_env, tmp_path: Path) -> None:
    files = _make_run(tmp_path / "run")
    up = storage.push(tmp_path / "run", s3_env.url("runs/r1"))
    assert (up.uploaded, up.skipped) == (len(files), 0)

    down = storage.pull(s3_env.url("runs/r1"), tmp_path / "copy")
    assert (down.downloaded, down.skipped) == (len(files), 0)
    assert _tree(tmp_path / "copy") == files


def test_objects_record_their_sha256(s3_env, tmp_path: Path) -> None:
    files = _make_run(tmp_path / "run")
    storage.push(tmp_path / "run", s3_env.url("r"))
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="r/summary.json")
    assert head["Metadata"]["sha256"] == hashlib.sha256(files["summary.json"]).hexdigest()


def test_repush_uploads_only_changed_files(s3_env, tmp_path: Path) -> None:
    run = tmp_path / "run"
    files = _make_run(run)
    storage.push(run, s3_env.url("r"))
    client = s3_env.client()
    before = client.head_object(Bucket=s3_env.bucket, Key="r/checkpoints/best.pt")["LastModified"]

    (run / "summary.json").write_bytes(b'{"schema_version": 1, "status": "completed"}\n')
    again = storage.push(run, s3_env.url("r"))

    assert (again.uploaded, again.skipped) == (1, len(files) - 1)
    after = client.head_object(Bucket=s3_env.bucket, Key="r/checkpoints/best.pt")["LastModified"]
    assert after == before  # the unchanged object was not rewritten


def test_repull_downloads_only_changed_files(s3_env, tmp_path: Path) -> None:
    files = _make_run(tmp_path / "run")
    storage.push(tmp_path / "run", s3_env.url("r"))
    storage.pull(s3_env.url("r"), tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_bytes(b"edited locally")

    again = storage.pull(s3_env.url("r"), tmp_path / "copy")

    assert (again.downloaded, again.skipped) == (1, len(files) - 1)
    assert _tree(tmp_path / "copy") == files


def test_large_files_go_multipart_and_verify(s3_env, tmp_path: Path) -> None:
    big = tmp_path / "run" / "checkpoints" / "last.pt"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(6 * 1024 * 1024))  # parts are >= 5 MiB: 2 parts
    threshold = 1024 * 1024

    storage.push(tmp_path / "run", s3_env.url("big"), multipart_threshold=threshold)
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key="big/checkpoints/last.pt")
    assert head["ETag"].strip('"').endswith("-2")  # S3's mark of a 2-part upload

    storage.pull(s3_env.url("big"), tmp_path / "copy", multipart_threshold=threshold)
    assert (tmp_path / "copy/checkpoints/last.pt").read_bytes() == big.read_bytes()
    # no MD5 ETag for multipart objects: the sha256 metadata still makes repeats skip
    assert storage.push(tmp_path / "run", s3_env.url("big")).skipped == 1
    assert storage.pull(s3_env.url("big"), tmp_path / "copy").skipped == 1


def test_corrupt_object_is_detected_and_good_local_file_kept(s3_env, tmp_path: Path) -> None:
    files = _make_run(tmp_path / "run")
    storage.push(tmp_path / "run", s3_env.url("r"))
    storage.pull(s3_env.url("r"), tmp_path / "copy")
    # the local copy is edited, and the object rots: its bytes no longer match its checksum
    (tmp_path / "copy" / "summary.json").write_bytes(b"local version")
    client = s3_env.client()
    head = client.head_object(Bucket=s3_env.bucket, Key="r/summary.json")
    client.put_object(
        Bucket=s3_env.bucket, Key="r/summary.json", Body=b"bit rot", Metadata=head["Metadata"]
    )

    with pytest.raises(storage.CorruptObjectError, match="r/summary.json") as info:
        storage.pull(s3_env.url("r"), tmp_path / "copy")

    assert (tmp_path / "copy" / "summary.json").read_bytes() == b"local version"
    assert not [p for p in (tmp_path / "copy").iterdir() if p.name.endswith(".tmp")]
    assert info.value.report is not None and info.value.report.skipped == len(files) - 1


def test_corrupt_object_leaves_no_file_in_a_fresh_pull(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.put_object(
        Bucket=s3_env.bucket, Key="r/a.bin", Body=b"xx", Metadata={"sha256": "0" * 64}
    )
    with pytest.raises(storage.CorruptObjectError):
        storage.pull(s3_env.url("r"), tmp_path / "copy")
    assert not (tmp_path / "copy" / "a.bin").exists()


def test_objects_without_our_checksum_are_verified_by_md5_etag(s3_env, tmp_path: Path) -> None:
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="ext/x.txt", Body=b"from elsewhere")
    report = storage.pull(s3_env.url("ext"), tmp_path / "copy")
    assert report.downloaded == 1
    assert storage.pull(s3_env.url("ext"), tmp_path / "copy").skipped == 1


def test_missing_bucket_is_a_clear_error(s3_env, tmp_path: Path) -> None:
    _make_run(tmp_path / "run")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.push(tmp_path / "run", "s3://no-such-bucket/x")


def test_unreachable_endpoint_is_a_clear_error(s3_env, tmp_path: Path) -> None:
    _make_run(tmp_path / "run")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.push(tmp_path / "run", s3_env.url("x"), endpoint_url="http://127.0.0.1:9")


@pytest.mark.parametrize("url", ["bucket/prefix", "s3://", "s3:///prefix", "s3://b/../x"])
def test_bad_s3_urls_are_refused(url: str) -> None:
    with pytest.raises(storage.StorageError, match="s3://"):
        storage.parse_s3_url(url)


def test_pull_of_an_empty_prefix_fails(s3_env, tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="no objects"):
        storage.pull(s3_env.url("nothing/here"), tmp_path / "copy")


def test_credentials_never_appear_in_output(
    s3_env, tmp_path: Path, capsys, caplog, monkeypatch
) -> None:
    secret = "S3cr3t-Value-Never-Shown"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any credentials
    _make_run(tmp_path / "run")
    caplog.set_level("DEBUG", logger="geoloc")
    assert main(["s3", "push", str(tmp_path / "run"), s3_env.url("r")]) == 0
    assert main(["s3", "push", str(tmp_path / "run"), "s3://missing-bucket/r"]) == 1
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert "missing-bucket" in text
    assert secret not in text


# --- CLI -------------------------------------------------------------------------------------


def test_cli_push_pull_run_dir_prints_counts(s3_env, tmp_path: Path, capsys) -> None:
    run = runs_dir() / "20260101-000000-abc"
    files = _make_run(run)
    url = s3_env.url("runs/20260101-000000-abc")

    assert main(["s3", "push", str(run), url]) == 0
    assert f"uploaded {len(files)}" in capsys.readouterr().out
    assert main(["s3", "push", str(run), url]) == 0
    assert f"skipped {len(files)}" in capsys.readouterr().out

    dest = tmp_path / "pulled"
    assert main(["s3", "pull", url, str(dest)]) == 0
    assert f"downloaded {len(files)}" in capsys.readouterr().out
    assert _tree(dest) == files


def test_cli_pull_defaults_to_a_run_dir_named_after_the_prefix(s3_env, tmp_path: Path) -> None:
    files = _make_run(tmp_path / "run")
    storage.push(tmp_path / "run", s3_env.url("team/runs/r42"))
    assert main(["s3", "pull", s3_env.url("team/runs/r42")]) == 0
    assert _tree(runs_dir() / "r42") == files


def test_cli_index_round_trip(s3_env, capsys) -> None:
    paths = DataPaths.default()
    paths.index.mkdir(parents=True)
    paths.labels.write_text('{"version": 1}\n')
    # an index of images stored one file each: no shards travel with it
    pd.DataFrame({"image_id": ["a"], "path": ["processed/a.jpg"]}).to_parquet(paths.images)
    url = s3_env.url("datasets/demo/index")

    assert main(["s3", "push", "--index", url]) == 0
    paths.labels.unlink()
    assert main(["s3", "pull", "--index", url]) == 0
    assert "downloaded 1" in capsys.readouterr().out
    assert paths.labels.read_text() == '{"version": 1}\n'


def test_cli_explicit_endpoint_wins_over_environment(s3_env, tmp_path: Path, monkeypatch) -> None:
    _make_run(tmp_path / "run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    args = ["s3", "push", str(tmp_path / "run"), s3_env.url("r")]
    assert main(args) == 1
    assert main([*args, "--endpoint-url", s3_env.endpoint_url]) == 0


def test_cli_bad_arguments_fail_with_one_line(s3_env, tmp_path: Path, capsys) -> None:
    assert main(["s3", "push", str(tmp_path / "missing"), s3_env.url("r")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert main(["s3", "push", "--index", s3_env.url("r")]) == 1
    assert "index" in capsys.readouterr().err
    assert main(["s3", "push", str(tmp_path), "not-a-url"]) == 1
    assert "not an S3 URL" in capsys.readouterr().err


def test_pull_refuses_keys_that_would_land_outside_the_folder(s3_env, tmp_path: Path) -> None:
    client = s3_env.client()
    client.put_object(Bucket=s3_env.bucket, Key="r/ok.txt", Body=b"ok")
    client.put_object(Bucket=s3_env.bucket, Key="r/../../evil.txt", Body=b"evil")
    with pytest.raises(storage.StorageError, match="outside the target folder"):
        storage.pull(s3_env.url("r"), tmp_path / "a" / "b")
    assert not list(tmp_path.rglob("*.txt"))  # refused before anything was written


def test_cli_push_accepts_a_run_id(s3_env, capsys) -> None:
    files = _make_run(runs_dir() / "20260102-000000-def")
    assert main(["s3", "push", "20260102-000000-def", s3_env.url("runs/x")]) == 0
    assert f"uploaded {len(files)}" in capsys.readouterr().out
