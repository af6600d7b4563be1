"""The error convert raises for anything the user can fix: it names the file, line and field."""

from __future__ import annotations


class ConvertError(Exception):
    """Bad input, bad options or an interrupted job's leftovers; the message says what and where."""
