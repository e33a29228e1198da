"""Reading a Telegram Desktop chat export (`result.json`).

The reader is pure: it returns a `ChatExport` or raises `InputFileError` naming the file,
the position (a JSON path such as ``messages[17] (id 42).text`` or a line and column) and
the reason, checking the file from end to end one message at a time. What it returns can
be stored as is (the rules are in docs/formats.md and `values.py`).
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from embedding_pipeline.lib.sources.json_stream import (
    STREAMED,
    Element,
    JsonReadError,
    Member,
    StreamedObject,
)
from embedding_pipeline.lib.sources.values import (
    DECODER,
    InputFileError,
    as_id,
    as_object,
    checked_text,
    describe,
    optional_str,
    parse_iso,
)

_UNIX_TIME = re.compile(r"-?\d+")


#: What `_chat_message` returns for a message that is counted, not kept.
_SERVICE, _EMPTY = "service", "empty"


@dataclass(frozen=True)
class ChatMessage:
    telegram_id: int
    sent_at: datetime
    text: str
    author: str | None = None
    author_id: str | None = None
    edited_at: datetime | None = None
    reply_to: int | None = None


@dataclass
class ChatExport:
    """A checked export. Its messages are not held: `messages` reads them again from the
    file, one at a time, so an export of any size costs the memory of one message."""

    path: Path
    chat_id: int
    name: str
    sha256: str
    message_count: int = 0
    service_messages: int = 0
    empty_messages: int = 0

    @property
    def messages(self) -> Iterator[ChatMessage]:
        """The messages with text, in file order, read from the file as they are
        consumed; `InputFileError` if the file changed since `load_export` checked it."""
        stream = StreamedObject(self.path, "messages", DECODER)
        try:
            for event in stream:
                if isinstance(event, Element):
                    message, message_id = _message_id(event.value, event.index, self.path)
                    kept = _chat_message(message, message_id, event.index, self.path)
                    if isinstance(kept, ChatMessage):
                        yield kept
        except JsonReadError as exc:
            raise InputFileError(self.path, exc.position, exc.reason) from None
        if stream.sha256 != self.sha256:
            raise InputFileError(
                self.path, "file", "changed while it was being read; nothing of it was kept"
            )


def flatten_text(value: Any, path: Path, where: str) -> str:
    """A message's text: a string, or a list of strings and entity objects with 'text'."""
    if isinstance(value, str):
        return checked_text(value, path, f"{where}.text")
    if not isinstance(value, list):
        raise InputFileError(
            path, f"{where}.text", f"expected a string or a list, got {describe(value)}"
        )
    parts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            parts.append(checked_text(part, path, f"{where}.text[{i}]"))
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(checked_text(part["text"], path, f"{where}.text[{i}].text"))
        else:
            raise InputFileError(
                path,
                f"{where}.text[{i}]",
                f"expected a string or an entity object with a 'text' string, got {describe(part)}",
            )
    return "".join(parts)


def _timestamp(message: dict[str, Any], key: str, path: Path, where: str) -> datetime | None:
    """`key`_unixtime (Telegram writes seconds as a string) if present, else ISO `key`."""
    unix = message.get(f"{key}_unixtime")
    if unix is not None:
        at = f"{where}.{key}_unixtime"
        valid = isinstance(unix, str) and _UNIX_TIME.fullmatch(unix)
        if not (valid or (isinstance(unix, int) and not isinstance(unix, bool))):
            raise InputFileError(
                path, at, f'expected whole unix seconds ("1756717200"), got {describe(unix)}'
            )
        try:
            return datetime.fromtimestamp(int(unix), tz=UTC)
        except (ValueError, OverflowError, OSError):
            raise InputFileError(
                path, at, f"{describe(unix)} is out of range (years 1-9999)"
            ) from None
    value = message.get(key)
    if value is None:
        return None
    return parse_iso(value, path, f"{where}.{key}")


def load_export(path: Path | str) -> ChatExport:
    """Check a Telegram Desktop `result.json` from end to end, one message at a time, and
    count its messages (service and empty ones are counted, never returned).

    Raises `InputFileError` for what a reader of the whole file would meet first: an
    invalid UTF-8 byte, then a JSON syntax error, then the top level (the 'messages' list,
    a repeated key, the chat's id and name), then the first malformed message.
    """
    path = Path(path)
    stream = StreamedObject(path, "messages", DECODER)
    header: dict[str, Any] = {}
    seen: set[str] = set()
    repeated: str | None = None
    top_level_object = messages_list = False
    counts = {_SERVICE: 0, _EMPTY: 0, "kept": 0}
    ids = array("q")
    first_error: InputFileError | None = None
    try:
        for event in stream:
            if isinstance(event, Member):
                top_level_object = event.key is not None
                if event.key in seen and repeated is None:
                    repeated = event.key
                seen.add(str(event.key))
                if event.key == "messages":
                    messages_list = event.value is STREAMED
                elif event.key in ("id", "name"):
                    header[event.key] = event.value
            elif first_error is None:  # after a bad message, only the JSON is read
                try:
                    message, message_id = _message_id(event.value, event.index, path)
                    ids.append(message_id)
                    kept = _chat_message(message, message_id, event.index, path)
                except InputFileError as exc:
                    first_error = exc
                    continue
                counts["kept" if isinstance(kept, ChatMessage) else kept] += 1
    except JsonReadError as exc:
        raise InputFileError(path, exc.position, exc.reason) from None
    if not (top_level_object and messages_list):
        raise InputFileError(path, "top level", "expected an object with a 'messages' list")
    if repeated is not None:
        raise InputFileError(path, "top level", f"the key {repeated!r} appears twice")
    if "id" not in header:
        raise InputFileError(path, "id", "missing: the chat's integer id")
    chat_id = as_id(header["id"], path, "id")
    name = optional_str(header, "name", path, "") or ""
    duplicate = _first_duplicate(ids)
    if duplicate is not None:
        at, first = duplicate
        raise InputFileError(
            path,
            f"messages[{at}] (id {ids[at]})",
            f"duplicate message id (first at messages[{first}])",
        )
    if first_error is not None:
        raise first_error
    assert stream.sha256 is not None
    return ChatExport(
        path=path,
        chat_id=chat_id,
        name=name,
        sha256=stream.sha256,
        message_count=counts["kept"],
        service_messages=counts[_SERVICE],
        empty_messages=counts[_EMPTY],
    )


def _first_duplicate(ids: array[int]) -> tuple[int, int] | None:
    """(index, index of its first occurrence) of the first id equal to an earlier one."""
    values = np.frombuffer(ids, dtype=np.int64) if len(ids) else np.empty(0, np.int64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if not repeats.size:
        return None
    at = int(order[repeats].min())
    first = int(order[np.searchsorted(ordered, values[at])])
    return at, first


def _message_id(item: Any, index: int, path: Path) -> tuple[dict[str, Any], int]:
    """`messages[index]` as an object, and its id."""
    message = as_object(item, path, f"messages[{index}]")
    if "id" not in message:
        raise InputFileError(path, f"messages[{index}]", "missing 'id'")
    return message, as_id(message["id"], path, f"messages[{index}].id")


def _chat_message(
    message: dict[str, Any], message_id: int, index: int, path: Path
) -> ChatMessage | str:
    """The message with its text, or `_SERVICE` / `_EMPTY` for one that is not kept."""
    where = f"messages[{index}] (id {message_id})"
    kind = message.get("type")
    if kind == "service":
        return _SERVICE
    if kind != "message":
        raise InputFileError(
            path,
            f"{where}.type",
            f'unknown message type {describe(kind)}; expected "message" or "service"',
        )
    sent_at = _timestamp(message, "date", path, where)
    if sent_at is None:
        raise InputFileError(path, where, "missing 'date'")
    edited_at = _timestamp(message, "edited", path, where)
    reply_to = message.get("reply_to_message_id")
    if reply_to is not None:
        reply_to = as_id(reply_to, path, f"{where}.reply_to_message_id")
    author = optional_str(message, "from", path, where)
    author_id = message.get("from_id")
    if isinstance(author_id, int) and not isinstance(author_id, bool):
        author_id = str(as_id(author_id, path, f"{where}.from_id"))
    else:
        author_id = optional_str(message, "from_id", path, where)
    text = flatten_text(message.get("text", ""), path, where).strip()
    if not text:
        return _EMPTY
    return ChatMessage(
        telegram_id=message_id,
        sent_at=sent_at,
        text=text,
        author=author,
        author_id=author_id,
        edited_at=edited_at,
        reply_to=reply_to,
    )
