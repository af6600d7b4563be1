"""Input formats: finding input files, cutting each into work units and units into records.

A unit is a deterministic chunk of whole records: its boundaries depend only on the file's
content and the unit size, never on the number of workers, so every run of the same job cuts
the same units and can resume unit by unit. Each format is one ``InputFormat`` subclass and
one line in ``FORMATS`` (see docs/CONVERT.md, "Adding an input format").
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile
import zlib
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import xxhash

from streamshards.convert.errors import ConvertError
from streamshards.util import is_remote

if TYPE_CHECKING:
    from streamshards.convert.documents import DocumentRules

# Bad-record kinds found while parsing a unit (documents.py counts the others).
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
TOO_DEEP = "nested_too_deep"

# Parquet units are cut by rows: this many bytes a row (about one C4 document) turns the unit
# size into a row count.
PARQUET_ROW_BYTES = 2048
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
    end_offset: int = 0  # decompressed bytes of the file up to this unit's end

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
    # After damage: decompressed bytes that can be trusted; units ending past it are dropped.
    trusted_bytes: int | None = None


Bad = Callable[[str, str], None]  # reports a bad record: (kind, message naming file and line)


class InputFormat:
    """One input file format: the file names it reads, how a file is cut into units, and how
    a unit's payload becomes records (dicts)."""

    # File name ending (any case) -> the compression under it ("gzip", "zstd" or None).
    suffixes: ClassVar[dict[str, str | None]]

    def units(
        self,
        source: InputFile,
        file_number: int,
        unit_bytes: int,
        txt_per_line: bool,
        report: FileReport,
    ) -> Iterator[Unit]:
        """Cut one file into units, filling ``report`` with its hash, unit count and any read
        error; a unit's payload is whatever ``records`` takes (bytes or a list)."""
        raise NotImplementedError

    def records(
        self, payload: Any, path: str, first_line: int, rules: DocumentRules, bad: Bad
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, record) pairs of one unit; a bad record goes to ``bad`` (which raises
        ConvertError under --on-error fail) and is skipped."""
        raise NotImplementedError


class LineFormat(InputFormat):
    """A format of one record a line: units are runs of whole lines, decompressed by the
    suffix's codec; a subclass writes ``records`` (``utf8_lines`` splits a unit)."""

    def units(
        self,
        source: InputFile,
        file_number: int,
        unit_bytes: int,
        txt_per_line: bool,
        report: FileReport,
    ) -> Iterator[Unit]:
        yield from _hashed_units(
            source, report, lambda raw: _line_units(raw, source, file_number, unit_bytes, report)
        )


class JsonLines(LineFormat):
    """One JSON object per line; ``.json`` too (read as JSON lines, as C4 ships it), plain,
    gzip or zstd."""

    suffixes = {
        ".jsonl.gz": "gzip",
        ".json.gz": "gzip",
        ".jsonl.zst": "zstd",
        ".json.zst": "zstd",
        ".jsonl": None,
        ".json": None,
    }

    def records(
        self, payload: bytes, path: str, first_line: int, rules: DocumentRules, bad: Bad
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for number, text in utf8_lines(payload, path, first_line, bad):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                bad(MALFORMED_JSON, f"{path}:{number}: malformed JSON: {err}")
                continue
            except RecursionError:
                bad(TOO_DEEP, f"{path}:{number}: JSON nested too deep to read")
                continue
            if not isinstance(record, dict):
                bad(
                    MALFORMED_JSON,
                    f"{path}:{number}: expected a JSON object per line, got "
                    f"{type(record).__name__} (.json files are read as JSON lines, as in C4)",
                )
                continue
            yield number, record


class Text(InputFormat):
    """Plain UTF-8 text: one document a file, or one a line with --txt-per-line."""

    suffixes = {".txt": None}

    def units(
        self,
        source: InputFile,
        file_number: int,
        unit_bytes: int,
        txt_per_line: bool,
        report: FileReport,
    ) -> Iterator[Unit]:
        if txt_per_line:
            cut = partial(
                _line_units,
                source=source,
                file_number=file_number,
                unit_bytes=unit_bytes,
                report=report,
            )
        else:
            cut = partial(_whole_file_unit, file_number=file_number, report=report)
        yield from _hashed_units(source, report, cut)

    def records(
        self, payload: bytes, path: str, first_line: int, rules: DocumentRules, bad: Bad
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        if not rules.txt_per_line:
            text = _utf8(payload, path, 1, bad)
            if text is not None:
                yield 1, {rules.text_field: text}
            return
        for number, text in utf8_lines(payload, path, first_line, bad):
            yield number, {rules.text_field: text.rstrip("\r")}


class Parquet(InputFormat):
    """Parquet files (needs pyarrow): units of a fixed number of rows, each row a dict."""

    suffixes = {".parquet": None}

    def units(
        self,
        source: InputFile,
        file_number: int,
        unit_bytes: int,
        txt_per_line: bool,
        report: FileReport,
    ) -> Iterator[Unit]:
        yield from parquet_units(source, file_number, unit_bytes, report)

    def records(
        self, payload: list, path: str, first_line: int, rules: DocumentRules, bad: Bad
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        return enumerate(payload, first_line)


# The registry: an input file's kind names its format.
FORMATS: dict[str, InputFormat] = {
    "jsonl": JsonLines(),
    "parquet": Parquet(),
    "txt": Text(),
}


def format_of(path: str) -> tuple[str, str | None] | None:
    """(kind, codec) for a supported file name, else None; the longest matching ending wins,
    so ``.jsonl.gz`` is gzip'd JSON lines whatever the registry order."""
    lower = path.lower()
    best: tuple[str, str, str | None] | None = None
    for kind, fmt in FORMATS.items():
        for suffix, codec in fmt.suffixes.items():
            if lower.endswith(suffix) and (best is None or len(suffix) > len(best[0])):
                best = suffix, kind, codec
    return None if best is None else best[1:]


def _supported() -> str:
    """Every supported file name ending, for errors."""
    return ", ".join(suffix for fmt in FORMATS.values() for suffix in fmt.suffixes)


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
                    f"input folder {spec!r} holds no supported file ({_supported()})"
                )
            paths.extend(found)
        elif os.path.isfile(spec):
            if not format_of(spec):
                raise ConvertError(
                    f"input {spec!r}: unsupported file type; supported: {_supported()}"
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


class _GzipMembers:
    """gzip decompression member by member, knowing how far output is checked by a trailer.

    ``verified`` is the decompressed size up to the end of the last member whose CRC and
    length matched; output past it is trusted only if the file simply ends early.
    ``signature_seen`` says the current member's bytes hold a gzip header: a sign that a cut
    member swallowed the next one, whose bytes then decompress to garbage.
    """

    def __init__(self, raw: _HashingReader):
        self.raw = raw
        self.compressed = b""
        self.inflate = None
        self.produced = 0
        self.verified = 0
        self.signature_seen = False
        self.scanned_tail = b""

    def read1(self, size: int = _BLOCK) -> bytes:
        while True:
            if not self.compressed:
                self.compressed = self.raw.read(_BLOCK)
                if not self.compressed:
                    if self.inflate is not None:
                        raise EOFError(
                            "Compressed file ended before the end-of-stream marker was reached"
                        )
                    return b""
            if self.inflate is None:
                if self.produced and not self.compressed.strip(b"\x00"):
                    self.compressed = b""  # zero padding after the last member
                    continue
                if len(self.compressed) < 2:
                    self.compressed += self.raw.read(_BLOCK)
                if not self.compressed.startswith(b"\x1f\x8b"):
                    raise gzip.BadGzipFile(f"Not a gzipped file ({self.compressed[:2]!r})")
                self.inflate = zlib.decompressobj(31)
                self.signature_seen = False
                self.scanned_tail = b""
                fed_header = True
            else:
                fed_header = False
            data = self.compressed
            out = self.inflate.decompress(data, size)
            rest = self.inflate.unused_data if self.inflate.eof else self.inflate.unconsumed_tail
            consumed = data[: len(data) - len(rest)]
            self._scan(consumed[3:] if fed_header else consumed)
            self.compressed = rest
            self.produced += len(out)
            if self.inflate.eof:
                self.inflate = None
                self.verified = self.produced
            if out:
                return out

    read = read1

    def _scan(self, consumed: bytes) -> None:
        window = self.scanned_tail + consumed
        if b"\x1f\x8b\x08" in window:
            self.signature_seen = True
        self.scanned_tail = window[-2:]


def _stream(raw: _HashingReader, codec: str | None):
    if codec == "gzip":
        return _GzipMembers(raw)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def read_units(
    source: InputFile, file_number: int, unit_bytes: int, txt_per_line: bool, report: FileReport
) -> Iterator[Unit]:
    """Cut one file into units by its format, filling ``report`` with its hash and any read
    error."""
    return FORMATS[source.kind].units(source, file_number, unit_bytes, txt_per_line, report)


def _hashed_units(
    source: InputFile, report: FileReport, cut: Callable[[_HashingReader], Iterator[Unit]]
) -> Iterator[Unit]:
    """The units ``cut`` makes of a file read through a hashing reader; then its hash."""
    try:
        raw = _HashingReader(source.path)
    except OSError as err:
        raise ConvertError(f"{source.path}: cannot open: {err.strerror or err}") from None
    try:
        yield from cut(raw)
    except BaseException:
        raw.file.close()  # the job stops: no need to hash the rest
        raise
    report.xxh3_64 = raw.finish()


def _utf8(data: bytes, path: str, number: int, bad: Bad) -> str | None:
    """``data`` as text, or None after reporting line ``number`` as invalid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad(INVALID_UTF8, f"{path}:{number}: invalid UTF-8 at byte {err.start}")
        return None


def utf8_lines(payload: bytes, path: str, first_line: int, bad: Bad) -> Iterator[tuple[int, str]]:
    """(line number, text) of each newline-ended line of a unit that is valid UTF-8."""
    for number, line in enumerate(payload.split(b"\n")[:-1], first_line):
        text = _utf8(line, path, number, bad)
        if text is not None:
            yield number, text


def _whole_file_unit(raw: _HashingReader, file_number: int, report: FileReport) -> Iterator[Unit]:
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
    yielded = 0  # decompressed bytes handed out in units so far
    ends: list[tuple[int, int]] = []  # (end_offset, last line) of each unit handed out
    carried = False
    eof = False
    while not eof:
        try:
            block = read(_BLOCK)
        except errors as err:
            buffer = b"".join([buffer, *pieces])
            pieces, waiting = [], 0
            trusted = _trusted_bytes(stream, err)
            if trusted is not None:
                # Damage inside a member: keep nothing it decompressed past the last trailer.
                report.trusted_bytes = trusted
                buffer = buffer[: max(0, trusted - yielded)]
            # The bytes after the last newline are an incomplete record: drop them.
            buffer = buffer[: buffer.rfind(b"\n") + 1]
            if trusted is not None and yielded > trusted:
                complete = max((last for end, last in ends if end <= trusted), default=0)
            else:
                complete = line + buffer.count(b"\n") - 1
            where = f"after line {complete}" if complete else "from the start"
            report.read_error = f"{source.path}: unreadable {where}: {err or type(err).__name__}"
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
            yielded += len(payload)
            unit = Unit(file_number, number, line, payload, raw.pos, end_offset=yielded)
            line += payload.count(b"\n")
            ends.append((yielded, line - 1))
            number += 1
            if eof and not buffer:
                unit.read_error = report.read_error
                carried = True
            yield unit
    if report.read_error and not carried:
        # An empty last unit carries the error (its end is past any trusted bytes).
        yield Unit(file_number, number, line, b"", raw.pos, report.read_error, yielded + 1)
        number += 1
    report.units = number


def _trusted_bytes(stream, err: BaseException) -> int | None:
    """After a read error: how many decompressed bytes to trust, or None for all of them.

    A file that just ends early (nothing after the cut) decompressed only real bytes; any
    other gzip damage may have produced garbage since the last verified member.
    """
    if not isinstance(stream, _GzipMembers):
        return None
    if isinstance(err, EOFError) and not stream.signature_seen:
        return None
    return stream.verified


def _parquet_module(path: str):
    """``pyarrow.parquet``, or a ConvertError naming ``path`` and the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError(
            f"{path}: reading Parquet needs pyarrow: pip install 'streamshards[parquet]'"
        ) from None
    return pq


def parquet_unit_rows(unit_bytes: int) -> int:
    """The rows of one Parquet unit for a unit size in bytes."""
    return max(1, unit_bytes // PARQUET_ROW_BYTES)


def parquet_row_groups(path: str) -> list[int]:
    """The row count of each row group of a local Parquet file (read from its footer)."""
    pq = _parquet_module(path)
    try:
        metadata = pq.ParquetFile(path).metadata
    except (OSError, ValueError) as err:
        raise ConvertError(f"{path}: unreadable Parquet file: {err}") from None
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def parquet_units(
    source: InputFile,
    file_number: int,
    unit_bytes: int,
    report: FileReport,
    row_groups: tuple[int, int | None] = (0, None),
) -> Iterator[Unit]:
    """Units of a fixed number of rows counted from the file's start (a unit may span row
    groups); values come through pyarrow as Python objects.

    With ``row_groups`` (first, stop), only the units that start in those row groups, read on
    into later groups to finish the last one; a range to the file's end hashes the whole file.
    """
    pq = _parquet_module(source.path)
    first, stop = row_groups
    if stop is None:
        hasher = xxhash.xxh3_64()
        with open(source.path, "rb") as f:
            while block := f.read(_BLOCK):
                hasher.update(block)
        report.xxh3_64 = hasher.hexdigest()
    rows = parquet_unit_rows(unit_bytes)
    try:
        parquet = pq.ParquetFile(source.path)
        metadata = parquet.metadata
        starts = [0]
        for g in range(metadata.num_row_groups):
            starts.append(starts[-1] + metadata.row_group(g).num_rows)
        stop = metadata.num_row_groups if stop is None else stop
        number, end = -(-starts[first] // rows), -(-starts[stop] // rows)
        group = max(0, bisect_right(starts, number * rows) - 1)
        if number < end:
            batches = parquet.iter_batches(
                batch_size=rows, row_groups=list(range(group, metadata.num_row_groups))
            )
            skip = number * rows - starts[group]
            for records in _row_slices(batches, skip, rows, end - number):
                yield Unit(file_number, number, number * rows + 1, records, source.size)
                number += 1
    except (OSError, ValueError) as err:
        raise ConvertError(f"{source.path}: unreadable Parquet file: {err}") from None
    if row_groups[1] is None:
        report.units = -(-starts[-1] // rows)


def _row_slices(batches: Iterator, skip: int, rows: int, count: int) -> Iterator[list]:
    """``count`` runs of ``rows`` rows (the file's last run may be shorter) as lists of dicts,
    from the rows of record ``batches`` after the first ``skip``; whatever pyarrow's batches."""
    import pyarrow as pa

    pending = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        pending = table if pending is None else pa.concat_tables([pending, table])
        dropped = min(skip, pending.num_rows)
        pending, skip = pending.slice(dropped), skip - dropped
        while count and pending.num_rows >= rows:
            yield pending.slice(0, rows).to_pylist()
            pending, count = pending.slice(rows), count - 1
        if not count:
            return
    if pending is not None and pending.num_rows:
        yield pending.to_pylist()


def find_any_inputs(specs: list[str]) -> list[InputFile]:
    """Like ``inputs.find_inputs``, and also ``s3://``/``gs://`` objects, prefixes and globs
    (a prefix is listed one level deep; matches are taken in name order)."""
    if not any(is_remote(spec) for spec in specs):
        return find_inputs(specs)
    found: list[InputFile] = []
    for spec in specs:
        found.extend(_remote_inputs(spec) if is_remote(spec) else find_inputs([spec]))
    seen: set[str] = set()
    unique = []
    for source in found:
        key = source.path if is_remote(source.path) else os.path.realpath(source.path)
        if key not in seen:
            seen.add(key)
            unique.append(source)
    return unique


def _remote_inputs(spec: str) -> list[InputFile]:
    from streamshards.storage import StorageError, open_storage

    parent, _, last = spec.rstrip("/").rpartition("/")
    try:
        if any(ch in last for ch in "*?["):
            objects = [o for o in open_storage(parent).list() if fnmatch(o.name, last)]
            root = parent
        elif format_of(last) and not spec.endswith("/"):
            objects, root = [open_storage(parent).stat(last)], parent
        else:
            objects, root = open_storage(spec.rstrip("/")).list(), spec.rstrip("/")
    except StorageError as err:
        raise ConvertError(f"input {spec}: {err}") from None
    except ValueError as err:
        raise ConvertError(f"input {spec}: {err}") from None
    inputs = []
    for info in objects:
        kind_codec = format_of(info.name)
        if kind_codec:
            inputs.append(InputFile(f"{root}/{info.name}", *kind_codec, info.size))
    if not inputs:
        raise ConvertError(f"input {spec!r} matches no supported file")
    return inputs


def fetch_input(source: InputFile) -> str:
    """A worker reads its own input: a remote object is downloaded to a local temporary file."""
    from streamshards.storage import open_storage

    parent, _, name = source.path.rpartition("/")
    handle, path = tempfile.mkstemp(prefix="streamshards-input-", suffix=f"-{name}")
    os.close(handle)
    try:
        open_storage(parent).get(name, path, expected_size=source.size)
    except BaseException:
        os.unlink(path)
        raise
    return path
