"""Loading an export and its extraction into the database as one new extraction.

This is what the application does when its LLM step finishes: upsert messages, topics and
atoms, link them, and record an `extractions` row. Rows whose embedded text is new or
changed carry the new extraction's id, which is how sensors find work. Everything happens
in one transaction, and references to messages and topics are checked before the first
write: a bad file leaves the database as it was, its id sequences included.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from embedding_pipeline.lib.sources.telegram import (
    AtomRecord,
    ChatExport,
    ExtractionFile,
    InputFileError,
    TopicRecord,
)
from embedding_pipeline.lib.store.domain import StoreSettings


@dataclass
class EntityCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class IngestReport:
    extraction_id: int | None
    messages: EntityCounts = field(default_factory=EntityCounts)
    topics: EntityCounts = field(default_factory=EntityCounts)
    atoms: EntityCounts = field(default_factory=EntityCounts)
    links: int = 0
    links_removed: int = 0
    topic_assignments: int = 0
    service_messages_skipped: int = 0
    empty_messages_skipped: int = 0

    @property
    def changed(self) -> bool:
        """Anything written: rows, a message's topic, an atom's source links."""
        rows = any(c.created or c.updated for c in (self.messages, self.topics, self.atoms))
        return rows or bool(self.links or self.links_removed or self.topic_assignments)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def ingest(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction: ExtractionFile | None = None,
) -> IngestReport:
    """Write `export` (and `extraction`) as one extraction; commits, or rolls back on error.

    When nothing is new or changed, no extraction row is kept and `extraction_id` is None.
    """
    report = IngestReport(
        extraction_id=None,
        service_messages_skipped=export.service_messages,
        empty_messages_skipped=export.empty_messages,
    )
    try:
        with conn.transaction():
            if extraction is not None:
                _check_references(conn, settings, export, extraction)
            extraction_id = _insert_extraction(conn, settings, export, extraction)
            message_ids = _upsert_messages(conn, settings, export, extraction_id, report)
            if extraction is not None:
                topic_ids = _upsert_topics(conn, settings, extraction, extraction_id, report)
                report.topic_assignments = _assign_topics(
                    conn, settings, extraction, message_ids, topic_ids
                )
                _upsert_atoms(
                    conn, settings, extraction, extraction_id, message_ids, topic_ids, report
                )
            if report.changed:
                report.extraction_id = extraction_id
                conn.execute(
                    sql.SQL("UPDATE {} SET stats = %s WHERE id = %s").format(
                        sql.Identifier(settings.extraction_table)
                    ),
                    (json.dumps(report.as_dict()), extraction_id),
                )
            else:
                raise _NothingChanged
    except _NothingChanged:
        pass
    conn.commit()
    return report


class _NothingChanged(Exception):
    """Rolls the transaction back when an ingest brought nothing new."""


def _check_references(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction: ExtractionFile,
) -> None:
    """Refuse, before anything is written, an extraction naming a message or a topic that
    is neither in these files nor in the database."""
    records: list[TopicRecord | AtomRecord] = [*extraction.topics, *extraction.atoms]
    known = {m.telegram_id for m in export.messages}
    wanted = {t for record in records for t in record.message_ids} - known
    if wanted:
        rows = conn.execute(
            sql.SQL(
                "SELECT telegram_message_id FROM {} WHERE chat_id = %s "
                "AND telegram_message_id = ANY(%s)"
            ).format(sql.Identifier(settings.tables["messages"].table)),
            (export.chat_id, sorted(wanted)),
        ).fetchall()
        known.update(int(telegram_id) for (telegram_id,) in rows)
    for record in records:
        for i, telegram_id in enumerate(record.message_ids):
            if telegram_id not in known:
                raise InputFileError(
                    extraction.path,
                    f"{record.position}.message_ids[{i}]",
                    f"message {telegram_id} is not in the export or the database "
                    "(service messages and messages without text are not stored)",
                )
    topic_keys = {t.key for t in extraction.topics}
    unknown = {a.topic for a in extraction.atoms if a.topic and a.topic not in topic_keys}
    if unknown:
        rows = conn.execute(
            sql.SQL("SELECT key FROM {} WHERE key = ANY(%s)").format(
                sql.Identifier(settings.tables["topics"].table)
            ),
            (sorted(unknown),),
        ).fetchall()
        unknown -= {str(key) for (key,) in rows}
    for atom in extraction.atoms:
        if atom.topic in unknown:
            raise InputFileError(
                extraction.path,
                f"{atom.position}.topic",
                f"unknown topic key {atom.topic!r}: not in this file or the database",
            )


def _insert_extraction(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction: ExtractionFile | None,
) -> int:
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {} (source, extractor, export_sha256, extraction_sha256, created_at) "
            "VALUES (%s, %s, %s, %s, coalesce(%s, now())) RETURNING id"
        ).format(sql.Identifier(settings.extraction_table)),
        (
            extraction.source if extraction else f"telegram-export:{export.name}",
            extraction.extractor if extraction else None,
            export.sha256,
            extraction.sha256 if extraction else None,
            extraction.extracted_at if extraction else None,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _upsert_messages(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction_id: int,
    report: IngestReport,
) -> dict[int, int]:
    """Upsert by (chat, telegram id); returns telegram id -> row id for the whole chat."""
    spec = settings.tables["messages"]
    table = sql.Identifier(spec.table)
    conn.execute(
        "CREATE TEMP TABLE ep_ingest_messages (telegram_message_id bigint, author text, "
        "author_id text, sent_at timestamptz, edited_at timestamptz, "
        "reply_to_message_id bigint, content text) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY ep_ingest_messages FROM STDIN") as copy:
        for m in export.messages:
            copy.write_row(
                (m.telegram_id, m.author, m.author_id, m.sent_at, m.edited_at, m.reply_to, m.text)
            )
    rows = conn.execute(
        sql.SQL("""
            INSERT INTO {table} AS t (chat_id, telegram_message_id, author, author_id, sent_at,
                                      edited_at, reply_to_message_id, content, {extraction})
            SELECT %(chat)s, telegram_message_id, author, author_id, sent_at, edited_at,
                   reply_to_message_id, content, %(extraction_id)s
            FROM ep_ingest_messages
            ON CONFLICT (chat_id, telegram_message_id) DO UPDATE
               SET content = excluded.content, edited_at = excluded.edited_at,
                   author = excluded.author, author_id = excluded.author_id,
                   {extraction} = excluded.{extraction}, updated_at = now()
               WHERE t.content IS DISTINCT FROM excluded.content
            RETURNING (xmax = 0) AS inserted
        """).format(table=table, extraction=sql.Identifier(spec.extraction_column)),
        {"chat": export.chat_id, "extraction_id": extraction_id},
    ).fetchall()
    report.messages.created = sum(1 for (inserted,) in rows if inserted)
    report.messages.updated = len(rows) - report.messages.created
    report.messages.unchanged = len(export.messages) - len(rows)
    ids = conn.execute(
        sql.SQL("SELECT telegram_message_id, {} FROM {} WHERE chat_id = %s").format(
            sql.Identifier(spec.id_column), table
        ),
        (export.chat_id,),
    ).fetchall()
    return {int(tid): int(rid) for tid, rid in ids}


def _upsert_topics(
    conn: psycopg.Connection,
    settings: StoreSettings,
    extraction: ExtractionFile,
    extraction_id: int,
    report: IngestReport,
) -> dict[str, int]:
    spec = settings.tables["topics"]
    statement = sql.SQL("""
        INSERT INTO {table} AS t (key, name, description, {extraction}, created_at)
        VALUES (%s, %s, %s, %s, coalesce(%s, now()))
        ON CONFLICT (key) DO UPDATE
           SET name = excluded.name, description = excluded.description,
               {extraction} = excluded.{extraction}, updated_at = now()
           WHERE (t.name, t.description) IS DISTINCT FROM (excluded.name, excluded.description)
        RETURNING (xmax = 0)
    """).format(table=sql.Identifier(spec.table), extraction=sql.Identifier(spec.extraction_column))
    for topic in extraction.topics:
        row = conn.execute(
            statement,
            (topic.key, topic.name, topic.description, extraction_id, extraction.extracted_at),
        ).fetchone()
        if row is None:
            report.topics.unchanged += 1
        elif row[0]:
            report.topics.created += 1
        else:
            report.topics.updated += 1
    rows = conn.execute(
        sql.SQL("SELECT key, {} FROM {}").format(
            sql.Identifier(spec.id_column), sql.Identifier(spec.table)
        )
    ).fetchall()
    return {str(key): int(row_id) for key, row_id in rows}


def _assign_topics(
    conn: psycopg.Connection,
    settings: StoreSettings,
    extraction: ExtractionFile,
    message_ids: dict[int, int],
    topic_ids: dict[str, int],
) -> int:
    """Set each listed message's topic; returns how many messages changed topic."""
    spec = settings.tables["messages"]
    statement = sql.SQL(
        "UPDATE {} SET topic_id = %s WHERE {} = ANY(%s) AND topic_id IS DISTINCT FROM %s"
    ).format(sql.Identifier(spec.table), sql.Identifier(spec.id_column))
    changed = 0
    for topic in extraction.topics:
        rows = [message_ids[t] for t in topic.message_ids]
        if rows:
            topic_id = topic_ids[topic.key]
            changed += max(conn.execute(statement, (topic_id, rows, topic_id)).rowcount, 0)
    return changed


def _upsert_atoms(
    conn: psycopg.Connection,
    settings: StoreSettings,
    extraction: ExtractionFile,
    extraction_id: int,
    message_ids: dict[int, int],
    topic_ids: dict[str, int],
    report: IngestReport,
) -> None:
    spec = settings.tables["atoms"]
    links = sql.Identifier(f"{spec.table}_messages")
    statement = sql.SQL("""
        INSERT INTO {table} AS t (key, kind, title, content, topic_id, {extraction}, created_at)
        VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s, now()))
        ON CONFLICT (key) DO UPDATE
           SET kind = excluded.kind, title = excluded.title, content = excluded.content,
               topic_id = excluded.topic_id, updated_at = now(),
               {extraction} = CASE
                   WHEN (t.title, t.content) IS DISTINCT FROM (excluded.title, excluded.content)
                   THEN excluded.{extraction} ELSE t.{extraction} END
           WHERE (t.kind, t.title, t.content, t.topic_id)
                 IS DISTINCT FROM (excluded.kind, excluded.title, excluded.content,
                                   excluded.topic_id)
        RETURNING {id}, (xmax = 0)
    """).format(
        table=sql.Identifier(spec.table),
        id=sql.Identifier(spec.id_column),
        extraction=sql.Identifier(spec.extraction_column),
    )
    select_id = sql.SQL("SELECT {} FROM {} WHERE key = %s").format(
        sql.Identifier(spec.id_column), sql.Identifier(spec.table)
    )
    for atom in extraction.atoms:
        sources = [message_ids[t] for t in atom.message_ids]
        row = conn.execute(
            statement,
            (
                atom.key,
                atom.kind,
                atom.title,
                atom.content,
                topic_ids.get(atom.topic) if atom.topic else None,
                extraction_id,
                extraction.extracted_at,
            ),
        ).fetchone()
        if row is None:
            report.atoms.unchanged += 1
            found = conn.execute(select_id, (atom.key,)).fetchone()
            assert found is not None
            atom_id = int(found[0])
        else:
            atom_id = int(row[0])
            if row[1]:
                report.atoms.created += 1
            else:
                report.atoms.updated += 1
        removed = conn.execute(
            sql.SQL("DELETE FROM {} WHERE atom_id = %s AND NOT message_id = ANY(%s)").format(links),
            (atom_id, sources),
        )
        report.links_removed += max(removed.rowcount, 0)
        cursor = conn.execute(
            sql.SQL(
                "INSERT INTO {} (atom_id, message_id) SELECT %s, unnest(%s::bigint[]) "
                "ON CONFLICT DO NOTHING"
            ).format(links),
            (atom_id, sources),
        )
        report.links += max(cursor.rowcount, 0)
