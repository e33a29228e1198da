"""Loading an export and its extraction into the database as one new extraction.

This is what the application does when its LLM step finishes: upsert messages, topics and
atoms, link them, and record an `extractions` row. Rows whose embedded text is new or
changed carry the new extraction's id, which is how sensors find work. Everything happens
in one transaction, and references to messages and topics are checked before the first
write: a bad file leaves the database as it was, its id sequences included.

The export's messages stream from the file into a temporary table (COPY), so memory does
not grow with the export. Rows are inserted only when they are not there yet, and the
extraction row only when something changed: ids are drawn from a sequence for new rows
alone, and re-ingesting an unchanged file draws none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import sql

from embedding_pipeline.lib.sources.extraction_file import AtomRecord, ExtractionFile, TopicRecord
from embedding_pipeline.lib.sources.telegram import ChatExport
from embedding_pipeline.lib.sources.values import InputFileError
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

    When nothing is new or changed, no extraction row is written and `extraction_id` is
    None.
    """
    report = IngestReport(
        extraction_id=None,
        service_messages_skipped=export.service_messages,
        empty_messages_skipped=export.empty_messages,
    )
    with conn.transaction():
        _stage_messages(conn, export)
        if extraction is not None:
            _check_references(conn, settings, export, extraction)
        new_extraction = _ExtractionRow(conn, settings, export, extraction)
        _upsert_messages(conn, settings, export, new_extraction, report)
        if extraction is not None:
            message_ids = _message_row_ids(conn, settings, export.chat_id, extraction)
            topic_ids = _upsert_topics(conn, settings, extraction, new_extraction, report)
            report.topic_assignments = _assign_topics(
                conn, settings, extraction, message_ids, topic_ids
            )
            _upsert_atoms(
                conn, settings, extraction, new_extraction, message_ids, topic_ids, report
            )
        if report.changed:
            report.extraction_id = new_extraction.id()
            conn.execute(
                sql.SQL("UPDATE {} SET stats = %s WHERE id = %s").format(
                    sql.Identifier(settings.extraction_table)
                ),
                (json.dumps(report.as_dict()), report.extraction_id),
            )
        conn.execute("DROP TABLE ep_ingest_messages")
    conn.commit()
    return report


class _ExtractionRow:
    """The new `extractions` row, inserted when the first change needs its id: an ingest
    that changes nothing draws no id from the sequence."""

    def __init__(
        self,
        conn: psycopg.Connection,
        settings: StoreSettings,
        export: ChatExport,
        extraction: ExtractionFile | None,
    ) -> None:
        self._conn = conn
        self._table = sql.Identifier(settings.extraction_table)
        self._values = (
            extraction.source if extraction else f"telegram-export:{export.name}",
            extraction.extractor if extraction else None,
            export.sha256,
            extraction.sha256 if extraction else None,
            extraction.extracted_at if extraction else None,
        )
        self._id: int | None = None

    def id(self) -> int:
        if self._id is None:
            row = self._conn.execute(
                sql.SQL(
                    "INSERT INTO {} (source, extractor, export_sha256, extraction_sha256, "
                    "created_at) VALUES (%s, %s, %s, %s, coalesce(%s, now())) RETURNING id"
                ).format(self._table),
                self._values,
            ).fetchone()
            assert row is not None
            self._id = int(row[0])
        return self._id


def _stage_messages(conn: psycopg.Connection, export: ChatExport) -> None:
    """The export's messages, read from the file as they are copied, in the temporary
    table `ep_ingest_messages` (nothing in it draws an id)."""
    conn.execute(
        "CREATE TEMP TABLE ep_ingest_messages (telegram_message_id bigint PRIMARY KEY, "
        "author text, author_id text, sent_at timestamptz, edited_at timestamptz, "
        "reply_to_message_id bigint, content text) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY ep_ingest_messages FROM STDIN") as copy:
        for m in export.messages:
            copy.write_row(
                (m.telegram_id, m.author, m.author_id, m.sent_at, m.edited_at, m.reply_to, m.text)
            )
    conn.execute("ANALYZE ep_ingest_messages")


def _check_references(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction: ExtractionFile,
) -> None:
    """Refuse, before anything is written, an extraction naming a message or a topic that
    is neither in these files nor in the database."""
    rows = conn.execute(
        sql.SQL(
            "SELECT w.id FROM unnest(%s::bigint[]) AS w(id) "
            "WHERE EXISTS (SELECT FROM ep_ingest_messages s WHERE s.telegram_message_id = w.id) "
            "OR EXISTS (SELECT FROM {} m WHERE m.chat_id = %s AND m.telegram_message_id = w.id)"
        ).format(sql.Identifier(settings.tables["messages"].table)),
        (_referenced_messages(extraction), export.chat_id),
    ).fetchall()
    known = {int(telegram_id) for (telegram_id,) in rows}
    records: list[TopicRecord | AtomRecord] = [*extraction.topics, *extraction.atoms]
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


def _upsert_messages(
    conn: psycopg.Connection,
    settings: StoreSettings,
    export: ChatExport,
    extraction: _ExtractionRow,
    report: IngestReport,
) -> None:
    """Update the staged messages whose text changed, insert the ones not there yet (by
    chat and telegram id); unchanged messages are not touched and draw no id."""
    spec = settings.tables["messages"]
    names = {
        "table": sql.Identifier(spec.table),
        "extraction": sql.Identifier(spec.extraction_column),
    }
    new, changed = conn.execute(
        sql.SQL("""
            SELECT count(*) FILTER (WHERE t.telegram_message_id IS NULL),
                   count(*) FILTER (WHERE t.content IS DISTINCT FROM s.content
                                    AND t.telegram_message_id IS NOT NULL)
            FROM ep_ingest_messages s
            LEFT JOIN {table} t ON t.chat_id = %s AND t.telegram_message_id = s.telegram_message_id
        """).format(**names),
        (export.chat_id,),
    ).fetchone() or (0, 0)
    values = {"chat": export.chat_id}
    if changed:
        values["extraction_id"] = extraction.id()
        report.messages.updated += conn.execute(
            sql.SQL("""
                UPDATE {table} AS t
                SET content = s.content, edited_at = s.edited_at, author = s.author,
                    author_id = s.author_id, {extraction} = %(extraction_id)s,
                    updated_at = now()
                FROM ep_ingest_messages s
                WHERE t.chat_id = %(chat)s AND t.telegram_message_id = s.telegram_message_id
                  AND t.content IS DISTINCT FROM s.content
            """).format(**names),
            values,
        ).rowcount
    if new:
        values["extraction_id"] = extraction.id()
        # ON CONFLICT: a message another session inserted meanwhile is updated as before
        rows = conn.execute(
            sql.SQL("""
                INSERT INTO {table} AS t (chat_id, telegram_message_id, author, author_id,
                                          sent_at, edited_at, reply_to_message_id, content,
                                          {extraction})
                SELECT %(chat)s, telegram_message_id, author, author_id, sent_at, edited_at,
                       reply_to_message_id, content, %(extraction_id)s
                FROM ep_ingest_messages s
                WHERE NOT EXISTS (SELECT FROM {table} m WHERE m.chat_id = %(chat)s
                                  AND m.telegram_message_id = s.telegram_message_id)
                ON CONFLICT (chat_id, telegram_message_id) DO UPDATE
                   SET content = excluded.content, edited_at = excluded.edited_at,
                       author = excluded.author, author_id = excluded.author_id,
                       {extraction} = excluded.{extraction}, updated_at = now()
                   WHERE t.content IS DISTINCT FROM excluded.content
                RETURNING (xmax = 0) AS inserted
            """).format(**names),
            values,
        ).fetchall()
        inserted = sum(1 for (was_inserted,) in rows if was_inserted)
        report.messages.created += inserted
        report.messages.updated += len(rows) - inserted
    report.messages.unchanged = (
        export.message_count - report.messages.created - report.messages.updated
    )


def _message_row_ids(
    conn: psycopg.Connection, settings: StoreSettings, chat_id: int, extraction: ExtractionFile
) -> dict[int, int]:
    """Telegram id -> row id of the messages the extraction names."""
    spec = settings.tables["messages"]
    rows = conn.execute(
        sql.SQL(
            "SELECT telegram_message_id, {} FROM {} WHERE chat_id = %s "
            "AND telegram_message_id = ANY(%s)"
        ).format(sql.Identifier(spec.id_column), sql.Identifier(spec.table)),
        (chat_id, _referenced_messages(extraction)),
    ).fetchall()
    return {int(tid): int(rid) for tid, rid in rows}


def _referenced_messages(extraction: ExtractionFile) -> list[int]:
    """The telegram ids the extraction's topics and atoms name, once each."""
    records: list[TopicRecord | AtomRecord] = [*extraction.topics, *extraction.atoms]
    return sorted({t for record in records for t in record.message_ids})


def _upsert_topics(
    conn: psycopg.Connection,
    settings: StoreSettings,
    extraction: ExtractionFile,
    new_extraction: _ExtractionRow,
    report: IngestReport,
) -> dict[str, int]:
    """Insert new topics, update changed ones (by key); returns key -> row id of all."""
    spec = settings.tables["topics"]
    names = {
        "table": sql.Identifier(spec.table),
        "id": sql.Identifier(spec.id_column),
        "extraction": sql.Identifier(spec.extraction_column),
    }
    stored = {
        str(key): (int(row_id), name, description)
        for key, row_id, name, description in conn.execute(
            sql.SQL("SELECT key, {id}, name, description FROM {table} WHERE key = ANY(%s)").format(
                **names
            ),
            ([t.key for t in extraction.topics],),
        )
    }
    update = sql.SQL("""
        UPDATE {table} SET name = %s, description = %s, {extraction} = %s, updated_at = now()
        WHERE key = %s AND (name, description) IS DISTINCT FROM (%s, %s)
    """).format(**names)
    # ON CONFLICT: a topic another session inserted meanwhile is updated as before
    insert = sql.SQL("""
        INSERT INTO {table} AS t (key, name, description, {extraction}, created_at)
        VALUES (%s, %s, %s, %s, coalesce(%s, now()))
        ON CONFLICT (key) DO UPDATE
           SET name = excluded.name, description = excluded.description,
               {extraction} = excluded.{extraction}, updated_at = now()
           WHERE (t.name, t.description) IS DISTINCT FROM (excluded.name, excluded.description)
        RETURNING (xmax = 0)
    """).format(**names)
    for topic in extraction.topics:
        found = stored.get(topic.key)
        if found is not None and found[1:] == (topic.name, topic.description):
            report.topics.unchanged += 1
        elif found is not None:
            values = (topic.name, topic.description, new_extraction.id(), topic.key)
            cursor = conn.execute(update, (*values, topic.name, topic.description))
            if cursor.rowcount:
                report.topics.updated += 1
            else:
                report.topics.unchanged += 1
        else:
            row = conn.execute(
                insert,
                (
                    topic.key,
                    topic.name,
                    topic.description,
                    new_extraction.id(),
                    extraction.extracted_at,
                ),
            ).fetchone()
            if row is None:
                report.topics.unchanged += 1
            elif row[0]:
                report.topics.created += 1
            else:
                report.topics.updated += 1
    rows = conn.execute(
        sql.SQL("SELECT key, {id} FROM {table} WHERE key = ANY(%s)").format(**names),
        ([t.key for t in extraction.topics] + [a.topic for a in extraction.atoms if a.topic],),
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


#: The atom columns an extraction sets, in the order `_upsert_atoms` compares them.
_ATOM_FIELDS = ("kind", "title", "content", "topic_id")


def _upsert_atoms(
    conn: psycopg.Connection,
    settings: StoreSettings,
    extraction: ExtractionFile,
    new_extraction: _ExtractionRow,
    message_ids: dict[int, int],
    topic_ids: dict[str, int],
    report: IngestReport,
) -> None:
    """Insert new atoms, update changed ones (by key), and make each atom's links to its
    source messages the ones the file lists."""
    spec = settings.tables["atoms"]
    names = {
        "table": sql.Identifier(spec.table),
        "id": sql.Identifier(spec.id_column),
        "extraction": sql.Identifier(spec.extraction_column),
    }
    links = sql.Identifier(f"{spec.table}_messages")
    stored = {
        str(key): (int(row_id), kind, title, content, topic_id)
        for key, row_id, kind, title, content, topic_id in conn.execute(
            sql.SQL(
                "SELECT key, {id}, kind, title, content, topic_id FROM {table} WHERE key = ANY(%s)"
            ).format(**names),
            ([a.key for a in extraction.atoms],),
        )
    }
    # the extraction column moves only when the embedded text (title, content) changes
    update = sql.SQL("""
        UPDATE {table} AS t
        SET kind = %(kind)s, title = %(title)s, content = %(content)s, topic_id = %(topic_id)s,
            updated_at = now(),
            {extraction} = CASE WHEN (t.title, t.content) IS DISTINCT FROM (%(title)s, %(content)s)
                                THEN %(extraction_id)s ELSE t.{extraction} END
        WHERE key = %(key)s
          AND (kind, title, content, topic_id)
              IS DISTINCT FROM (%(kind)s, %(title)s, %(content)s, %(topic_id)s::bigint)
    """).format(**names)
    # ON CONFLICT: an atom another session inserted meanwhile is updated as before
    insert = sql.SQL("""
        INSERT INTO {table} AS t (key, kind, title, content, topic_id, {extraction}, created_at)
        VALUES (%(key)s, %(kind)s, %(title)s, %(content)s, %(topic_id)s, %(extraction_id)s,
                coalesce(%(created_at)s, now()))
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
    """).format(**names)
    select_id = sql.SQL("SELECT {id} FROM {table} WHERE key = %s").format(**names)
    for atom in extraction.atoms:
        sources = [message_ids[t] for t in atom.message_ids]
        topic_id = topic_ids.get(atom.topic) if atom.topic else None
        found = stored.get(atom.key)
        wanted = (atom.kind, atom.title, atom.content, topic_id)
        if found is not None and found[1:] == wanted:
            report.atoms.unchanged += 1
            atom_id = found[0]
        elif found is not None:
            values: dict[str, object] = dict(zip(_ATOM_FIELDS, wanted, strict=True))
            values.update(key=atom.key, extraction_id=new_extraction.id())
            if conn.execute(update, values).rowcount:
                report.atoms.updated += 1
            else:
                report.atoms.unchanged += 1
            atom_id = found[0]
        else:
            values = dict(zip(_ATOM_FIELDS, wanted, strict=True))
            values.update(
                key=atom.key,
                extraction_id=new_extraction.id(),
                created_at=extraction.extracted_at,
            )
            row = conn.execute(insert, values).fetchone()
            if row is None:
                report.atoms.unchanged += 1
                found_id = conn.execute(select_id, (atom.key,)).fetchone()
                assert found_id is not None
                atom_id = int(found_id[0])
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
