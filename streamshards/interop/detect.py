"""Which kind of dataset an index.json describes: native, MosaicML MDS or LitData."""

from __future__ import annotations

from typing import Any

from streamshards.index import FORMAT_NAME
from streamshards.interop.litdata import LitDataFormat, is_litdata
from streamshards.interop.mds import MDSFormat, is_mds

ForeignFormat = MDSFormat | LitDataFormat


def index_kind(obj: Any) -> str:
    """``"native"``, ``"mds"`` or ``"litdata"`` for a decoded index.json object."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        return "native"
    if is_mds(obj):
        return "mds"
    if is_litdata(obj):
        return "litdata"
    return "native"  # let the native parser name what is wrong with it


def load_foreign(obj: Any, source: str, options: dict[str, Any]) -> ForeignFormat | None:
    """The MDS or LitData index that the decoded index.json ``obj`` describes, or None when it
    is (or claims to be) native; its source calls ``complete`` once it can reach the first
    shard."""
    kind = index_kind(obj)
    if kind == "mds":
        return MDSFormat(obj, source, options)
    if kind == "litdata":
        return LitDataFormat(obj, source, options)
    return None
