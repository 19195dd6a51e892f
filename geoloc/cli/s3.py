"""`geoloc s3 push|pull`: mirror a run directory or the data index to S3-compatible storage.

An index travels with its images: `push --index URL` uploads `data/index/` to `URL/` and the
tar shards its images.parquet reads from to `URL/shards/`; `pull --index URL` brings both back
(`data/index/`, `data/processed/shards/`), or the index alone with `--no-images` (then train
with `train.shards_url=URL` to stream the images from the bucket).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from geoloc.errors import GeolocError
from geoloc.paths import DataPaths, runs_dir

s3_app = typer.Typer(
    help="Move runs and the data index to S3-compatible storage (AWS, MinIO...).",
    no_args_is_help=True,
)

IndexFlag = Annotated[
    bool, typer.Option("--index", help="Transfer the data index (data/index/) instead of a run.")
]
EndpointOption = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="S3 endpoint, e.g. http://localhost:9000 for MinIO (default: $AWS_ENDPOINT_URL).",
    ),
]
ThresholdOption = Annotated[
    int, typer.Option("--multipart-threshold-mb", min=1, help="Multipart above this size (MiB).")
]
WorkersOption = Annotated[int, typer.Option("--workers", min=1, help="Files in flight at once.")]
NoImagesFlag = Annotated[
    bool,
    typer.Option("--no-images", help="With --index: leave the image shards out of the transfer."),
]


def _split_args(args: list[str], index: bool, verb: str, usage: str) -> tuple[str | None, str]:
    """(local path or None, s3 url) from the positional arguments; one-line errors otherwise."""
    if index:
        if len(args) != 1:
            raise GeolocError(f"s3 {verb} --index takes only the S3 URL: {usage}")
        return None, args[0]
    if verb == "push" and len(args) != 2:
        raise GeolocError(f"s3 push needs a run directory and an S3 URL: {usage}")
    if verb == "pull" and len(args) not in (1, 2):
        raise GeolocError(f"s3 pull needs an S3 URL and optionally a run directory: {usage}")
    if verb == "push":
        return args[0], args[1]
    return (args[1] if len(args) == 2 else None), args[0]


def _run_dir(arg: str) -> Path:
    """A path as given, or a run id under `$GEOLOC_RUNS_DIR` when no such path exists."""
    path = Path(arg)
    if not path.exists() and (runs_dir() / arg).is_dir():
        return runs_dir() / arg
    return path


def _print_report(verb: str, src: str, dst: str, report: object) -> None:
    counts = (
        f"uploaded {report.uploaded}, skipped {report.skipped}"  # type: ignore[attr-defined]
        if verb == "push"
        else f"downloaded {report.downloaded}, skipped {report.skipped}"  # type: ignore[attr-defined]
    )
    failed = len(report.failed)  # type: ignore[attr-defined]
    size = report.bytes_transferred / 1e6  # type: ignore[attr-defined]
    typer.echo(f"{verb} {src} -> {dst}: {counts}, failed {failed} ({size:.1f} MB transferred)")


def _transfer(
    verb: str, src: str, dst: str, endpoint_url: str | None, threshold_mb: int, workers: int,
    keep: Callable[[str], bool] | None = None,
) -> None:  # fmt: skip
    """Run push (src local, dst S3) or pull (src S3, dst local) and print the counts, also
    the partial ones when it fails midway."""
    from geoloc.storage import s3 as storage

    run = storage.push if verb == "push" else storage.pull
    try:
        report = run(
            Path(src) if verb == "push" else src,
            dst if verb == "push" else Path(dst),
            endpoint_url=endpoint_url,
            multipart_threshold=threshold_mb * 1024 * 1024,
            workers=workers,
            progress=True,
            keep=keep,
        )
    except storage.StorageError as exc:
        if exc.report is not None:
            _print_report(verb, src, dst, exc.report)
        raise
    _print_report(verb, src, dst, report)


@s3_app.command("push")
def push(
    args: Annotated[list[str], typer.Argument(metavar="[RUN_DIR] S3_URL", show_default=False)],
    index: IndexFlag = False,
    endpoint_url: EndpointOption = None,
    multipart_threshold_mb: ThresholdOption = 64,
    workers: WorkersOption = 4,
    no_images: NoImagesFlag = False,
) -> None:
    """Upload RUN_DIR (a path or a run id) or --index (with its image shards) to
    s3://bucket/prefix.

    Files whose content is already there (same sha256) are skipped.
    """
    local, url = _split_args(args, index, "push", "geoloc s3 push RUN_DIR|--index s3://b/prefix")
    paths = DataPaths.default()
    src = paths.index if local is None else _run_dir(local)
    if local is None and not src.is_dir():
        raise GeolocError(f"no data index at '{src}': run `geoloc index build` first")
    from geoloc.data.imagestore import SHARDS_DIR

    shards = _index_shards(paths) if index and not no_images else []
    folder = paths.processed / SHARDS_DIR
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:  # refuse before uploading anything: a pushed index must be whole
        raise GeolocError(
            f"the index in '{paths.index}' reads {len(missing)} shard(s) missing from "
            f"'{folder}' (e.g. {missing[0]}): rebuild the index or pull the shards first"
        )
    _transfer("push", str(src), url, endpoint_url, multipart_threshold_mb, workers)
    if shards:
        wanted = set(shards)
        _transfer("push", str(folder), f"{url.rstrip('/')}/{SHARDS_DIR}", endpoint_url,
                  multipart_threshold_mb, workers, keep=wanted.__contains__)  # fmt: skip


@s3_app.command("pull")
def pull(
    args: Annotated[list[str], typer.Argument(metavar="S3_URL [RUN_DIR]", show_default=False)],
    index: IndexFlag = False,
    endpoint_url: EndpointOption = None,
    multipart_threshold_mb: ThresholdOption = 64,
    workers: WorkersOption = 4,
    no_images: NoImagesFlag = False,
) -> None:
    """Download s3://bucket/prefix into RUN_DIR (default: runs/<last prefix part>) or --index
    (and its image shards into data/processed/shards/).

    Each file is verified against the sha256 recorded at upload; a mismatch leaves the local
    file untouched and fails the command.
    """
    from geoloc.storage import s3 as storage

    local, url = _split_args(args, index, "pull", "geoloc s3 pull s3://b/prefix RUN_DIR|--index")
    if index:
        dst = DataPaths.default().index
    elif local is not None:
        dst = Path(local)
    else:
        name = storage.parse_s3_url(url).prefix.rsplit("/", 1)[-1]
        if not name:
            raise GeolocError(f"'{url}' names no run folder: give RUN_DIR explicitly")
        dst = runs_dir() / name
    if not index:
        _transfer("pull", url, str(dst), endpoint_url, multipart_threshold_mb, workers)
        return
    from geoloc.data.imagestore import SHARDS_DIR

    paths = DataPaths.default()
    not_shards = lambda rel: not rel.startswith(f"{SHARDS_DIR}/")  # noqa: E731
    _transfer("pull", url, str(dst), endpoint_url, multipart_threshold_mb, workers,
              keep=not_shards)  # fmt: skip
    shards = set(_index_shards(paths)) if not no_images else set()
    if shards:
        _transfer("pull", f"{url.rstrip('/')}/{SHARDS_DIR}", str(paths.processed / SHARDS_DIR),
                  endpoint_url, multipart_threshold_mb, workers,
                  keep=shards.__contains__)  # fmt: skip


def _index_shards(paths: DataPaths) -> list[str]:
    from geoloc.data.imagestore import index_shards

    return index_shards(paths.images) if paths.images.is_file() else []
