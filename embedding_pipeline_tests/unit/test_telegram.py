"""Reading Telegram Desktop exports and extraction files (their error messages are in
test_bad_input.py, through the CLI)."""

import json
from datetime import UTC, datetime

from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline_tests.support.paths import DATA, SAMPLE


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
    assert export.message_count == len(kept) >= 200


def test_extraction_file_parses_topics_and_atoms():
    extraction = load_extraction(DATA / "small_extraction.json")
    assert extraction.source == "test-run-1"
    assert [t.key for t in extraction.topics] == ["backups", "social"]
    assert extraction.topics[1].description is None
    assert [(a.key, a.kind, a.topic, a.message_ids) for a in extraction.atoms][:2] == [
        ("a-1", "problem", "backups", (2,)),
        ("a-2", "solution", "backups", (2, 3)),
    ]
