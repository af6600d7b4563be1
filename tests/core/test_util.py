"""Sizes for people: the decimal and binary forms that summaries and the node doctor print."""

import pytest

from streamshards.util import human_size, parse_size


@pytest.mark.parametrize(
    ("count", "kwargs", "text"),
    [
        (812, {}, "812 B"),
        (1.5e6, {}, "1.5 MB"),
        (3.2e3, {"unit": "tok"}, "3.2 Ktok"),
        (2e15, {}, "2000.0 TB"),
        (1023, {"binary": True}, "1023 B"),
        (12.8 * 2**20, {"binary": True}, "12.8 MiB"),
        (65.9 * 2**30, {"binary": True}, "65.9 GiB"),
    ],
)
def test_human_size(count: float, kwargs: dict, text: str) -> None:
    assert human_size(count, **kwargs) == text


def test_a_printed_decimal_size_parses_back_close_to_the_count() -> None:
    printed = human_size(123_456_789).replace(" ", "")
    assert parse_size(printed) == pytest.approx(123_456_789, rel=1e-3)
