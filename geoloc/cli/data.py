"""`geoloc data ...` and `geoloc index ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geoloc.cli._common import ConfigOption, SetOption

data_app = typer.Typer(
    help="Get images with GPS into data/raw -> data/processed.", no_args_is_help=True
)
index_app = typer.Typer(
    help="Build the canonical H3 index under data/index/.", no_args_is_help=True
)


def _index_config(config: str | None, overrides: list[str] | None):
    from geoloc.config import IndexConfig, load_config

    return load_config(config, overrides or [], model=IndexConfig)


@data_app.command("demo")
def demo(
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 12000,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same bytes.")] = 0,
    sigma_deg: Annotated[float, typer.Option(help="Gaussian jitter around cities (deg).")] = 0.5,
    min_population: Annotated[int, typer.Option(help="Smallest city drawn.")] = 15000,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: $GEOLOC_DATA_DIR/raw/demo).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Regenerate even if the folder is up to date.")
    ] = False,
    placement: Annotated[
        str,
        typer.Option(
            help="cities (near GeoNames cities) or uniform-land (uniform over land: the shift "
            "split, evaluated with `geoloc evaluate`)."
        ),
    ] = "cities",
) -> None:
    """Write the offline demo dataset (Blue Marble crops at GeoNames cities, GPS in EXIF)."""
    from geoloc.data.demo import make_demo
    from geoloc.paths import DataPaths

    out_dir = out or DataPaths.default().demo
    report = make_demo(
        out_dir, n=n, seed=seed, sigma_deg=sigma_deg, min_population=min_population,
        placement=placement, force=force,  # type: ignore[arg-type]
    )  # fmt: skip
    if placement == "uniform-land":
        typer.echo(
            f"demo: {report.n} images uniform over land -> {report.out_dir} "
            f"({report.seconds:.1f}s); next: geoloc evaluate --run runs/<run_id> {report.out_dir}"
        )
        return
    typer.echo(
        f"demo: {report.n} images near {report.n_cities} cities -> {report.out_dir} "
        f"({report.seconds:.1f}s); next: geoloc data ingest demo"
    )


@data_app.command("synth")
def synth(
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 10000,
    layout: Annotated[
        str, typer.Option(help="folder (EXIF GPS) or osv5m (train.csv/test.csv + images/).")
    ] = "folder",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: $GEOLOC_DATA_DIR/raw/synth).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the places: same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (~100 m each).")] = 64,
    test_frac: Annotated[
        float, typer.Option(help="osv5m: share of sequences written to test.csv.")
    ] = 0.1,
    workers: Annotated[
        int | None, typer.Option(help="Processes rendering images (default: all CPUs).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rewrite even if the folder is up to date.")] = False,
) -> None:
    """Write a synthetic street-level dataset (a procedural world at ~100 m/pixel) for scale."""
    from geoloc.data.synth import make_synth
    from geoloc.paths import DataPaths

    out_dir = out or DataPaths.default().raw / "synth"
    report = make_synth(
        out_dir, n, layout, seed, size=size, test_frac=test_frac, workers=workers, force=force
    )
    rate = "up to date" if report.skipped else f"{report.images_per_s:.0f} images/s"
    typer.echo(
        f"synth: {report.n} images ({report.layout}) around {report.n_towns} towns -> "
        f"{report.out_dir} ({report.seconds:.1f}s, {rate})"
    )
    if report.layout == "folder":
        typer.echo(f"next: geoloc data ingest {report.out_dir}")


@data_app.command("ingest")
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder, a .csv/.parquet manifest, a downloaded OSV-5M (its folder or "
            "train.csv) or MP-16 table, s3://bucket/prefix, "
            "mapillary:minlon,minlat,maxlon,maxlat, or `demo`."
        ),
    ],
    format: Annotated[  # noqa: A002 - the option is --format
        str,
        typer.Option(
            "--format",
            "-f",
            help="What SOURCE is: auto (detected from its columns and files), osv5m, mp16, "
            "manifest, folder, s3, mapillary, demo.",
        ),
    ] = "auto",
    fetch_urls: Annotated[
        bool,
        typer.Option(
            "--fetch-urls",
            help="Download a row's URL (e.g. OSV-5M thumb_original_url) when its image is not "
            "on disk; never otherwise.",
        ),
    ] = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    workers: Annotated[int | None, typer.Option(help="Processes for decoding.")] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3 endpoint (MinIO...); default AWS_ENDPOINT_URL.")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Forget this job's progress and redo it.")] = False,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Items per journaled chunk (the unit of resume).")
    ] = 256,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="Source option key=value (repeatable), e.g. max_images=500 (mapillary), "
            "base_dir=/photos (manifest).",
        ),
    ] = None,
) -> None:
    """Ingest SOURCE into data/processed/ (resumable; rejects go to data/index/rejects.parquet)."""
    from geoloc.data.ingest import ingest as run_ingest
    from geoloc.paths import DataPaths

    cfg = _index_config(config, overrides)
    if workers is not None:
        cfg.workers = workers
    from geoloc.config import parse_overrides

    options = parse_overrides(option or [])
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if fetch_urls:
        options["fetch_urls"] = True
    if format != "auto":
        options["format"] = format
    report = run_ingest(
        source, DataPaths.default(), cfg, fresh=fresh, chunk_size=chunk_size, **options
    )
    typer.echo(
        f"ingest {source}: read {report.read} = accepted {report.accepted} + rejected "
        f"{report.rejected} + duplicates {report.duplicates} ({report.seconds:.1f}s"
        + (f", {report.resumed} resumed" if report.resumed else "")
        + ")"
    )
    for reason, count in report.reasons.items():
        typer.echo(f"  rejected {reason}: {count}")
    for note in report.notes:
        typer.echo(f"note: {note}")
    for error in report.errors:  # the rest is ingested; the command still fails
        typer.echo(f"error: {error}", err=True)
    if report.errors:
        raise typer.Exit(1)


@index_app.command("build")
def build(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Build images/splits/labels/h3_features under data/index/ (resumable, deterministic)."""
    from geoloc.data.index import build_index
    from geoloc.paths import DataPaths

    paths = DataPaths.default()
    report = build_index(paths, _index_config(config, overrides))
    counts = ", ".join(f"{k} {v}" for k, v in report.split_counts.items())
    typer.echo(
        f"index: {report.n_images} images ({counts}), {report.n_classes} classes, "
        f"{report.n_parents} parents, {report.n_remapped} remapped to the nearest class "
        f"-> {paths.index} ({report.seconds:.1f}s)"
    )
    typer.echo(f"fingerprint {report.fingerprint}")
