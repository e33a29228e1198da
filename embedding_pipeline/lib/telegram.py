"""Reading a Telegram Desktop chat export (`result.json`) and an extraction file.

Both readers are pure: they return dataclasses or raise `InputFileError` naming the file,
the position (a JSON path such as ``messages[17]`` or a line and column) and the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ATOM_KINDS = frozenset(
    {"fact", "decision", "task", "question", "problem", "solution", "insight", "idea", "risk"}
)


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


def _read_json(path: Path) -> tuple[Any, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, "file", f"cannot be read ({exc.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"byte {exc.start}", "is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(
            path, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}"
        ) from None


def flatten_text(value: Any, path: Path, where: str) -> str:
    """A message's text: a string, or a list of strings and entity objects with 'text'."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise InputFileError(
                    path,
                    f"{where}.text[{i}]",
                    "expected a string or an entity object with a 'text' string",
                )
        return "".join(parts)
    raise InputFileError(path, f"{where}.text", "expected a string or a list")


def _timestamp(message: dict[str, Any], key: str, path: Path, where: str) -> datetime | None:
    unix = message.get(f"{key}_unixtime")
    if unix is not None:
        try:
            return datetime.fromtimestamp(int(unix), tz=UTC)
        except (TypeError, ValueError, OverflowError):
            raise InputFileError(
                path, f"{where}.{key}_unixtime", f"not a unix timestamp: {unix!r}"
            ) from None
    value = message.get(key)
    if value is None:
        return None
    return _parse_iso(value, path, f"{where}.{key}")


def _parse_iso(value: Any, path: Path, where: str) -> datetime:
    if not isinstance(value, str):
        raise InputFileError(path, where, f"expected an ISO date string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputFileError(path, where, f"not an ISO date: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_export(path: Path | str) -> ChatExport:
    """Parse a Telegram Desktop `result.json`; service and empty messages are counted, not
    returned. Raises `InputFileError` on the first malformed message."""
    path = Path(path)
    data, digest = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputFileError(path, "top level", "expected an object with a 'messages' list")
    chat_id = data.get("id")
    if not isinstance(chat_id, int):
        raise InputFileError(path, "id", "expected the chat's integer id")
    export = ChatExport(
        path=path, chat_id=chat_id, name=str(data.get("name") or ""), messages=[], sha256=digest
    )
    seen: set[int] = set()
    for i, message in enumerate(data["messages"]):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputFileError(path, where, "expected an object")
        message_id = message.get("id")
        if not isinstance(message_id, int) or isinstance(message_id, bool):
            raise InputFileError(path, where, "missing or non-integer 'id'")
        where = f"messages[{i}] (id {message_id})"
        if message_id in seen:
            raise InputFileError(path, where, "duplicate message id")
        seen.add(message_id)
        kind = message.get("type")
        if kind == "service":
            export.service_messages += 1
            continue
        if kind != "message":
            raise InputFileError(path, where, f"unknown message type {kind!r}")
        sent_at = _timestamp(message, "date", path, where)
        if sent_at is None:
            raise InputFileError(path, where, "missing 'date'")
        text = flatten_text(message.get("text", ""), path, where).strip()
        if not text:
            export.empty_messages += 1
            continue
        reply_to = message.get("reply_to_message_id")
        if reply_to is not None and not isinstance(reply_to, int):
            raise InputFileError(path, f"{where}.reply_to_message_id", "expected an integer")
        author = message.get("from")
        author_id = message.get("from_id")
        export.messages.append(
            ChatMessage(
                telegram_id=message_id,
                sent_at=sent_at,
                text=text,
                author=str(author) if author is not None else None,
                author_id=str(author_id) if author_id is not None else None,
                edited_at=_timestamp(message, "edited", path, where),
                reply_to=reply_to,
            )
        )
    return export


def _required_str(obj: dict[str, Any], key: str, path: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputFileError(path, f"{where}.{key}", "expected a non-empty string")
    return value.strip()


def _message_ids(obj: dict[str, Any], path: Path, where: str) -> tuple[int, ...]:
    value = obj.get("message_ids", [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InputFileError(path, f"{where}.message_ids", "expected a list of integer ids")
    return tuple(value)


def load_extraction(path: Path | str) -> ExtractionFile:
    """Parse an extraction file (topics and atoms referencing message ids)."""
    path = Path(path)
    data, digest = _read_json(path)
    if not isinstance(data, dict):
        raise InputFileError(path, "top level", "expected an object")
    header = data.get("extraction")
    if not isinstance(header, dict):
        raise InputFileError(path, "extraction", "expected an object with 'source'")
    extracted_at = header.get("extracted_at")
    result = ExtractionFile(
        path=path,
        source=_required_str(header, "source", path, "extraction"),
        extractor=str(header["extractor"]) if header.get("extractor") else None,
        extracted_at=_parse_iso(extracted_at, path, "extraction.extracted_at")
        if extracted_at is not None
        else None,
        sha256=digest,
    )
    topics, atoms = data.get("topics", []), data.get("atoms", [])
    if not isinstance(topics, list):
        raise InputFileError(path, "topics", "expected a list")
    if not isinstance(atoms, list):
        raise InputFileError(path, "atoms", "expected a list")
    keys: set[str] = set()
    for i, topic in enumerate(topics):
        where = f"topics[{i}]"
        if not isinstance(topic, dict):
            raise InputFileError(path, where, "expected an object")
        key = _required_str(topic, "key", path, where)
        where = f"topics[{i}] (key {key!r})"
        if key in keys:
            raise InputFileError(path, where, "duplicate topic key")
        keys.add(key)
        description = topic.get("description")
        result.topics.append(
            TopicRecord(
                key=key,
                name=_required_str(topic, "name", path, where),
                description=str(description) if description else None,
                message_ids=_message_ids(topic, path, where),
                position=where,
            )
        )
    atom_keys: set[str] = set()
    for i, atom in enumerate(atoms):
        where = f"atoms[{i}]"
        if not isinstance(atom, dict):
            raise InputFileError(path, where, "expected an object")
        key = _required_str(atom, "key", path, where)
        where = f"atoms[{i}] (key {key!r})"
        if key in atom_keys:
            raise InputFileError(path, where, "duplicate atom key")
        atom_keys.add(key)
        kind = _required_str(atom, "kind", path, where).lower()
        if kind not in ATOM_KINDS:
            raise InputFileError(
                path,
                f"{where}.kind",
                f"unknown kind {kind!r}; one of {', '.join(sorted(ATOM_KINDS))}",
            )
        topic_key = atom.get("topic")
        if topic_key is not None and not isinstance(topic_key, str):
            raise InputFileError(path, f"{where}.topic", "expected a topic key string")
        result.atoms.append(
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
    return result
