"""The ``streamshards`` command line: inspect, verify, merge, upload, download and convert.

The commands parse arguments and print; the work happens in the library (``transfer``,
``merge``, ``convert``), imported only when a command runs.
"""

from __future__ import annotations

import importlib
import json
import sys

import click

from streamshards.format import ShardError
from streamshards.index import IndexFormatError
from streamshards.storage import StorageError
from streamshards.util import human_size, is_remote

# Commands that live beside the code they drive; imported only when used.
_LAZY = {
    "convert": "streamshards.convert.cli:convert",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY:
            module, attr = _LAZY[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_Group)
@click.version_option(package_name="streamshards")
def main() -> None:
    """Compressed, indexed shards for language-model training."""


def _open_index(dataset: str, block_size: int | None = None, pkl_as_bytes: bool = False):
    """The shard source (index and shard paths) of a local folder or a remote URL; the
    options are for MDS and LitData datasets (docs/INTEROP.md)."""
    from streamshards.sources import open_source

    options = {k: v for k, v in (("block_size", block_size), ("pkl_as_bytes", pkl_as_bytes)) if v}
    if is_remote(dataset):
        return open_source(dataset, None, **options)
    return open_source(None, dataset, **options)


_block_size = click.option(
    "--block-size", type=int, help="LitData TokensLoader datasets: tokens per sample."
)
_pkl_as_bytes = click.option(
    "--pkl-as-bytes", is_flag=True, help="MDS pickle columns as raw bytes (never unpickled)."
)


@main.command()
@click.argument("dataset")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
@_block_size
@_pkl_as_bytes
def inspect(dataset: str, as_json: bool, **options) -> None:
    """Show a dataset's size, schema and provenance.

    Example: streamshards inspect ./shards --json
    """
    try:
        index = _open_index(dataset, **options).index
    except (IndexFormatError, OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    ratio = index.raw_bytes / index.stored_bytes if index.stored_bytes else 1.0
    summary = {
        "dataset": dataset,
        "samples": index.num_samples,
        "shards": len(index.shards),
        "raw_bytes": index.raw_bytes,
        "stored_bytes": index.stored_bytes,
        "compression_ratio": round(ratio, 3),
        "columns": index.columns,
        "provenance": index.provenance,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"dataset      {dataset}")
    click.echo(f"samples      {index.num_samples:,}")
    click.echo(f"shards       {len(index.shards):,}")
    click.echo(f"raw bytes    {human_size(index.raw_bytes)}")
    click.echo(f"stored bytes {human_size(index.stored_bytes)} (compression ratio {ratio:.2f}x)")
    click.echo("columns")
    for name, ctype in index.columns.items():
        click.echo(f"  {name:<12} {ctype}")
    click.echo("provenance")
    for line in json.dumps(index.provenance, indent=1).splitlines()[1:-1]:
        click.echo(" " + line)


@main.command()
@click.argument("dataset")
@_block_size
@_pkl_as_bytes
def verify(dataset: str, **options) -> None:
    """Check every shard's size and hash against the index and that it decodes.

    Exits 1 with one line per bad shard. Example: streamshards verify ./shards
    """
    if is_remote(dataset):
        _verify_remote(dataset)  # the remote objects themselves, not a node cache
        return
    try:
        source = _open_index(dataset, **options)
    except (IndexFormatError, OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    index = source.index
    bad = 0
    for k, info in enumerate(index.shards):
        try:
            view = source.open_view(k)
            for j in range(view.num_samples):
                view.sample(j)
        except (ShardError, ValueError, OSError, OverflowError, RecursionError) as err:
            bad += 1
            click.echo(f"BAD {info.file}: {err}")
    click.echo(
        f"{len(index.shards) - bad} of {len(index.shards)} shards ok, {index.num_samples:,} samples"
    )
    if bad:
        sys.exit(1)


@main.command()
@click.argument("parts", nargs=-1, required=True)
@click.option("--out", required=True, help="Folder for the merged dataset.")
@click.option("--compression", default="zstd", show_default=True, help="zstd, zstd:LEVEL or none.")
@click.option("--size-limit", default="64MB", show_default=True, help="Raw bytes per shard.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: one task per shard on the Ray cluster at RAY_ADDRESS (shared folders), same bytes.",
)
def merge(
    parts: tuple[str, ...],
    out: str,
    compression: str,
    size_limit: str,
    overwrite: bool,
    engine: str = "local",
) -> None:
    """Merge datasets (or a folder of part folders, in name order) into one.

    Example: streamshards merge parts/ --out merged/
    """
    from streamshards.convert.errors import ConvertError
    from streamshards.merge import merge as merge_parts

    try:
        if engine == "local":
            index = merge_parts(parts, out, compression, size_limit, overwrite)
        else:
            from streamshards.convert.merge_engine import merge_on_engine

            index = merge_on_engine(list(parts), out, compression, size_limit, overwrite, engine)
    except (IndexFormatError, OSError, ValueError, ConvertError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"merged {index.num_samples:,} samples into {len(index.shards)} shards at {out}")


def _verify_remote(remote: str, workers: int = 8) -> None:
    """``verify`` for a URL: one ``BAD name: reason`` line per bad shard, a summary, exit 1
    if any is bad."""
    from streamshards.transfer import verify_remote

    try:
        index, results = verify_remote(remote, workers)
        bad = 0
        for info, problem in results:
            if problem is not None:
                bad += 1
                click.echo(f"BAD {info.file}: {problem}")
    except (StorageError, IndexFormatError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    shards = len(index.shards)
    click.echo(f"{shards - bad} of {shards} shards ok, {index.num_samples:,} samples")
    if bad:
        raise SystemExit(1)


#: What a failed upload or download raises that the user can act on; one line each.
_TRANSFER_ERRORS = (StorageError, IndexFormatError, ShardError, FileNotFoundError, ValueError)


def _summary(verb: str, report, where: str) -> str:
    return (
        f"{verb} {report.files} shards ({report.bytes / 1e6:.1f} MB, "
        f"{report.mb_per_second:.1f} MB/s), skipped {report.skipped} already there, {where}"
    )


@main.command()
@click.argument("local")
@click.argument("remote")
@click.option("--workers", default=8, show_default=True, help="Files uploaded in parallel.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def upload(local: str, remote: str, workers: int, quiet: bool) -> None:
    """Publish a local dataset to a remote; files already there are skipped, index.json last.

    Example: streamshards upload ./shards s3://bucket/datasets/web-v1
    """
    from streamshards.transfer import upload as upload_dataset

    try:
        report = upload_dataset(local, remote, workers, progress=not quiet)
    except _TRANSFER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(_summary("uploaded", report, f"to {remote}"))


@main.command()
@click.argument("remote")
@click.argument("local")
@click.option("--workers", default=8, show_default=True, help="Files downloaded in parallel.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(remote: str, local: str, workers: int, quiet: bool) -> None:
    """Copy a remote dataset into a local folder, verifying every shard; index.json last.

    Example: streamshards download gs://bucket/datasets/web-v1 ./web-v1
    """
    from streamshards.transfer import download as download_dataset

    try:
        report = download_dataset(remote, local, workers, progress=not quiet)
    except _TRANSFER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:  # the local side: a file in the way, read-only, disk full
        where = f" ({err.filename})" if err.filename else ""
        raise click.ClickException(
            f"cannot write the dataset into {local}: {err.strerror or err}{where}"
        ) from None
    click.echo(_summary("downloaded", report, f"into {local}"))
