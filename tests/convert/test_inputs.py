"""Cutting inputs into units: whole lines, content-defined boundaries, correct line numbers."""

from __future__ import annotations

import pytest
from convert_helpers import SAMPLE
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshards.convert.inputs import FileReport, InputFile, find_inputs, read_units


def units_of(path, unit_bytes, codec=None):
    source = InputFile(str(path), "jsonl", codec, path.stat().st_size)
    report = FileReport(source.size)
    return list(read_units(source, 0, unit_bytes, False, report)), report


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(
        st.binary(min_size=0, max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=60
    ),
    unit_bytes=st.integers(1, 2000),
    final_newline=st.booleans(),
)
def test_units_are_whole_lines_covering_the_file_in_order(
    tmp_path_factory, lines, unit_bytes, final_newline
):
    path = tmp_path_factory.mktemp("u") / "f.jsonl"
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path.write_bytes(data)
    units, report = units_of(path, unit_bytes)
    joined = b"".join(u.payload for u in units)
    assert joined.rstrip(b"\n") == data.rstrip(b"\n") and all(
        u.payload.endswith(b"\n") for u in units
    )
    line = 1
    for number, unit in enumerate(units):
        assert (unit.number, unit.first_line) == (number, line)
        assert len(unit.payload) >= unit_bytes or number == len(units) - 1
        line += unit.payload.count(b"\n")
    assert report.units == len(units) and report.read_error is None


def test_gzip_units_match_plain_units(tmp_path):
    import gzip

    plain = tmp_path / "c4.json"
    plain.write_bytes(gzip.decompress(SAMPLE.read_bytes()))
    gz, _ = units_of(SAMPLE, 100_000, "gzip")
    raw, _ = units_of(plain, 100_000)
    assert [u.payload for u in gz] == [u.payload for u in raw] and len(gz) > 10


def test_folders_are_searched_recursively_skipping_hidden_and_unknown_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/b.jsonl", "d/sub/a.txt", "d/.hidden/x.jsonl", "d/notes.md", "d/a.parquet"):
        (tmp_path / name).write_text("")
    found = [f.path for f in find_inputs([str(tmp_path / "d")])]
    assert [p.split("/d/")[1] for p in found] == ["a.parquet", "b.jsonl", "sub/a.txt"]
    assert [f.kind for f in find_inputs([str(tmp_path / "d")])] == ["parquet", "jsonl", "txt"]


@pytest.mark.parametrize("name", ["x.jsonl.gz", "X.JSON.GZ", "x.jsonl.zst", "x.json"])
def test_c4_and_compressed_names_are_json_lines(tmp_path, name):
    (tmp_path / name).write_text("")
    (source,) = find_inputs([str(tmp_path / name)])
    assert source.kind == "jsonl"
