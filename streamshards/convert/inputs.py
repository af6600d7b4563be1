"""Finding input files and cutting each into work units: deterministic chunks of whole records.

A unit's boundaries depend only on the file's content and the unit size, never on the number
of workers, so every run of the same job cuts the same units and can resume unit by unit.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from streamshards.convert.errors import ConvertError

# Longest suffix first, so ".jsonl.gz" wins over ".gz".
SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".jsonl.gz": ("jsonl", "gzip"),
    ".json.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".json.zst": ("jsonl", "zstd"),
    ".jsonl": ("jsonl", None),
    ".json": ("jsonl", None),
    ".parquet": ("parquet", None),
    ".txt": ("txt", None),
}
_BLOCK = 1 << 20
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class InputFile:
    """One input file: its path as the user will see it, its format and size."""

    path: str
    kind: str
    codec: str | None
    size: int


@dataclass
class Unit:
    """A run of whole records from one file, numbered within it; the unit of work and resume."""

    file: int
    number: int
    first_line: int
    payload: bytes | list
    end_pos: int
    read_error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.file:06d}-{self.number:07d}"


@dataclass
class FileReport:
    """What reading one file found: its hash and any error that cut it short."""

    size: int
    xxh3_64: str = ""
    read_error: str | None = None
    units: int = 0


def format_of(path: str) -> tuple[str, str | None] | None:
    """(kind, codec) for a supported file name, else None."""
    lower = path.lower()
    for suffix, fmt in SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    return None


def find_inputs(specs: Sequence[str]) -> list[InputFile]:
    """Expand files, folders (recursively, sorted) and globs (sorted) into input files, in order.

    A file named twice is read once, at its first place.
    """
    paths: list[str] = []
    for spec in specs:
        if any(ch in spec for ch in "*?["):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConvertError(f"input {spec!r} matches no file")
            paths.extend(p for p in matches if format_of(p))
        elif os.path.isdir(spec):
            found = sorted(
                str(p)
                for p in Path(spec).rglob("*")
                if p.is_file()
                and format_of(p.name)
                and not any(part.startswith(".") for part in p.relative_to(spec).parts)
            )
            if not found:
                raise ConvertError(
                    f"input folder {spec!r} holds no supported file ({', '.join(SUFFIXES)})"
                )
            paths.extend(found)
        elif os.path.isfile(spec):
            if not format_of(spec):
                raise ConvertError(
                    f"input {spec!r}: unsupported file type; supported: {', '.join(SUFFIXES)}"
                )
            paths.append(spec)
        else:
            raise ConvertError(f"input {spec!r} does not exist")
    seen: set[str] = set()
    inputs = []
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        kind, codec = format_of(path)
        inputs.append(InputFile(path, kind, codec, os.path.getsize(path)))
    if not inputs:
        raise ConvertError(f"no input files found in {' '.join(specs)}")
    return inputs


class _HashingReader:
    """A raw file reader that hashes every byte it hands out and counts them for progress."""

    def __init__(self, path: str):
        self.file = open(path, "rb")
        self.hasher = xxhash.xxh3_64()
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.hasher.update(data)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def finish(self) -> str:
        """Hash the rest of the file (after an early stop) and close it; returns the hex hash."""
        while self.read(_BLOCK):
            pass
        self.file.close()
        return self.hasher.hexdigest()


def _stream(raw: _HashingReader, codec: str | None):
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def read_units(
    source: InputFile, file_number: int, unit_bytes: int, txt_per_line: bool, report: FileReport
) -> Iterator[Unit]:
    """Cut one file into units, filling ``report`` with its hash and any read error."""
    if source.kind == "parquet":
        yield from _parquet_units(source, file_number, unit_bytes, report)
        return
    try:
        raw = _HashingReader(source.path)
    except OSError as err:
        raise ConvertError(f"{source.path}: cannot open: {err.strerror or err}") from None
    try:
        if source.kind == "txt" and not txt_per_line:
            yield from _whole_file_unit(raw, source, file_number, report)
        else:
            yield from _line_units(raw, source, file_number, unit_bytes, report)
    except BaseException:
        raw.file.close()  # the job stops: no need to hash the rest
        raise
    report.xxh3_64 = raw.finish()


def _whole_file_unit(
    raw: _HashingReader, source: InputFile, file_number: int, report: FileReport
) -> Iterator[Unit]:
    data = raw.read()
    report.units = 1
    yield Unit(file_number, 0, 1, data, raw.pos)


def _line_units(
    raw: _HashingReader, source: InputFile, file_number: int, unit_bytes: int, report: FileReport
) -> Iterator[Unit]:
    """Units of whole lines: each is the shortest run of lines reaching ``unit_bytes``."""
    stream = _stream(raw, source.codec)
    errors = _READ_ERRORS
    if source.codec == "zstd":
        import zstandard

        errors = (*errors, zstandard.ZstdError)
    # read1 returns each decompressed piece as it comes, so a corrupt tail loses only itself.
    read = getattr(stream, "read1", stream.read)
    buffer = b""
    pieces: list[bytes] = []  # blocks not yet joined into buffer (joining once per unit)
    waiting = 0
    line = 1
    number = 0
    eof = False
    while not eof:
        try:
            block = read(_BLOCK)
        except errors as err:
            buffer = b"".join([buffer, *pieces])
            pieces, waiting = [], 0
            complete = line + buffer.count(b"\n") - 1
            where = f"after line {complete}" if complete else "from the start"
            report.read_error = f"{source.path}: unreadable {where}: {err or type(err).__name__}"
            # The bytes after the last newline are an incomplete record: drop them.
            buffer = buffer[: buffer.rfind(b"\n") + 1]
            block = b""
        if block:
            pieces.append(block)
            waiting += len(block)
            if len(buffer) + waiting < unit_bytes:
                continue
        else:
            eof = True
        buffer = b"".join([buffer, *pieces])
        pieces, waiting = [], 0
        if eof and buffer and not buffer.endswith(b"\n"):
            buffer += b"\n"
        while buffer:
            cut = buffer.find(b"\n", max(0, unit_bytes - 1))
            if cut < 0:
                if not eof:
                    break
                cut = len(buffer) - 1
            payload, buffer = buffer[: cut + 1], buffer[cut + 1 :]
            unit = Unit(file_number, number, line, payload, raw.pos)
            line += payload.count(b"\n")
            number += 1
            if eof and not buffer:
                unit.read_error = report.read_error
            yield unit
    if report.read_error and number == 0:
        yield Unit(file_number, 0, 1, b"", raw.pos, report.read_error)
        number = 1
    report.units = number


def _parquet_units(
    source: InputFile, file_number: int, unit_bytes: int, report: FileReport
) -> Iterator[Unit]:
    """Units of a fixed number of rows; values come through pyarrow as Python objects."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError(
            f"{source.path}: reading Parquet needs pyarrow: pip install 'streamshards[parquet]'"
        ) from None
    hasher = xxhash.xxh3_64()
    with open(source.path, "rb") as f:
        while block := f.read(_BLOCK):
            hasher.update(block)
    report.xxh3_64 = hasher.hexdigest()
    rows = max(1, unit_bytes // 2048)
    try:
        parquet = pq.ParquetFile(source.path)
        number, line = 0, 1
        for batch in parquet.iter_batches(batch_size=rows):
            records = batch.to_pylist()
            yield Unit(file_number, number, line, records, source.size)
            number += 1
            line += len(records)
    except (OSError, ValueError) as err:
        raise ConvertError(f"{source.path}: unreadable Parquet file: {err}") from None
    report.units = number
