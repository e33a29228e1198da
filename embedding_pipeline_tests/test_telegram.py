"""Reading Telegram Desktop exports and extraction files, and their error messages."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from embedding_pipeline.lib.telegram import InputFileError, load_export, load_extraction

from .conftest import DATA, SAMPLE


def test_small_export_flattens_text_and_skips_service_and_empty():
    export = load_export(DATA / "small_export.json")
    assert export.chat_id == 4242
    assert [m.telegram_id for m in export.messages] == [2, 3, 5, 6]
    assert export.service_messages == 1
    assert export.empty_messages == 1
    by_id = {m.telegram_id: m for m in export.messages}
    assert by_id[3].text == "I cleaned /var/backups and raised the volume to 200 GB."
    assert by_id[3].reply_to == 2
    assert by_id[6].text == "https://status.example.com/incidents/42"
    assert by_id[2].sent_at == datetime(2025, 9, 1, 9, 0, tzinfo=UTC)
    assert by_id[5].edited_at == datetime(2025, 10, 2, 14, 35, tzinfo=UTC)
    assert by_id[2].edited_at is None
    assert by_id[2].author == "Ira" and by_id[2].author_id == "user1"


def test_sample_export_text_entities_agree_with_text():
    raw = json.loads((SAMPLE / "result.json").read_text())
    export = load_export(SAMPLE / "result.json")
    kept = {m.telegram_id: m.text for m in export.messages}
    for message in raw["messages"]:
        if message["id"] in kept:
            entities = "".join(e["text"] for e in message["text_entities"])
            assert entities.strip() == kept[message["id"]]
    assert export.service_messages > 0
    assert len(export.messages) >= 200


def _write(tmp_path: Path, payload: object, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _message(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": 1,
        "type": "message",
        "date": "2025-09-01T10:00:00",
        "from": "A",
        "from_id": "user1",
        "text": "hi",
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("payload", "position", "reason"),
    [
        ('{"messages": [', "line 1 column", "invalid JSON"),
        ({"id": 1}, "top level", "'messages' list"),
        ({"id": "x", "messages": []}, "id", "integer id"),
        ({"id": 1, "messages": [_message(id="7")]}, "messages[0]", "non-integer 'id'"),
        ({"id": 1, "messages": [_message(), _message()]}, "messages[1] (id 1)", "duplicate"),
        ({"id": 1, "messages": [_message(type="poll")]}, "messages[0] (id 1)", "unknown message"),
        ({"id": 1, "messages": [_message(date=None)]}, "messages[0] (id 1)", "missing 'date'"),
        ({"id": 1, "messages": [_message(date="yesterday")]}, "(id 1).date", "not an ISO date"),
        ({"id": 1, "messages": [_message(text=[{"type": "bold"}])]}, "(id 1).text[0]", "entity"),
        ({"id": 1, "messages": [_message(text=42)]}, "(id 1).text", "string or a list"),
        (
            {"id": 1, "messages": [_message(reply_to_message_id="2")]},
            "reply_to_message_id",
            "integer",
        ),
    ],
)
def test_malformed_export_names_file_position_and_reason(tmp_path, payload, position, reason):
    path = _write(tmp_path, payload)
    with pytest.raises(InputFileError) as info:
        load_export(path)
    message = str(info.value)
    assert str(path) in message
    assert position in message
    assert reason in message


def test_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError, match="cannot be read"):
        load_export(tmp_path / "missing.json")


def test_extraction_file_parses_topics_and_atoms():
    extraction = load_extraction(DATA / "small_extraction.json")
    assert extraction.source == "test-run-1"
    assert [t.key for t in extraction.topics] == ["backups", "social"]
    assert extraction.topics[1].description is None
    assert [(a.key, a.kind, a.topic, a.message_ids) for a in extraction.atoms][:2] == [
        ("a-1", "problem", "backups", (2,)),
        ("a-2", "solution", "backups", (2, 3)),
    ]


@pytest.mark.parametrize(
    ("payload", "position", "reason"),
    [
        ({"topics": []}, "extraction", "'source'"),
        ({"extraction": {"source": ""}}, "extraction.source", "non-empty string"),
        (
            {"extraction": {"source": "s"}, "topics": [{"key": "t"}]},
            "topics[0] (key 't').name",
            "non-empty",
        ),
        (
            {"extraction": {"source": "s"}, "topics": [{"key": "t", "name": "n"}] * 2},
            "topics[1] (key 't')",
            "duplicate topic key",
        ),
        (
            {
                "extraction": {"source": "s"},
                "atoms": [{"key": "a", "kind": "rumour", "title": "t", "content": "c"}],
            },
            "atoms[0] (key 'a').kind",
            "unknown kind",
        ),
        (
            {
                "extraction": {"source": "s"},
                "atoms": [
                    {"key": "a", "kind": "fact", "title": "t", "content": "c", "message_ids": ["1"]}
                ],
            },
            "atoms[0] (key 'a').message_ids",
            "integer ids",
        ),
    ],
)
def test_malformed_extraction_names_position(tmp_path, payload, position, reason):
    path = _write(tmp_path, payload)
    with pytest.raises(InputFileError) as info:
        load_extraction(path)
    assert position in str(info.value) and reason in str(info.value)
    assert str(path) in str(info.value)
