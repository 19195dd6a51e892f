"""S3-compatible object storage through boto3 (the only module that imports boto3).

Two users: the `s3` data source (list and read objects under a prefix) and `geoloc s3 push/pull`
(mirror a run directory or the data index). Design choices:

- The endpoint comes from `endpoint_url` or `AWS_ENDPOINT_URL`, with path-style addressing so
  MinIO and other S3-compatible stores work without DNS tricks.
- Credentials come only from boto3's standard chain (env vars, shared files, instance roles).
  This module never reads, prints or logs them.
- Every uploaded object carries the sha256 of its bytes in its metadata (`x-amz-meta-sha256`).
  It is what makes a re-push skip unchanged files without downloading them, and what a pull checks
  each download against (ETags are not content hashes for multipart uploads).
- Downloads land in a temp file beside the target and replace it only once verified
  (`geoloc.atomic`), so a corrupt object never overwrites a good local file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from geoloc.atomic import atomic_path, file_sha256
from geoloc.errors import GeolocError

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
SHA256_META = "sha256"  # stored as x-amz-meta-sha256
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_WORKERS = 4
_HASH_CHUNK = 1024 * 1024


class StorageError(GeolocError):
    """An S3 operation failed: bad URL, missing bucket, unreachable endpoint, no credentials.

    When a push or pull fails part-way, `report` says what was done before it gave up.
    """

    report: TransferReport | None = None


class ObjectMissingError(StorageError):
    """The key does not exist (the bucket does)."""


class CorruptObjectError(StorageError):
    """Downloaded bytes do not match the checksum recorded with the object."""


@dataclass(frozen=True)
class S3Url:
    """`s3://bucket/prefix` split into its parts; `prefix` has no leading/trailing slash."""

    bucket: str
    prefix: str

    def key(self, relative: str) -> str:
        """The key of `relative` (a posix path) below this prefix."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@dataclass
class TransferReport:
    """What a push or pull did; `failed` lists `key: reason` for objects that did not verify."""

    uploaded: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes_transferred: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return self.uploaded + self.downloaded + self.skipped + len(self.failed)


def parse_s3_url(url: str) -> S3Url:
    """Split `s3://bucket[/prefix]`; a `StorageError` names the URL when it is not one."""
    if not url.startswith("s3://"):
        raise StorageError(f"'{url}' is not an S3 URL: expected s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"'{url}' has no bucket name: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    if any(part in ("..", ".") for part in prefix.split("/") if prefix):
        raise StorageError(f"'{url}': the prefix may not contain '.' or '..' segments")
    return S3Url(bucket=bucket, prefix=prefix)


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """Explicit endpoint, else `AWS_ENDPOINT_URL`, else None (AWS itself)."""
    return endpoint_url or os.environ.get(ENDPOINT_ENV) or None


def create_client(endpoint_url: str | None = None, *, max_pool: int = 16) -> Any:
    """An S3 client with path-style addressing; thread-safe, share it across fetch threads."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool,
    )
    # a private session: boto3's default session is not thread-safe to create clients from
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=resolve_endpoint(endpoint_url), config=config)


def _where(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", "") or "AWS")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def translate_error(exc: Exception, client: Any, bucket: str, key: str | None = None) -> Exception:
    """Turn a botocore exception into a `StorageError` that names the input and the reason."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or an instance role)"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{where}: cannot reach the S3 endpoint {_where(client)}")
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and key is None):
            return StorageError(f"{where}: bucket '{bucket}' does not exist at {_where(client)}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectMissingError(f"{where}: no such key")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{where}: access denied ({code}); check the AWS credentials")
        return StorageError(f"{where}: S3 error {code or 'unknown'}")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{where}: {type(exc).__name__} talking to {_where(client)}")
    return exc


def check_bucket(client: Any, bucket: str) -> None:
    """Fail early and clearly when the bucket is missing or the endpoint unreachable."""
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        raise translate_error(exc, client, bucket) from None


def list_objects(client: Any, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
    """Every object below `prefix` (a folder: `prefix/`), in key order, paginated."""
    folder = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # folder markers some tools create
                    continue
                yield ObjectInfo(key=obj["Key"], size=int(obj["Size"]), etag=obj["ETag"])
    except Exception as exc:
        raise translate_error(exc, client, bucket, prefix or None) from None


def head_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's headers (`ContentLength`, `ETag`, `Metadata`), or None when it is missing."""
    try:
        return dict(client.head_object(Bucket=bucket, Key=key))
    except Exception as exc:
        err = translate_error(exc, client, bucket, key)
        if isinstance(err, ObjectMissingError):
            return None
        raise err from None


def get_bytes(client: Any, bucket: str, key: str) -> bytes:
    """The object's bytes; `ObjectMissingError` when the key does not exist."""
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as exc:
        raise translate_error(exc, client, bucket, key) from None


def get_range(client: Any, bucket: str, key: str, start: int, length: int) -> bytes:
    """`length` bytes of the object from `start` (one ranged GET; fewer where the object ends
    first, none when it ends before `start`): how image shards are read from object storage."""
    if length <= 0:
        return b""
    try:
        span = f"bytes={start}-{start + length - 1}"
        body = client.get_object(Bucket=bucket, Key=key, Range=span)
        return bytes(body["Body"].read())
    except Exception as exc:
        if _error_code(exc) == "InvalidRange":  # the object ends before `start`
            return b""
        raise translate_error(exc, client, bucket, key) from None


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def transfer_config(multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD) -> Any:
    """Multipart above `multipart_threshold` bytes (s3transfer keeps parts >= 5 MiB)."""
    from boto3.s3.transfer import TransferConfig

    if multipart_threshold <= 0:
        raise StorageError(f"multipart threshold must be positive, got {multipart_threshold}")
    return TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_threshold,
        max_concurrency=4,
    )


def _local_files(local_dir: Path) -> list[Path]:
    """Files to mirror, skipping temp files left by interrupted atomic writes and the lock
    files of live processes (`.lock`, `.training.lock`, `.sync.lock`, `.space-reserve`)."""
    files = []
    local = (".tmp", ".lock", ".space-reserve")
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and not (path.name.startswith(".") and path.name.endswith(local)):
            files.append(path)
    return files


def _map_files(
    work: Callable[[Any], str], items: list[Any], workers: int, desc: str, progress: bool
) -> list[tuple[Any, str | Exception]]:
    """Run `work` over `items` in a thread pool; collect each outcome (a tag or the error)."""
    results: list[tuple[Any, str | Exception]] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(items), desc=desc, unit="file", disable=not progress) as bar,
    ):
        futures = {pool.submit(work, item): item for item in items}
        for fut in as_completed(futures):
            try:
                results.append((futures[fut], fut.result()))
            except Exception as exc:  # collected, reported together below
                results.append((futures[fut], exc))
            bar.update(1)
    return results


def push(
    local_dir: str | os.PathLike[str],
    s3_url: str,
    *,
    endpoint_url: str | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> TransferReport:
    """Copy `local_dir` to `s3_url`, uploading only files whose content differs remotely.

    Nothing is deleted on either side: objects without a local counterpart stay. `keep`
    (a file's posix path relative to `local_dir` -> bool) pushes only some of the files.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"'{root}' is not a directory: nothing to push")
    target = parse_s3_url(s3_url)
    client = create_client(endpoint_url)
    check_bucket(client, target.bucket)
    config = transfer_config(multipart_threshold)
    remote = {o.key: o for o in list_objects(client, target.bucket, target.prefix)}
    report = TransferReport()

    def upload(path: Path) -> str:
        key = target.key(path.relative_to(root).as_posix())
        same_size = key in remote and remote[key].size == path.stat().st_size
        if same_size and _etag_matches(path, remote[key].etag):  # no HEAD needed
            return "skipped"
        digest = file_sha256(path)
        if same_size:
            head = head_object(client, target.bucket, key)
            if head and head.get("Metadata", {}).get(SHA256_META) == digest:
                return "skipped"
        try:
            client.upload_file(
                str(path),
                target.bucket,
                key,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=config,
            )
        except Exception as exc:
            raise translate_error(exc, client, target.bucket, key) from None
        return "uploaded"

    files = _local_files(root)
    if keep is not None:
        files = [p for p in files if keep(p.relative_to(root).as_posix())]
    for path, outcome in _map_files(upload, files, workers, "push", progress):
        if isinstance(outcome, Exception):
            report.failed.append(f"{path}: {outcome}")
        elif outcome == "skipped":
            report.skipped += 1
        else:
            report.uploaded += 1
            report.bytes_transferred += path.stat().st_size
    log.info("push %s -> %s: %s", root, target, report)
    if report.failed:
        err = StorageError(
            f"push {root} -> {target}: {len(report.failed)} of {len(files)} files failed: "
            + "; ".join(sorted(report.failed)[:5])
        )
        err.report = report
        raise err
    return report


def _expected_digest(head: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex) to verify a download against: our sha256, else a single-part MD5 ETag."""
    sha = head.get("Metadata", {}).get(SHA256_META)
    if sha:
        return "sha256", sha
    etag = str(head.get("ETag", "")).strip('"')
    if etag and "-" not in etag and len(etag) == 32:
        return "md5", etag
    return None


def _etag_matches(path: Path, etag: str) -> bool:
    """True when `etag` is a single-part MD5 ETag equal to the file's MD5 (same bytes).

    Multipart and encrypted objects have other ETags; they fall back to the sha256 metadata.
    """
    etag = etag.strip('"')
    return len(etag) == 32 and "-" not in etag and _md5_file(path) == etag


def _relative_key(key: str, prefix: str) -> str:
    rel = key[len(prefix) + 1 :] if prefix else key
    norm = posixpath.normpath(rel)
    if norm.startswith("../") or norm == ".." or posixpath.isabs(norm) or norm == ".":
        raise StorageError(f"key '{key}' would be written outside the target folder")
    return norm


def pull(
    s3_url: str,
    local_dir: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> TransferReport:
    """Mirror `s3_url` into `local_dir`, downloading only what differs and verifying each file.

    `keep` (an object's key relative to the prefix -> bool) pulls only some of the objects.

    A download whose bytes do not match the recorded checksum is discarded (the local file, if
    any, is left as it was) and the pull ends with a `CorruptObjectError` naming the keys.
    """
    source = parse_s3_url(s3_url)
    root = Path(local_dir)
    client = create_client(endpoint_url)
    check_bucket(client, source.bucket)
    config = transfer_config(multipart_threshold)
    objects = list(list_objects(client, source.bucket, source.prefix))
    if not objects:
        raise StorageError(f"{source}: no objects under this prefix")
    plan = [(obj, root / _relative_key(obj.key, source.prefix)) for obj in objects]
    if keep is not None:
        plan = [(obj, path) for obj, path in plan if keep(path.relative_to(root).as_posix())]
    report = TransferReport()

    def download(item: tuple[ObjectInfo, Path]) -> str:
        obj, path = item
        same_size = path.is_file() and path.stat().st_size == obj.size
        if same_size and _etag_matches(path, obj.etag):  # no HEAD needed
            return "skipped"
        head = head_object(client, source.bucket, obj.key)
        if head is None:  # deleted since listing
            raise ObjectMissingError(f"s3://{source.bucket}/{obj.key}: no such key")
        expected = _expected_digest(head)
        if expected and path.is_file() and path.stat().st_size == head.get("ContentLength"):
            algo, digest = expected
            local = file_sha256(path) if algo == "sha256" else _md5_file(path)
            if local == digest:
                return "skipped"
        with atomic_path(path) as tmp:
            try:
                client.download_file(source.bucket, obj.key, str(tmp), Config=config)
            except Exception as exc:
                raise translate_error(exc, client, source.bucket, obj.key) from None
            if expected:
                algo, digest = expected
                got = file_sha256(tmp) if algo == "sha256" else _md5_file(tmp)
                if got != digest:
                    raise CorruptObjectError(
                        f"s3://{source.bucket}/{obj.key}: {algo} of the downloaded bytes is "
                        f"{got[:12]}..., the object records {digest[:12]}...; kept the local copy"
                    )
            else:
                log.warning("s3://%s/%s has no checksum to verify against", source.bucket, obj.key)
        return "downloaded"

    corrupt = False
    for (obj, _path), outcome in _map_files(download, plan, workers, "pull", progress):
        if isinstance(outcome, Exception):
            corrupt = corrupt or isinstance(outcome, CorruptObjectError)
            report.failed.append(str(outcome))
        elif outcome == "skipped":
            report.skipped += 1
        else:
            report.downloaded += 1
            report.bytes_transferred += obj.size
    log.info("pull %s -> %s: %s", source, root, report)
    if report.failed:
        kind = CorruptObjectError if corrupt else StorageError
        err = kind(
            f"pull {source} -> {root}: {len(report.failed)} of {len(plan)} objects failed: "
            + "; ".join(sorted(report.failed)[:5])
        )
        err.report = report
        raise err
    return report
