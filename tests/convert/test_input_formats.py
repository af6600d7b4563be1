"""Adding an input format is one InputFormat class and one FORMATS line (docs/CONVERT.md)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import pytest
from convert_helpers import run_convert, samples

from streamshards.convert.inputs import FORMATS, LineFormat, utf8_lines


class Csv(LineFormat):
    """The example of docs/CONVERT.md, "Adding an input format": CSV with a header row."""

    suffixes = {".csv": None}

    def records(
        self, payload, path, first_line, rules, bad
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(path, "rb") as f:  # line 1 of the file names the fields
            header = next(csv.reader([f.readline().decode("utf-8")]))
        for number, line in utf8_lines(payload, path, first_line, bad):
            if number > 1:
                yield number, dict(zip(header, next(csv.reader([line]))))


@pytest.fixture
def with_csv(monkeypatch):
    monkeypatch.setitem(FORMATS, "csv", Csv())


def test_a_registered_input_format_is_found_cut_and_converted(tmp_path, with_csv):
    rows = [f'{k},"doc {k}, quoted",{k * k}' for k in range(500)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,text,square\n" + "\n".join(rows) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text(
        '{"text": "after the csv", "id": "x", "square": "y"}\n'
    )
    out = tmp_path / "out"
    run_convert(
        tmp_path / "in",
        out,
        "--unit-size",
        "1KB",
        "--workers",
        "1",
        "--keep-fields",
        "id,square",
        "--quiet",
    )
    got = samples(out)
    assert [s["text"] for s in got] == [f"doc {k}, quoted" for k in range(500)] + ["after the csv"]
    assert got[7]["square"] == "49"


def test_a_registered_input_format_reports_bad_records_by_file_and_line(tmp_path, with_csv):
    (tmp_path / "a.csv").write_bytes(b"text\nfine\nbad \xff byte\n")
    result = run_convert(tmp_path / "a.csv", tmp_path / "out", "--workers", "1", expect_ok=False)
    assert result.exit_code != 0 and "a.csv:3: invalid UTF-8 at byte 4" in result.output
