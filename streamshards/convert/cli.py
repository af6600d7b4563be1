"""``streamshards convert``: the command line over ConvertJob, with a progress bar and a summary."""

from __future__ import annotations

import shutil

import click

from streamshards.convert import convert as run_convert
from streamshards.convert.errors import ConvertError
from streamshards.convert.lock import OutputLock
from streamshards.convert.options import ConvertOptions, ConvertResult, Progress
from streamshards.convert.remote import RemoteOutput
from streamshards.util import human_size, is_remote


class _ProgressBar:
    """A tqdm bar over input bytes, with documents/s and tokens/s beside it."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.bytes_total,
                unit="B",
                unit_scale=True,
                desc="convert",
                leave=False,
                disable=None,
            )
        self.bar.update(progress.bytes_done - self.bar.n)
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        postfix = {"docs/s": f"{progress.documents / elapsed:,.0f}"}
        if progress.tokens:
            postfix["tokens/s"] = f"{progress.tokens / elapsed:,.0f}"
        if progress.tasks_total:
            postfix["tasks"] = f"{progress.tasks_done}/{progress.tasks_total}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_lines(result: ConvertResult, tokenized: bool) -> list[str]:
    """The final table: what went in, what came out, what was dropped and why."""
    seconds = max(result.seconds, 1e-9)
    ratio = result.bytes_in / result.bytes_out if result.bytes_out else 0.0
    rows = [
        ("documents", f"{result.documents_read:,} read, {result.documents_written:,} written"),
        ("samples", f"{result.samples:,}" + (" sequences" if tokenized else "")),
    ]
    if tokenized:
        rows.append(("tokens", f"{result.tokens:,} in documents"))
    rows += [
        ("shards", f"{result.shards:,}"),
        (
            "bytes in",
            f"{human_size(result.bytes_in)} ({human_size(result.bytes_read)} decompressed)",
        ),
        ("bytes out", f"{human_size(result.bytes_out)} (input/output {ratio:.2f}x)"),
        (
            "time",
            f"{result.seconds:.1f} s, {human_size(result.bytes_in / seconds)}/s in"
            + (f", {human_size(result.tokens / seconds, 'tok')}/s" if tokenized else ""),
        ),
        ("units", f"{result.units:,} ({result.units_reused:,} reused from an interrupted run)"),
    ]
    if result.engine != "local":
        rows.append(
            ("tasks", f"{result.tasks:,} on {result.engine} ({result.tasks_retried:,} retried)")
        )
    dropped = ", ".join(f"{k} {v:,}" for k, v in result.dropped.items()) or "none"
    bad = ", ".join(f"{k} {v:,}" for k, v in result.bad_records.items()) or "none"
    rows += [("dropped", dropped), ("bad records", bad)]
    return [f"  {name:<12} {value}" for name, value in rows]


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.argument("out")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option(
    "--keep-fields",
    default="",
    help="Comma-separated fields kept as extra columns (raw mode); NAME:json keeps non-strings.",
)
@click.option("--compression", default="zstd", show_default=True, help="zstd, zstd:LEVEL or none.")
@click.option("--size-limit", default="64MB", show_default=True, help="Raw bytes per shard.")
@click.option("--workers", type=int, default=None, help="Worker processes [default: CPU count].")
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="On a bad record or unreadable file: stop, or count it and go on.",
)
@click.option("--txt-per-line", is_flag=True, help="In .txt files, one document per line.")
@click.option("--tokenizer", help="A tokenizer.json: tokenize and pack into fixed-length rows.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per row.")
@click.option("--eos-id", type=int, help="Token after each document [default: the tokenizer's].")
@click.option("--bos-id", type=int, help="Token before each document [default: the tokenizer's].")
@click.option(
    "--tail",
    type=click.Choice(["drop", "pad"]),
    default="drop",
    show_default=True,
    help="The last partial row of the whole dataset: drop it, or pad it with the EOS id.",
)
@click.option("--min-chars", type=int, help="Drop documents shorter than this.")
@click.option("--max-chars", type=int, help="Drop documents longer than this.")
@click.option("--dedup", is_flag=True, help="Drop exact duplicates (normalised text); first wins.")
@click.option("--filter", "user_filter", help="module:function; keep documents it returns true on.")
@click.option("--unit-size", default="2MB", show_default=True, help="Input bytes per work unit.")
@click.option("--overwrite", is_flag=True, help="Replace a different dataset already at OUT.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: processes on this machine; ray: tasks on the Ray cluster at RAY_ADDRESS "
    "(else a local Ray), same bytes (needs streamshards[ray]).",
)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option("--block-size", type=int, help="LitData TokensLoader input: tokens per sample.")
@click.option("--pkl-as-bytes", is_flag=True, help="MDS input: pickle columns as raw bytes.")
def convert(inputs: tuple[str, ...], out: str, keep_fields: str, quiet: bool, **options) -> None:
    """Convert corpora (JSON lines, gzip/zstd, Parquet, text) into a shard dataset at OUT.

    INPUT is files, folders or globs. Re-run the same command after a crash to resume.
    One MDS or LitData dataset (folder or URL) is copied sample for sample (docs/INTEROP.md).

    Example: streamshards convert c4/*.json.gz shards/ --tokenizer tokenizer.json --seq-len 2048
    On a Ray cluster: RAY_ADDRESS=head:6379 streamshards convert ... --engine ray
    """
    from streamshards.interop.convert import convert_command, is_foreign

    foreign = {"block_size": options.pop("block_size"), "pkl_as_bytes": options.pop("pkl_as_bytes")}
    if len(inputs) == 1 and is_foreign(inputs[0]):  # an MDS or LitData dataset: copy it over
        convert_command(inputs[0], out, {**options, **foreign}, quiet)
        return
    fields = [f.strip() for f in keep_fields.split(",") if f.strip()]
    bar = _ProgressBar(not quiet)
    try:
        remote = RemoteOutput(out)
        # An engine's tasks write a remote OUT themselves; a local job stages it and uploads.
        direct = options["engine"] != "local" and is_remote(out)
        # One lock over converting and uploading: a second job waits for neither.
        with OutputLock(remote.local):
            result = run_convert(
                ConvertOptions(
                    inputs=inputs,
                    out=out if direct else remote.local,
                    keep_fields=fields,
                    **options,
                ),
                bar,
            )
            bar.close()
            if direct:
                shutil.rmtree(remote.local, ignore_errors=True)
            else:
                remote.publish(progress=not quiet)
    except ConvertError as err:
        bar.close()
        raise click.ClickException(str(err)) from None
    if quiet:
        return
    if result.already_done:
        click.echo(f"{out} already holds this conversion; nothing to do")
        return
    click.echo(f"converted {len(inputs)} input(s) into {out}")
    for line in summary_lines(result, bool(options.get("tokenizer"))):
        click.echo(line)
