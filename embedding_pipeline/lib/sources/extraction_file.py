"""Reading an extraction file: the topics and atoms an LLM step extracted from a chat.

The reader is pure: it returns an `ExtractionFile` or raises `InputFileError` naming the
file, the position and the reason (the rules are in docs/formats.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from embedding_pipeline.lib.sources.values import (
    InputFileError,
    as_id,
    as_list,
    as_object,
    first_repeat,
    optional_str,
    parse_iso,
    read_json,
    required_str,
)

ATOM_KINDS = frozenset(
    {"fact", "decision", "task", "question", "problem", "solution", "insight", "idea", "risk"}
)


#: Topic and atom keys are unique-indexed; a b-tree entry holds at most about 2.7 kB.
MAX_KEY_LENGTH = 200


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


def _key(obj: dict[str, Any], path: Path, where: str) -> str:
    key = required_str(obj, "key", path, where)
    if len(key) > MAX_KEY_LENGTH:
        raise InputFileError(
            path, f"{where}.key", f"{len(key)} characters long; a key has at most {MAX_KEY_LENGTH}"
        )
    return key


def _message_ids(obj: dict[str, Any], path: Path, where: str) -> tuple[int, ...]:
    value = obj.get("message_ids", [])
    ids = [
        as_id(v, path, f"{where}.message_ids[{i}]")
        for i, v in enumerate(as_list(value, path, f"{where}.message_ids"))
    ]
    repeat = first_repeat(ids)
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
        topic = as_object(item, path, f"topics[{i}]")
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
                name=required_str(topic, "name", path, where),
                description=optional_str(topic, "description", path, where) or None,
                message_ids=message_ids,
                position=where,
            )
        )
    return topics


def _atoms(items: list[Any], path: Path) -> list[AtomRecord]:
    atoms: list[AtomRecord] = []
    key_at: dict[str, str] = {}
    for i, item in enumerate(items):
        atom = as_object(item, path, f"atoms[{i}]")
        key = _key(atom, path, f"atoms[{i}]")
        where = f"atoms[{i}] (key {key!r})"
        if key in key_at:
            raise InputFileError(path, where, f"duplicate atom key (first at {key_at[key]})")
        key_at[key] = where
        kind = required_str(atom, "kind", path, where).lower()
        if kind not in ATOM_KINDS:
            raise InputFileError(
                path,
                f"{where}.kind",
                f"unknown kind {kind!r}; one of {', '.join(sorted(ATOM_KINDS))}",
            )
        topic_key = optional_str(atom, "topic", path, where)
        if topic_key is not None and not topic_key.strip():
            raise InputFileError(path, f"{where}.topic", "expected a topic key or null")
        atoms.append(
            AtomRecord(
                key=key,
                kind=kind,
                title=required_str(atom, "title", path, where),
                content=required_str(atom, "content", path, where),
                topic=topic_key,
                message_ids=_message_ids(atom, path, where),
                position=where,
            )
        )
    return atoms


def load_extraction(path: Path | str) -> ExtractionFile:
    """Parse an extraction file (topics and atoms referencing message ids)."""
    path = Path(path)
    data, digest = read_json(path)
    data = as_object(data, path, "top level")
    if not isinstance(data.get("extraction"), dict):
        raise InputFileError(path, "extraction", "expected an object with 'source'")
    header = as_object(data["extraction"], path, "extraction")
    extracted_at = header.get("extracted_at")
    return ExtractionFile(
        path=path,
        source=required_str(header, "source", path, "extraction"),
        extractor=optional_str(header, "extractor", path, "extraction") or None,
        extracted_at=parse_iso(extracted_at, path, "extraction.extracted_at")
        if extracted_at is not None
        else None,
        sha256=digest,
        topics=_topics(as_list(data.get("topics", []), path, "topics"), path),
        atoms=_atoms(as_list(data.get("atoms", []), path, "atoms"), path),
    )
