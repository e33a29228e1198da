"""Ingest writes one extraction per load, is idempotent, applies edits, and leaves the
database untouched when a file is bad."""

import json
from pathlib import Path

import psycopg
import pytest

from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.sources.values import InputFileError
from embedding_pipeline.lib.store import db
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.paths import DATA, SAMPLE


def _counts(conn: psycopg.Connection) -> dict[str, int]:
    return {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
        for table in ("messages", "topics", "atoms", "atoms_messages", "extractions")
    }


@pytest.fixture
def loaded(schema: Settings) -> Settings:
    with db.connection(schema.effective_database_url) as conn:
        conn.execute("TRUNCATE extractions, messages, topics, atoms, atoms_messages CASCADE")
        conn.commit()
        ingest(
            conn,
            schema,
            load_export(DATA / "small_export.json"),
            load_extraction(DATA / "small_extraction.json"),
        )
    return schema


def test_ingest_links_messages_topics_and_atoms(loaded, conn):
    assert _counts(conn) == {
        "messages": 4,
        "topics": 2,
        "atoms": 3,
        "atoms_messages": 4,
        "extractions": 1,
    }
    rows = conn.execute("""
        SELECT m.telegram_message_id, t.key FROM messages m LEFT JOIN topics t
        ON t.id = m.topic_id ORDER BY 1""").fetchall()
    assert rows == [(2, "backups"), (3, "backups"), (5, "social"), (6, None)]
    links = conn.execute("""
        SELECT a.key, array_agg(m.telegram_message_id ORDER BY m.telegram_message_id)
        FROM atoms a JOIN atoms_messages l ON l.atom_id = a.id
        JOIN messages m ON m.id = l.message_id GROUP BY a.key ORDER BY a.key""").fetchall()
    assert links == [("a-1", [2]), ("a-2", [2, 3]), ("a-3", [5])]
    extraction_id = conn.execute("SELECT id FROM extractions").fetchone()[0]
    for table in ("messages", "topics", "atoms"):
        assert conn.execute(
            f"SELECT count(*) FROM {table} WHERE extraction_id IS DISTINCT FROM %s",  # noqa: S608
            (extraction_id,),
        ).fetchone() == (0,)
    stats = conn.execute("SELECT stats FROM extractions").fetchone()[0]
    assert stats["messages"]["created"] == 4


def _sequences(conn: psycopg.Connection) -> dict[str, int | None]:
    rows = conn.execute("SELECT sequencename, last_value FROM pg_sequences").fetchall()
    return dict(rows)


def test_reingesting_the_same_files_changes_nothing_and_draws_no_id(loaded, conn):
    """`INSERT ... ON CONFLICT` draws an id for every row before it finds the conflict: a
    re-ingest of a large export used to burn one id per message."""
    before, sequences = _counts(conn), _sequences(conn)
    assert {"messages_id_seq", "topics_id_seq", "atoms_id_seq", "extractions_id_seq"} <= set(
        sequences
    )
    report = ingest(
        conn,
        loaded,
        load_export(DATA / "small_export.json"),
        load_extraction(DATA / "small_extraction.json"),
    )
    assert report.extraction_id is None
    assert report.messages.unchanged == 4 and report.atoms.unchanged == 3
    assert report.topics.unchanged == 2
    assert _counts(conn) == before
    assert _sequences(conn) == sequences


def test_an_edited_message_is_updated_and_marked_with_the_new_extraction(
    loaded, conn, tmp_path: Path
):
    raw = json.loads((DATA / "small_export.json").read_text())
    edited = next(m for m in raw["messages"] if m["id"] == 2)
    edited["text"] = "The nightly backup job failed: the disk was full (fixed now)."
    edited["edited"] = "2025-09-02T10:00:00"
    edited.pop("edited_unixtime", None)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    sequences = _sequences(conn)
    report = ingest(conn, loaded, load_export(path), None)
    assert (report.messages.created, report.messages.updated) == (0, 1)
    drawn = {name: value - sequences[name] for name, value in _sequences(conn).items()}
    assert drawn == {name: 1 if name == "extractions_id_seq" else 0 for name in sequences}
    rows = conn.execute(
        "SELECT telegram_message_id, extraction_id, content, edited_at IS NOT NULL "
        "FROM messages ORDER BY telegram_message_id"
    ).fetchall()
    touched = [r for r in rows if r[1] == report.extraction_id]
    assert [(r[0], r[3]) for r in touched] == [(2, True)]
    assert touched[0][2].endswith("(fixed now).")
    assert _counts(conn)["messages"] == 4


def test_bad_extraction_rolls_back_everything(loaded, conn, tmp_path: Path):
    before = _counts(conn)
    export_raw = json.loads((DATA / "small_export.json").read_text())
    export_raw["messages"].append(
        {
            "id": 99,
            "type": "message",
            "date": "2025-10-09T10:00:00",
            "from": "Ira",
            "from_id": "user1",
            "text": "new message",
        }
    )
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export_raw))
    extraction_raw = json.loads((DATA / "small_extraction.json").read_text())
    extraction_raw["atoms"].append(
        {"key": "a-9", "kind": "fact", "title": "t", "content": "c", "message_ids": [2, 777]}
    )
    extraction_path = tmp_path / "extraction.json"
    extraction_path.write_text(json.dumps(extraction_raw))
    with pytest.raises(InputFileError) as info:
        ingest(conn, loaded, load_export(export_path), load_extraction(extraction_path))
    message = str(info.value)
    assert str(extraction_path) in message
    assert "atoms[3] (key 'a-9').message_ids" in message and "777" in message
    assert _counts(conn) == before
    assert conn.execute(
        "SELECT count(*) FROM messages WHERE telegram_message_id = 99"
    ).fetchone() == (0,)


def test_a_file_changed_after_its_check_is_refused_and_nothing_is_written(
    loaded, conn, tmp_path: Path
):
    """The messages are read from the file a second time while they are copied: a file
    that changed in between is refused by its checksum."""
    path = tmp_path / "export.json"
    raw = json.loads((DATA / "small_export.json").read_text())
    path.write_text(json.dumps(raw))
    export = load_export(path)
    raw["messages"][1]["text"] = "changed behind the check"
    path.write_text(json.dumps(raw))
    before, sequences = _counts(conn), _sequences(conn)
    with pytest.raises(InputFileError, match="file: changed while it was being read"):
        ingest(conn, loaded, export, None)
    assert (_counts(conn), _sequences(conn)) == (before, sequences)
    assert conn.execute(
        "SELECT count(*) FROM messages WHERE content LIKE 'changed%'"
    ).fetchone() == (0,)


def test_unknown_topic_key_names_the_atom(loaded, conn, tmp_path: Path):
    raw = json.loads((DATA / "small_extraction.json").read_text())
    raw["atoms"][0]["topic"] = "no-such-topic"
    path = tmp_path / "extraction.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputFileError, match=r"atoms\[0\] \(key 'a-1'\)\.topic.*no-such-topic"):
        ingest(conn, loaded, load_export(DATA / "small_export.json"), load_extraction(path))


def test_sample_data_and_its_update_ingest_cleanly(schema, conn):
    conn.execute("TRUNCATE extractions, messages, topics, atoms, atoms_messages CASCADE")
    conn.commit()
    first = ingest(
        conn,
        schema,
        load_export(SAMPLE / "result.json"),
        load_extraction(SAMPLE / "extraction.json"),
    )
    assert first.messages.created > 200 and first.topics.created >= 7
    assert first.atoms.created >= 70
    update = ingest(
        conn,
        schema,
        load_export(SAMPLE / "update_result.json"),
        load_extraction(SAMPLE / "update_extraction.json"),
    )
    assert update.messages.created == 25
    assert update.messages.updated == 3
    assert update.atoms.updated == 1 and update.atoms.created > 5
    touched = conn.execute(
        "SELECT count(*) FROM messages WHERE extraction_id = %s", (update.extraction_id,)
    ).fetchone()
    assert touched == (28,)


def test_a_new_link_or_topic_assignment_alone_is_kept(loaded, conn, tmp_path: Path):
    raw = json.loads((DATA / "small_extraction.json").read_text())
    raw["atoms"][0]["message_ids"] = [2, 3]
    raw["topics"][1]["message_ids"] = [5, 6]
    path = tmp_path / "extraction.json"
    path.write_text(json.dumps(raw))
    report = ingest(conn, loaded, load_export(DATA / "small_export.json"), load_extraction(path))
    assert report.extraction_id is not None
    assert (report.links, report.topic_assignments) == (1, 1)
    assert report.atoms.unchanged == 3 and report.messages.unchanged == 4
    links = conn.execute(
        "SELECT m.telegram_message_id FROM atoms_messages l JOIN atoms a ON a.id = l.atom_id "
        "JOIN messages m ON m.id = l.message_id WHERE a.key = 'a-1' ORDER BY 1"
    ).fetchall()
    assert links == [(2,), (3,)]
    topic = conn.execute(
        "SELECT t.key FROM messages m JOIN topics t ON t.id = m.topic_id "
        "WHERE m.telegram_message_id = 6"
    ).fetchone()
    assert topic == ("social",)
    embedded_text_rows = conn.execute(
        "SELECT (SELECT count(*) FROM messages WHERE extraction_id = %(e)s) + "
        "(SELECT count(*) FROM atoms WHERE extraction_id = %(e)s)",
        {"e": report.extraction_id},
    ).fetchone()
    assert embedded_text_rows == (0,)
