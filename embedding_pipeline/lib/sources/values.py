"""Reading the JSON input files and checking their values, with positions.

Every check raises `InputFileError` naming the file, the position (a JSON path such as
``messages[17] (id 42).text`` or a line and column) and the reason; what passes can be
stored as is: ids fit PostgreSQL's `bigint`, times lie in years 1-9999 UTC, and no text
holds a NUL character or a lone surrogate (docs/formats.md). The Telegram export reader
(`telegram.py`) and the extraction reader (`extraction_file.py`) share them.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedding_pipeline.lib.sources.json_stream import JsonReadError, Member, StreamedObject

#: Ids are stored as PostgreSQL `bigint`.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1


_SURROGATE = re.compile("[\ud800-\udfff]")


class InputFileError(ValueError):
    """An input file is malformed; nothing from it was written."""

    def __init__(self, path: Path | str, position: str, reason: str) -> None:
        self.path = str(path)
        self.position = position
        self.reason = reason
        super().__init__(f"{path}: {position}: {reason}")


class _RepeatedKeys(dict[str, Any]):
    """A JSON object in which a key appeared more than once (JSON readers keep the last)."""

    repeated_key = ""


def first_repeat(items: list[Any]) -> int | None:
    """The index of the first item equal to an earlier one."""
    seen: set[Any] = set()
    for i, item in enumerate(items):
        if item in seen:
            return i
        seen.add(item)
    return None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _RepeatedKeys(obj)
    keys = [k for k, _ in pairs]
    marked.repeated_key = keys[first_repeat(keys) or 0]
    return marked


#: Objects with a repeated key are marked (json keeps the last value silently).
DECODER = json.JSONDecoder(object_pairs_hook=_object)


def read_json(path: Path) -> tuple[Any, str]:
    """The whole JSON value of `path` and the file's SHA-256, read in chunks (the
    extraction file: its topics and atoms are all needed at once)."""
    stream = StreamedObject(path, None, DECODER)
    pairs: list[tuple[str, Any]] = []
    top: list[Any] = []
    try:
        for event in stream:
            assert isinstance(event, Member)
            if event.key is None:
                top.append(event.value)
            else:
                pairs.append((event.key, event.value))
    except JsonReadError as exc:
        raise InputFileError(path, exc.position, exc.reason) from None
    assert stream.sha256 is not None
    return (top[0] if top else _object(pairs)), stream.sha256


def describe(value: Any) -> str:
    """A JSON value as a reader of the file would name it."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "a number too large for the JSON reader"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 30 else f"a {len(text)}-digit number"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "...")
    return "a list" if isinstance(value, list) else "an object"


def as_object(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputFileError(path, where, f"expected an object, got {describe(value)}")
    if isinstance(value, _RepeatedKeys):
        raise InputFileError(path, where, f"the key {value.repeated_key!r} appears twice")
    return value


def as_list(value: Any, path: Path, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InputFileError(path, where, f"expected a list, got {describe(value)}")
    return value


def as_id(value: Any, path: Path, where: str) -> int:
    """An integer id that PostgreSQL's bigint holds (JSON true is not 1)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputFileError(path, where, f"expected an integer id, got {describe(value)}")
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise InputFileError(
            path, where, f"{describe(value)} is out of range: ids must fit a 64-bit integer"
        )
    return value


def checked_text(value: str, path: Path, where: str) -> str:
    """`value`, refused if PostgreSQL text cannot hold it."""
    if "\x00" in value:
        raise InputFileError(
            path, where, "contains a NUL character (\\u0000), which PostgreSQL text cannot hold"
        )
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise InputFileError(
            path,
            where,
            f"contains a lone surrogate (\\u{ord(surrogate.group()):04x}), which is not valid "
            "Unicode",
        )
    return value


def field_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def optional_str(obj: dict[str, Any], key: str, path: Path, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputFileError(
            path, field_path(where, key), f"expected a string or null, got {describe(value)}"
        )
    return checked_text(value, path, field_path(where, key))


def required_str(obj: dict[str, Any], key: str, path: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "" if isinstance(value, str) else f", got {describe(value)}"
        raise InputFileError(path, field_path(where, key), f"expected a non-empty string{got}")
    return checked_text(value, path, field_path(where, key)).strip()


def in_range(moment: datetime, path: Path, where: str, raw: Any) -> datetime:
    """`moment` in UTC; refused when UTC takes it outside years 1-9999."""
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise InputFileError(
            path, where, f"{describe(raw)} is out of range (years 1-9999 in UTC)"
        ) from None


def parse_iso(value: Any, path: Path, where: str) -> datetime:
    if not isinstance(value, str):
        raise InputFileError(path, where, f"expected an ISO date string, got {describe(value)}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputFileError(path, where, f"not an ISO date: {describe(value)}") from None
    return in_range(parsed, path, where, value)
