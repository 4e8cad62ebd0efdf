"""Reading a JSON file that must hold one object, with errors that name the file and line."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """The object in ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: it is empty, not UTF-8, not valid JSON (the message gives line and column),
            or holds something other than an object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                        f"at offset {err.start}); restore or regenerate it") from err
    if not text.strip():
        raise DataError(f"{what} {path} is empty; restore it, or write it again")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {path}, line {err.lineno} column {err.colno}: not valid JSON "
                        f"({err.msg}); fix or regenerate the file") from err
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} holds a JSON {_json_kind(data)}, not an object "
                        "({\"key\": value, ...}); restore or regenerate it")
    return data


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def unknown_keys_message(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``'n_layer' (did you mean 'n_layers'?), 'foo'``: each unknown key with the closest
    known one, when there is a close one."""
    known = sorted(known)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ", ".join(parts)
