"""Reading a Telegram Desktop chat export (`result.json`) and an extraction file.

Both readers are pure: they return dataclasses or raise `InputFileError` naming the file,
the position (a JSON path such as ``messages[17] (id 42).text`` or a line and column) and
the reason. Everything they return can be stored as is: every id fits PostgreSQL's
`bigint`, every time lies in years 1-9999 UTC, and no text holds a NUL character or a lone
surrogate (the rules are listed in docs/formats.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ATOM_KINDS = frozenset(
    {"fact", "decision", "task", "question", "problem", "solution", "insight", "idea", "risk"}
)
#: Ids are stored as PostgreSQL `bigint`.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
#: Topic and atom keys are unique-indexed; a b-tree entry holds at most about 2.7 kB.
MAX_KEY_LENGTH = 200

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNIX_TIME = re.compile(r"-?\d+")
#: A JSON string token, for the scans that locate a problem json.loads cannot place.
_JSON_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'


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
    path: Path
    chat_id: int
    name: str
    messages: list[ChatMessage]
    sha256: str
    service_messages: int = 0
    empty_messages: int = 0


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


def _line_column(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - text.rfind("\n", 0, offset)
    return f"line {line} column {column}"


def _deepest_nesting(text: str) -> tuple[int, int]:
    """(offset, depth) of the first bracket that reaches the file's deepest nesting."""
    depth, deepest, where = 0, 0, 0
    for token in re.finditer(rf"{_JSON_STRING}|[\[{{]|[\]}}]", text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, token.start()
        elif bracket in "]}":
            depth -= 1
    return where, deepest


def _overlong_integer(text: str) -> tuple[int, int]:
    """(offset, digits) of the first integer outside strings too long for Python to read."""
    limit = sys.get_int_max_str_digits()
    pattern = rf"{_JSON_STRING}|-?(\d{{{limit + 1},}})(?![.eE\d])"
    for token in re.finditer(pattern, text):
        if token.group(1):
            return token.start(), len(token.group(1))
    return 0, 0


def _read_json(path: Path) -> tuple[Any, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, "file", f"cannot be read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise InputFileError(path, "file", "is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        valid = raw[: exc.start].decode("utf-8-sig")
        raise InputFileError(
            path,
            f"{_line_column(valid, len(valid))} (byte {exc.start})",
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            path, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}"
        ) from None
    except RecursionError:
        offset, depth = _deepest_nesting(text)
        raise InputFileError(
            path, _line_column(text, offset), f"JSON nested {depth} levels deep, too deep to read"
        ) from None
    except ValueError:
        offset, digits = _overlong_integer(text)
        raise InputFileError(
            path, _line_column(text, offset), f"a {digits}-digit number, too long to read"
        ) from None
    return data, hashlib.sha256(raw).hexdigest()


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
    """Parse a Telegram Desktop `result.json`; service and empty messages are counted, not
    returned. Raises `InputFileError` on the first malformed message."""
    path = Path(path)
    data, digest = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputFileError(path, "top level", "expected an object with a 'messages' list")
    data = _as_object(data, path, "top level")
    if "id" not in data:
        raise InputFileError(path, "id", "missing: the chat's integer id")
    export = ChatExport(
        path=path,
        chat_id=_as_id(data["id"], path, "id"),
        name=_optional_str(data, "name", path, "") or "",
        messages=[],
        sha256=digest,
    )
    first_seen: dict[int, str] = {}
    for i, item in enumerate(data["messages"]):
        message = _as_object(item, path, f"messages[{i}]")
        if "id" not in message:
            raise InputFileError(path, f"messages[{i}]", "missing 'id'")
        message_id = _as_id(message["id"], path, f"messages[{i}].id")
        where = f"messages[{i}] (id {message_id})"
        if message_id in first_seen:
            raise InputFileError(
                path, where, f"duplicate message id (first at {first_seen[message_id]})"
            )
        first_seen[message_id] = f"messages[{i}]"
        kind = message.get("type")
        if kind == "service":
            export.service_messages += 1
            continue
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
            export.empty_messages += 1
            continue
        export.messages.append(
            ChatMessage(
                telegram_id=message_id,
                sent_at=sent_at,
                text=text,
                author=author,
                author_id=author_id,
                edited_at=edited_at,
                reply_to=reply_to,
            )
        )
    return export


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
