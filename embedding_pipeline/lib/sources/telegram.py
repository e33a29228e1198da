"""Reading a Telegram Desktop chat export (`result.json`) and an extraction file.

Both readers are pure: they return dataclasses or raise `InputFileError` naming the file,
the position (a JSON path such as ``messages[17] (id 42).text`` or a line and column) and
the reason. Everything they return can be stored as is: every id fits PostgreSQL's
`bigint`, every time lies in years 1-9999 UTC, and no text holds a NUL character or a lone
surrogate (the rules are listed in docs/formats.md).
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
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

ATOM_KINDS = frozenset(
    {"fact", "decision", "task", "question", "problem", "solution", "insight", "idea", "risk"}
)
#: What `_chat_message` returns for a message that is counted, not kept.
_SERVICE, _EMPTY = "service", "empty"
#: Ids are stored as PostgreSQL `bigint`.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
#: Topic and atom keys are unique-indexed; a b-tree entry holds at most about 2.7 kB.
MAX_KEY_LENGTH = 200

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNIX_TIME = re.compile(r"-?\d+")


class InputFileError(ValueError):
    """An input file is malformed; nothing from it was written."""

    def __init__(self, path: Path | str, position: str, reason: str) -> None:
        self.path = str(path)
        self.position = position
        self.reason = reason
        super().__init__(f"{path}: {position}: {reason}")


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
        stream = StreamedObject(self.path, "messages", _DECODER)
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


@dataclass(frozen=True)
class TopicRecord:
    key: str
    name: str
    description: str | None
    message_ids: tuple[int, ...]
    position: str


@dataclass(frozen=True)
class AtomRecord:
    key: str
    kind: str
    title: str
    content: str
    topic: str | None
    message_ids: tuple[int, ...]
    position: str


@dataclass
class ExtractionFile:
    path: Path
    source: str
    extractor: str | None
    extracted_at: datetime | None
    sha256: str
    topics: list[TopicRecord] = field(default_factory=list)
    atoms: list[AtomRecord] = field(default_factory=list)


class _RepeatedKeys(dict[str, Any]):
    """A JSON object in which a key appeared more than once (JSON readers keep the last)."""

    repeated_key = ""


def _first_repeat(items: list[Any]) -> int | None:
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
    marked.repeated_key = keys[_first_repeat(keys) or 0]
    return marked


#: Objects with a repeated key are marked (json keeps the last value silently).
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def _read_json(path: Path) -> tuple[Any, str]:
    """The whole JSON value of `path` and the file's SHA-256, read in chunks (the
    extraction file: its topics and atoms are all needed at once)."""
    stream = StreamedObject(path, None, _DECODER)
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


def _describe(value: Any) -> str:
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


def _as_object(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputFileError(path, where, f"expected an object, got {_describe(value)}")
    if isinstance(value, _RepeatedKeys):
        raise InputFileError(path, where, f"the key {value.repeated_key!r} appears twice")
    return value


def _as_list(value: Any, path: Path, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InputFileError(path, where, f"expected a list, got {_describe(value)}")
    return value


def _as_id(value: Any, path: Path, where: str) -> int:
    """An integer id that PostgreSQL's bigint holds (JSON true is not 1)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputFileError(path, where, f"expected an integer id, got {_describe(value)}")
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise InputFileError(
            path, where, f"{_describe(value)} is out of range: ids must fit a 64-bit integer"
        )
    return value


def _checked_text(value: str, path: Path, where: str) -> str:
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


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _optional_str(obj: dict[str, Any], key: str, path: Path, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputFileError(
            path, _field(where, key), f"expected a string or null, got {_describe(value)}"
        )
    return _checked_text(value, path, _field(where, key))


def _required_str(obj: dict[str, Any], key: str, path: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "" if isinstance(value, str) else f", got {_describe(value)}"
        raise InputFileError(path, _field(where, key), f"expected a non-empty string{got}")
    return _checked_text(value, path, _field(where, key)).strip()


def _key(obj: dict[str, Any], path: Path, where: str) -> str:
    key = _required_str(obj, "key", path, where)
    if len(key) > MAX_KEY_LENGTH:
        raise InputFileError(
            path, f"{where}.key", f"{len(key)} characters long; a key has at most {MAX_KEY_LENGTH}"
        )
    return key


def flatten_text(value: Any, path: Path, where: str) -> str:
    """A message's text: a string, or a list of strings and entity objects with 'text'."""
    if isinstance(value, str):
        return _checked_text(value, path, f"{where}.text")
    if not isinstance(value, list):
        raise InputFileError(
            path, f"{where}.text", f"expected a string or a list, got {_describe(value)}"
        )
    parts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            parts.append(_checked_text(part, path, f"{where}.text[{i}]"))
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(_checked_text(part["text"], path, f"{where}.text[{i}].text"))
        else:
            raise InputFileError(
                path,
                f"{where}.text[{i}]",
                f"expected a string or an entity object with a 'text' string, got "
                f"{_describe(part)}",
            )
    return "".join(parts)


def _in_range(moment: datetime, path: Path, where: str, raw: Any) -> datetime:
    """`moment` in UTC; refused when UTC takes it outside years 1-9999."""
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise InputFileError(
            path, where, f"{_describe(raw)} is out of range (years 1-9999 in UTC)"
        ) from None


def _timestamp(message: dict[str, Any], key: str, path: Path, where: str) -> datetime | None:
    """`key`_unixtime (Telegram writes seconds as a string) if present, else ISO `key`."""
    unix = message.get(f"{key}_unixtime")
    if unix is not None:
        at = f"{where}.{key}_unixtime"
        valid = isinstance(unix, str) and _UNIX_TIME.fullmatch(unix)
        if not (valid or (isinstance(unix, int) and not isinstance(unix, bool))):
            raise InputFileError(
                path, at, f'expected whole unix seconds ("1756717200"), got {_describe(unix)}'
            )
        try:
            return datetime.fromtimestamp(int(unix), tz=UTC)
        except (ValueError, OverflowError, OSError):
            raise InputFileError(
                path, at, f"{_describe(unix)} is out of range (years 1-9999)"
            ) from None
    value = message.get(key)
    if value is None:
        return None
    return _parse_iso(value, path, f"{where}.{key}")


def _parse_iso(value: Any, path: Path, where: str) -> datetime:
    if not isinstance(value, str):
        raise InputFileError(path, where, f"expected an ISO date string, got {_describe(value)}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputFileError(path, where, f"not an ISO date: {_describe(value)}") from None
    return _in_range(parsed, path, where, value)


def load_export(path: Path | str) -> ChatExport:
    """Check a Telegram Desktop `result.json` from end to end, one message at a time, and
    count its messages (service and empty ones are counted, never returned).

    Raises `InputFileError` for what a reader of the whole file would meet first: an
    invalid UTF-8 byte, then a JSON syntax error, then the top level (the 'messages' list,
    a repeated key, the chat's id and name), then the first malformed message.
    """
    path = Path(path)
    stream = StreamedObject(path, "messages", _DECODER)
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
    chat_id = _as_id(header["id"], path, "id")
    name = _optional_str(header, "name", path, "") or ""
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
    message = _as_object(item, path, f"messages[{index}]")
    if "id" not in message:
        raise InputFileError(path, f"messages[{index}]", "missing 'id'")
    return message, _as_id(message["id"], path, f"messages[{index}].id")


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
            f'unknown message type {_describe(kind)}; expected "message" or "service"',
        )
    sent_at = _timestamp(message, "date", path, where)
    if sent_at is None:
        raise InputFileError(path, where, "missing 'date'")
    edited_at = _timestamp(message, "edited", path, where)
    reply_to = message.get("reply_to_message_id")
    if reply_to is not None:
        reply_to = _as_id(reply_to, path, f"{where}.reply_to_message_id")
    author = _optional_str(message, "from", path, where)
    author_id = message.get("from_id")
    if isinstance(author_id, int) and not isinstance(author_id, bool):
        author_id = str(_as_id(author_id, path, f"{where}.from_id"))
    else:
        author_id = _optional_str(message, "from_id", path, where)
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


def _message_ids(obj: dict[str, Any], path: Path, where: str) -> tuple[int, ...]:
    value = obj.get("message_ids", [])
    ids = [
        _as_id(v, path, f"{where}.message_ids[{i}]")
        for i, v in enumerate(_as_list(value, path, f"{where}.message_ids"))
    ]
    repeat = _first_repeat(ids)
    if repeat is not None:
        raise InputFileError(
            path, f"{where}.message_ids[{repeat}]", f"message id {ids[repeat]} is listed twice"
        )
    return tuple(ids)


def _topics(items: list[Any], path: Path) -> list[TopicRecord]:
    topics: list[TopicRecord] = []
    key_at: dict[str, str] = {}
    topic_of_message: dict[int, str] = {}
    for i, item in enumerate(items):
        topic = _as_object(item, path, f"topics[{i}]")
        key = _key(topic, path, f"topics[{i}]")
        where = f"topics[{i}] (key {key!r})"
        if key in key_at:
            raise InputFileError(path, where, f"duplicate topic key (first at {key_at[key]})")
        key_at[key] = where
        message_ids = _message_ids(topic, path, where)
        for j, message_id in enumerate(message_ids):
            if message_id in topic_of_message:
                raise InputFileError(
                    path,
                    f"{where}.message_ids[{j}]",
                    f"message {message_id} is already in {topic_of_message[message_id]}; "
                    "a message belongs to one topic",
                )
            topic_of_message[message_id] = where
        topics.append(
            TopicRecord(
                key=key,
                name=_required_str(topic, "name", path, where),
                description=_optional_str(topic, "description", path, where) or None,
                message_ids=message_ids,
                position=where,
            )
        )
    return topics


def _atoms(items: list[Any], path: Path) -> list[AtomRecord]:
    atoms: list[AtomRecord] = []
    key_at: dict[str, str] = {}
    for i, item in enumerate(items):
        atom = _as_object(item, path, f"atoms[{i}]")
        key = _key(atom, path, f"atoms[{i}]")
        where = f"atoms[{i}] (key {key!r})"
        if key in key_at:
            raise InputFileError(path, where, f"duplicate atom key (first at {key_at[key]})")
        key_at[key] = where
        kind = _required_str(atom, "kind", path, where).lower()
        if kind not in ATOM_KINDS:
            raise InputFileError(
                path,
                f"{where}.kind",
                f"unknown kind {kind!r}; one of {', '.join(sorted(ATOM_KINDS))}",
            )
        topic_key = _optional_str(atom, "topic", path, where)
        if topic_key is not None and not topic_key.strip():
            raise InputFileError(path, f"{where}.topic", "expected a topic key or null")
        atoms.append(
            AtomRecord(
                key=key,
                kind=kind,
                title=_required_str(atom, "title", path, where),
                content=_required_str(atom, "content", path, where),
                topic=topic_key,
                message_ids=_message_ids(atom, path, where),
                position=where,
            )
        )
    return atoms


def load_extraction(path: Path | str) -> ExtractionFile:
    """Parse an extraction file (topics and atoms referencing message ids)."""
    path = Path(path)
    data, digest = _read_json(path)
    data = _as_object(data, path, "top level")
    if not isinstance(data.get("extraction"), dict):
        raise InputFileError(path, "extraction", "expected an object with 'source'")
    header = _as_object(data["extraction"], path, "extraction")
    extracted_at = header.get("extracted_at")
    return ExtractionFile(
        path=path,
        source=_required_str(header, "source", path, "extraction"),
        extractor=_optional_str(header, "extractor", path, "extraction") or None,
        extracted_at=_parse_iso(extracted_at, path, "extraction.extracted_at")
        if extracted_at is not None
        else None,
        sha256=digest,
        topics=_topics(_as_list(data.get("topics", []), path, "topics"), path),
        atoms=_atoms(_as_list(data.get("atoms", []), path, "atoms"), path),
    )
