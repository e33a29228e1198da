"""Every bad input, through the real `embedding-pipeline` command: one line that names the
file, the position and the reason (or the setting), exit code 2, no traceback, and a
database left exactly as it was (rows, id sequences and relations).

The CLI runs in this process (`cli.main`) against the module's database, after the small
test chat was ingested; a few cases also run as a subprocess, where an escaping exception
would print a traceback instead of failing a test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from embedding_pipeline import cli
from embedding_pipeline.definitions import build_resources
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION
from embedding_pipeline.lib.embedders import PROVIDERS as BUILDABLE_PROVIDERS
from embedding_pipeline.lib.engine.model_switch import shadow_spec
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.resources import EmbedderResource
from embedding_pipeline.settings import PROVIDERS, Settings, load_settings, postgres_names
from embedding_pipeline_tests.support.paths import DATA

CLI = Path(sys.executable).parent / "embedding-pipeline"
GOOD_EXPORT = DATA / "small_export.json"
GOOD_EXTRACTION = DATA / "small_extraction.json"
TABLES = ("extractions", "messages", "topics", "atoms", "atoms_messages")
DROP = object()
NUL = "contains a NUL character (\\u0000), which PostgreSQL text cannot hold"
OUT_OF_RANGE = "is out of range: ids must fit a 64-bit integer"
NOT_STORED = (
    "is not in the export or the database (service messages and messages without text are "
    "not stored)"
)


def _changed(obj: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is DROP:
            obj.pop(key, None)
        else:
            obj[key] = value


def export(index: int = 1, message: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """The small test export with `top` fields and `messages[index]` changed (index 1 is
    message id 2, a plain text; index 2 is id 3, a list of text entities)."""
    data = copy.deepcopy(json.loads(GOOD_EXPORT.read_text()))
    _changed(data, top)
    if message:
        _changed(data["messages"][index], message)
    return data


def iso_date(value: str) -> dict[str, Any]:
    """Message changes that leave only an ISO `date`."""
    return {"date": value, "date_unixtime": DROP}


def extraction(
    topic: dict[str, Any] | None = None,
    atom: dict[str, Any] | None = None,
    **header: Any,
) -> dict[str, Any]:
    """The small test extraction with its header, `topics[0]` and `atoms[0]` changed."""
    data = copy.deepcopy(json.loads(GOOD_EXTRACTION.read_text()))
    _changed(data["extraction"], header)
    _changed(data["topics"][0], topic or {})
    _changed(data["atoms"][0], atom or {})
    return data


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # "export" or "extraction"
    content: object  # a JSON value, raw bytes, "directory" or "missing"
    position: str
    reason: str

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.file}.json"
        if self.content == "directory":
            path.mkdir()
        elif isinstance(self.content, bytes):
            path.write_bytes(self.content)
        elif self.content != "missing":
            path.write_text(json.dumps(self.content))
        return path


DEEP_PREFIX = '{"id": 1, "messages": '
NON_UTF8 = b'{"id": 1,\n "name": "caf\xe9", "messages": []}'

EXPORT_CASES = [
    Case(
        "nul-in-text", "export", export(message={"text": "a\x00b"}), "messages[1] (id 2).text", NUL
    ),
    Case(
        "nul-in-text-entity",
        "export",
        export(2, {"text": ["I cleaned ", {"type": "code", "text": "/var\x00"}]}),
        "messages[2] (id 3).text[1].text",
        NUL,
    ),
    Case(
        "nul-in-author",
        "export",
        export(message={"from": "Ira\x00"}),
        "messages[1] (id 2).from",
        NUL,
    ),
    Case("nul-in-chat-name", "export", export(name="Test\x00Chat"), "name", NUL),
    Case(
        "lone-surrogate",
        "export",
        export(message={"text": "disk \ud800 full"}),
        "messages[1] (id 2).text",
        "contains a lone surrogate (\\ud800), which is not valid Unicode",
    ),
    Case(
        "lone-surrogate-in-entity",
        "export",
        export(2, {"text": ["ok ", "\udc00"]}),
        "messages[2] (id 3).text[1]",
        "contains a lone surrogate (\\udc00), which is not valid Unicode",
    ),
    Case("chat-id-beyond-bigint", "export", export(id=2**63), "id", f"{2**63} {OUT_OF_RANGE}"),
    Case("chat-id-true", "export", export(id=True), "id", "expected an integer id, got true"),
    Case("chat-id-missing", "export", export(id=DROP), "id", "missing: the chat's integer id"),
    Case(
        "message-id-beyond-bigint",
        "export",
        export(message={"id": 2**63}),
        "messages[1].id",
        f"{2**63} {OUT_OF_RANGE}",
    ),
    Case(
        "message-id-below-bigint",
        "export",
        export(message={"id": -(2**63) - 1}),
        "messages[1].id",
        f"{-(2**63) - 1} {OUT_OF_RANGE}",
    ),
    Case(
        "message-id-float",
        "export",
        export(message={"id": 2.0}),
        "messages[1].id",
        "expected an integer id, got 2.0",
    ),
    Case(
        "message-id-string",
        "export",
        export(message={"id": "2"}),
        "messages[1].id",
        'expected an integer id, got "2"',
    ),
    Case(
        "message-id-missing", "export", export(message={"id": DROP}), "messages[1]", "missing 'id'"
    ),
    Case(
        "message-id-huge-float",
        "export",
        json.dumps(export()).replace('"id": 2,', '"id": 1e400,').encode(),
        "messages[1].id",
        "expected an integer id, got a number too large for the JSON reader",
    ),
    Case(
        "message-id-nan",
        "export",
        json.dumps(export()).replace('"id": 2,', '"id": NaN,').encode(),
        "messages[1].id",
        "expected an integer id, got NaN",
    ),
    Case(
        "duplicate-message-id",
        "export",
        export(2, {"id": 2}),
        "messages[2] (id 2)",
        "duplicate message id (first at messages[1])",
    ),
    Case(
        "reply-to-true",
        "export",
        export(message={"reply_to_message_id": True}),
        "messages[1] (id 2).reply_to_message_id",
        "expected an integer id, got true",
    ),
    Case(
        "reply-to-beyond-bigint",
        "export",
        export(message={"reply_to_message_id": 2**64}),
        "messages[1] (id 2).reply_to_message_id",
        f"{2**64} {OUT_OF_RANGE}",
    ),
    Case(
        "from-id-beyond-bigint",
        "export",
        export(message={"from_id": 2**70}),
        "messages[1] (id 2).from_id",
        f"{2**70} {OUT_OF_RANGE}",
    ),
    Case(
        "from-id-object",
        "export",
        export(message={"from_id": {"id": 1}}),
        "messages[1] (id 2).from_id",
        "expected a string or null, got an object",
    ),
    Case(
        "author-list",
        "export",
        export(message={"from": ["Ira"]}),
        "messages[1] (id 2).from",
        "expected a string or null, got a list",
    ),
    Case(
        "unknown-type",
        "export",
        export(message={"type": "poll"}),
        "messages[1] (id 2).type",
        'unknown message type "poll"; expected "message" or "service"',
    ),
    Case(
        "type-true",
        "export",
        export(message={"type": True}),
        "messages[1] (id 2).type",
        'unknown message type true; expected "message" or "service"',
    ),
    Case(
        "date-missing",
        "export",
        export(message={"date": DROP, "date_unixtime": DROP}),
        "messages[1] (id 2)",
        "missing 'date'",
    ),
    Case(
        "date-not-iso",
        "export",
        export(message=iso_date("yesterday")),
        "messages[1] (id 2).date",
        'not an ISO date: "yesterday"',
    ),
    Case(
        "date-before-year-1-in-utc",
        "export",
        export(message=iso_date("0001-01-01T00:00:00+14:00")),
        "messages[1] (id 2).date",
        '"0001-01-01T00:00:00+14:00" is out of range (years 1-9999 in UTC)',
    ),
    Case(
        "date-after-year-9999-in-utc",
        "export",
        export(message=iso_date("9999-12-31T23:00:00-12:00")),
        "messages[1] (id 2).date",
        '"9999-12-31T23:00:00-12:00" is out of range (years 1-9999 in UTC)',
    ),
    Case(
        "unixtime-out-of-range",
        "export",
        export(message={"date_unixtime": "99999999999999"}),
        "messages[1] (id 2).date_unixtime",
        '"99999999999999" is out of range (years 1-9999)',
    ),
    Case(
        "unixtime-fraction",
        "export",
        export(message={"date_unixtime": "1756717200.5"}),
        "messages[1] (id 2).date_unixtime",
        'expected whole unix seconds ("1756717200"), got "1756717200.5"',
    ),
    Case(
        "unixtime-true",
        "export",
        export(message={"date_unixtime": True}),
        "messages[1] (id 2).date_unixtime",
        'expected whole unix seconds ("1756717200"), got true',
    ),
    Case(
        "edited-number",
        "export",
        export(message={"edited": 5}),
        "messages[1] (id 2).edited",
        "expected an ISO date string, got 5",
    ),
    Case(
        "text-number",
        "export",
        export(message={"text": 42}),
        "messages[1] (id 2).text",
        "expected a string or a list, got 42",
    ),
    Case(
        "entity-without-text",
        "export",
        export(2, {"text": [{"type": "bold"}]}),
        "messages[2] (id 3).text[0]",
        "expected a string or an entity object with a 'text' string, got an object",
    ),
    Case(
        "message-not-an-object",
        "export",
        export(messages=[{"id": 1, "type": "service"}, "hi"]),
        "messages[1]",
        'expected an object, got "hi"',
    ),
    Case(
        "messages-not-a-list",
        "export",
        export(messages={"1": {}}),
        "top level",
        "expected an object with a 'messages' list",
    ),
    Case("top-level-list", "export", [], "top level", "expected an object with a 'messages' list"),
    Case(
        "repeated-json-key",
        "export",
        json.dumps(export()).replace('"id": 4242', '"id": 4242, "id": 1').encode(),
        "top level",
        "the key 'id' appears twice",
    ),
    Case(
        "nested-too-deeply",
        "export",
        (DEEP_PREFIX + "[" * 5000 + "]" * 5000 + "}").encode(),
        f"line 1 column {len(DEEP_PREFIX) + 5000}",
        "JSON nested 5001 levels deep, too deep to read",
    ),
    Case(
        "integer-too-long-to-read",
        "export",
        ('{"id": ' + "7" * 5000 + ', "messages": []}').encode(),
        "line 1 column 8",
        "a 5000-digit number, too long to read",
    ),
    Case(
        "not-utf8",
        "export",
        NON_UTF8,
        "line 2 column 14 (byte 23)",
        "not valid UTF-8 (byte 0xe9)",
    ),
    Case(
        "invalid-json",
        "export",
        b'{"id": 1, "messages": [],}',
        "line 1 column 26",
        "invalid JSON: Expecting property name enclosed in double quotes",
    ),
    Case("empty-file", "export", b"", "file", "is empty"),
    Case("blank-file", "export", b" \n\t\n", "file", "is empty"),
    Case("directory", "export", "directory", "file", "cannot be read (Is a directory)"),
    Case("missing-file", "export", "missing", "file", "cannot be read (No such file or directory)"),
]

EXTRACTION_CASES = [
    Case(
        "atom-message-id-beyond-bigint",
        "extraction",
        extraction(atom={"message_ids": [2, 2**63]}),
        "atoms[0] (key 'a-1').message_ids[1]",
        f"{2**63} {OUT_OF_RANGE}",
    ),
    Case(
        "topic-message-id-true",
        "extraction",
        extraction(topic={"message_ids": [True]}),
        "topics[0] (key 'backups').message_ids[0]",
        "expected an integer id, got true",
    ),
    Case(
        "atom-message-not-anywhere",
        "extraction",
        extraction(atom={"message_ids": [2, 999]}),
        "atoms[0] (key 'a-1').message_ids[1]",
        f"message 999 {NOT_STORED}",
    ),
    Case(
        "atom-message-is-a-service-message",
        "extraction",
        extraction(atom={"message_ids": [1]}),
        "atoms[0] (key 'a-1').message_ids[0]",
        f"message 1 {NOT_STORED}",
    ),
    Case(
        "topic-message-not-anywhere",
        "extraction",
        extraction(topic={"message_ids": [2, 3, 777]}),
        "topics[0] (key 'backups').message_ids[2]",
        f"message 777 {NOT_STORED}",
    ),
    Case(
        "message-in-two-topics",
        "extraction",
        extraction(topic={"message_ids": [2, 3, 5]}),
        "topics[1] (key 'social').message_ids[0]",
        "message 5 is already in topics[0] (key 'backups'); a message belongs to one topic",
    ),
    Case(
        "message-id-listed-twice",
        "extraction",
        extraction(atom={"message_ids": [2, 2]}),
        "atoms[0] (key 'a-1').message_ids[1]",
        "message id 2 is listed twice",
    ),
    Case(
        "message-ids-null",
        "extraction",
        extraction(atom={"message_ids": None}),
        "atoms[0] (key 'a-1').message_ids",
        "expected a list, got null",
    ),
    Case(
        "unknown-topic-key",
        "extraction",
        extraction(atom={"topic": "nope"}),
        "atoms[0] (key 'a-1').topic",
        "unknown topic key 'nope': not in this file or the database",
    ),
    Case(
        "blank-topic-key",
        "extraction",
        extraction(atom={"topic": " "}),
        "atoms[0] (key 'a-1').topic",
        "expected a topic key or null",
    ),
    Case(
        "nul-in-atom-content",
        "extraction",
        extraction(atom={"content": "full\x00disk"}),
        "atoms[0] (key 'a-1').content",
        NUL,
    ),
    Case("nul-in-source", "extraction", extraction(source="run\x00"), "extraction.source", NUL),
    Case(
        "surrogate-in-topic-name",
        "extraction",
        extraction(topic={"name": "\udfff"}),
        "topics[0] (key 'backups').name",
        "contains a lone surrogate (\\udfff), which is not valid Unicode",
    ),
    Case(
        "description-object",
        "extraction",
        extraction(topic={"description": {"text": "x"}}),
        "topics[0] (key 'backups').description",
        "expected a string or null, got an object",
    ),
    Case(
        "extractor-number",
        "extraction",
        extraction(extractor=1),
        "extraction.extractor",
        "expected a string or null, got 1",
    ),
    Case(
        "extracted-at-out-of-range",
        "extraction",
        extraction(extracted_at="0001-01-01T00:00:00+05:00"),
        "extraction.extracted_at",
        '"0001-01-01T00:00:00+05:00" is out of range (years 1-9999 in UTC)',
    ),
    Case(
        "unknown-kind",
        "extraction",
        extraction(atom={"kind": "rumour"}),
        "atoms[0] (key 'a-1').kind",
        "unknown kind 'rumour'; one of decision, fact, idea, insight, problem, question, risk, "
        "solution, task",
    ),
    Case(
        "kind-list",
        "extraction",
        extraction(atom={"kind": ["fact"]}),
        "atoms[0] (key 'a-1').kind",
        "expected a non-empty string, got a list",
    ),
    Case(
        "title-missing",
        "extraction",
        extraction(atom={"title": DROP}),
        "atoms[0] (key 'a-1').title",
        "expected a non-empty string, got null",
    ),
    Case(
        "key-too-long",
        "extraction",
        extraction(topic={"key": "k" * 201}),
        "topics[0].key",
        "201 characters long; a key has at most 200",
    ),
    Case(
        "duplicate-atom-key",
        "extraction",
        extraction(atom={"key": "a-2"}),
        "atoms[1] (key 'a-2')",
        "duplicate atom key (first at atoms[0] (key 'a-2'))",
    ),
    Case(
        "topics-not-a-list",
        "extraction",
        {**extraction(), "topics": {"backups": {}}},
        "topics",
        "expected a list, got an object",
    ),
    Case(
        "header-missing",
        "extraction",
        {"topics": []},
        "extraction",
        "expected an object with 'source'",
    ),
]


def _snapshot(url: str) -> dict[str, object]:
    """Row counts and a hash over every row of the pipeline's tables, the id sequences
    and the number of relations: equal snapshots mean an unchanged database."""
    with psycopg.connect(url) as conn:
        state: dict[str, object] = {
            table: conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' "
                    "ORDER BY t::text), '')) FROM {} t"
                ).format(sql.Identifier(table))
            ).fetchone()
            for table in TABLES
        }
        state["sequences"] = conn.execute(
            "SELECT sequencename, last_value FROM pg_sequences ORDER BY 1"
        ).fetchall()
        state["relations"] = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchone()
    return state


@pytest.fixture(scope="module")
def baseline(small_data: Settings) -> dict[str, object]:
    """The database after the small chat was ingested, before any bad input."""
    return _snapshot(small_data.effective_database_url)


@pytest.fixture
def run_cli(
    small_data: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[int, str]]:
    """`embedding-pipeline ARGS` in this process on the module's database: (exit code,
    stderr). Keyword arguments set (or, with None, unset) environment variables."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))
    monkeypatch.setenv("DATABASE_URL", small_data.effective_database_url)

    def run(*args: str, **env: str | None) -> tuple[int, str]:
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = cli.main(list(args))
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    "case", EXPORT_CASES + EXTRACTION_CASES, ids=lambda c: f"{c.file}-{c.name}"
)
def test_bad_file_is_refused_in_one_line_and_nothing_is_written(
    case: Case, run_cli, baseline, small_data: Settings, tmp_path: Path
) -> None:
    path = case.write(tmp_path)
    if case.file == "export":
        code, err = run_cli("ingest", str(path))
    else:
        code, err = run_cli("ingest", str(GOOD_EXPORT), "--extraction", str(path))
    assert (code, err) == (2, f"error: {path}: {case.position}: {case.reason}\n")
    assert _snapshot(small_data.effective_database_url) == baseline


def test_the_files_the_cases_start_from_load(
    run_cli, baseline, small_data: Settings, fresh_database_url: str
) -> None:
    """Each case above changes one thing in files that load; loading them again changes
    nothing, id sequences included."""
    args = ("ingest", str(GOOD_EXPORT), "--extraction", str(GOOD_EXTRACTION))
    assert run_cli(*args, DATABASE_URL=fresh_database_url) == (0, "")
    assert run_cli(*args) == (0, "")
    assert _snapshot(small_data.effective_database_url) == baseline


SECRET_URL = "postgresql://app:s3cr3t-pw@db.internal:notaport/app"
SETTINGS_CASES = [
    (
        {"DATABASE_URL": SECRET_URL},
        "DATABASE_URL (postgresql://app:***@db.internal:notaport/app) is not a PostgreSQL "
        "connection string (postgresql://user:password@host:port/database or key=value "
        "pairs): port 'notaport' is not a number from 1 to 65535",
    ),
    (
        {"DATABASE_URL": "nonsense"},
        "DATABASE_URL (nonsense) is not a PostgreSQL connection string (postgresql://user:"
        'password@host:port/database or key=value pairs): missing "=" after "nonsense" in '
        "connection info string",
    ),
    (
        {"DATABASE_URL": "host=db password=s3cr3t-pw colour=blue"},
        "DATABASE_URL (host=db password=*** colour=blue) is not a PostgreSQL connection string "
        "(postgresql://user:password@host:port/database or key=value pairs): invalid "
        'connection option "colour"',
    ),
    (
        {"DATABASE_URL": "postgresql://app:s3cr3t-pw%zz@db/app"},
        "DATABASE_URL (postgresql://app:***@db/app) is not a PostgreSQL connection string "
        "(postgresql://user:password@host:port/database or key=value pairs): invalid "
        'percent-encoded token: "***"',
    ),
    (
        {"DATABASE_URL": "postgresql+psycopg2://app:s3cr3t-pw@db/app"},
        "DATABASE_URL (postgresql+psycopg2://app:***@db/app) is not a PostgreSQL connection "
        "string (postgresql://user:password@host:port/database or key=value pairs): the "
        "'+psycopg2' driver suffix is SQLAlchemy's; libpq wants postgresql://",
    ),
    (
        {"EP_EMBEDDING_TIMEOUT_SECONDS": "0"},
        "EP_EMBEDDING_TIMEOUT_SECONDS must be a number above 0, got 0",
    ),
    (
        {"EP_EMBEDDING_TIMEOUT_SECONDS": "nan"},
        "EP_EMBEDDING_TIMEOUT_SECONDS must be a number, got 'nan'",
    ),
    (
        {"EP_EMBEDDING_PROVIDER": "gpt"},
        "EP_EMBEDDING_PROVIDER must be one of local, openai, ollama, got 'gpt'",
    ),
    ({"EP_BATCH_SIZE": "-5"}, "EP_BATCH_SIZE must be a whole number of at least 1, got -5"),
    ({"EP_BATCH_SIZE": "lots"}, "EP_BATCH_SIZE must be an integer, got 'lots'"),
    (
        {"EP_SENSOR_INTERVAL_SECONDS": "0"},
        "EP_SENSOR_INTERVAL_SECONDS must be a whole number of at least 1, got 0",
    ),
    (
        {"EP_EMBEDDING_DIMENSIONS": "3072"},
        "EP_EMBEDDING_DIMENSIONS must be a whole number from 1 to 2000 (pgvector's HNSW index "
        "takes vector up to 2000 dimensions and halfvec (EP_VECTOR_TYPE=halfvec) up to 4000), "
        "got 3072",
    ),
    (
        {"EP_EMBEDDING_PROVIDER": "openai", "EP_EMBEDDING_MODEL": "text-embedding-3-large"},
        "openai:text-embedding-3-large makes 3072-dimension vectors; pgvector's HNSW index "
        "takes vector up to 2000: set EP_VECTOR_TYPE=halfvec (HNSW up to 4000 dimensions, "
        "half the size) or EP_EMBEDDING_DIMENSIONS to at most 2000",
    ),
    (
        {"EP_VECTOR_TYPE": "float8"},
        "EP_VECTOR_TYPE must be one of vector, halfvec, got 'float8'",
    ),
    (
        {"EP_EMBEDDING_MODEL": "all-mpnet-base-v2"},
        "EP_EMBEDDING_MODEL 'all-mpnet-base-v2' is not a local model; the local provider has "
        "all-MiniLM-L6-v2 (the default), multilingual-e5-small",
    ),
    (
        {"EP_EVAL_QUESTIONS": "/nonexistent/questions.json"},
        "EP_EVAL_QUESTIONS names no file: /nonexistent/questions.json",
    ),
    (
        {"EP_EVAL_MIN_RECALL": "1.5"},
        "EP_EVAL_MIN_RECALL must be a number from 0 to 1, got 1.5",
    ),
    (
        {"EP_HNSW_M": "16", "EP_HNSW_EF_CONSTRUCTION": "20"},
        "EP_HNSW_EF_CONSTRUCTION must be a whole number from 32 to 1000 (pgvector's limits, "
        "and at least twice EP_HNSW_M), got 20",
    ),
    (
        {"EP_CHECK_RECALL_THRESHOLD": "1.5"},
        "EP_CHECK_RECALL_THRESHOLD must be a number above 0 and at most 1, got 1.5",
    ),
    (
        {"EP_CHECK_SCHEDULE": "hourly"},
        "EP_CHECK_SCHEDULE must be a cron expression of 5 fields (minute hour day month "
        "weekday), got 'hourly'",
    ),
    (
        {"EP_PARTITION_START": "2024-01-15"},
        "EP_PARTITION_START must be the first day of a month (YYYY-MM-01), got '2024-01-15'",
    ),
    (
        {"EP_PARTITION_START": "2999-01-01"},
        "EP_PARTITION_START (2999-01-01) is in the future: there would be no partition to "
        "embed into",
    ),
    (
        {"OPENAI_BASE_URL": "localhost:8080/v1"},
        "OPENAI_BASE_URL must be an http(s) URL such as https://api.openai.com/v1, got "
        "'localhost:8080/v1'",
    ),
    (
        {"EP_MESSAGES_TABLE": "m" * 64},
        f"EP_MESSAGES_TABLE ('{'m' * 64}') is 64 bytes long; PostgreSQL names hold at most 63 "
        "bytes (a longer one is cut short and never found again)",
    ),
    (
        {"EP_MESSAGES_TABLE": "ü" * 32},
        f"EP_MESSAGES_TABLE ('{'ü' * 32}') is 64 bytes long; PostgreSQL names hold at most 63 "
        "bytes (a longer one is cut short and never found again)",
    ),
    (
        {"EP_ATOMS_TABLE": "a" * 50},
        f"the index name '{'a' * 50}_created_at_idx' made from EP_ATOMS_TABLE and "
        "EP_ATOMS_PARTITION_COLUMN is 65 bytes long; PostgreSQL names hold at most 63 bytes "
        "(a longer one is cut short and never found again)",
    ),
    (
        {"EP_TOPICS_EMBEDDING_COLUMN": "e" * 50},
        f"the index name 'topics_{'e' * 50}_hnsw_idx' made from EP_TOPICS_TABLE and "
        "EP_TOPICS_EMBEDDING_COLUMN is 66 bytes long; PostgreSQL names hold at most 63 bytes "
        "(a longer one is cut short and never found again)",
    ),
    (
        {"EP_TOPICS_EMBEDDING_COLUMN": "e" * 60},
        f"the shadow column name '{'e' * 60}_next' made from EP_TOPICS_EMBEDDING_COLUMN is 65 "
        "bytes long; PostgreSQL names hold at most 63 bytes (a longer one is cut short and "
        "never found again)",
    ),
    (
        {"EP_TOPICS_TABLE": "messages"},
        "EP_TOPICS_TABLE names the table 'messages', which EP_MESSAGES_TABLE already uses",
    ),
    (
        {"EP_EXTRACTION_TABLE": "atoms_messages"},
        "EP_ATOMS_TABLE names the table 'atoms_messages', which EP_EXTRACTION_TABLE already uses",
    ),
    ({"EP_MESSAGES_TEXT_COLUMNS": ","}, "EP_MESSAGES_TEXT_COLUMNS must name at least one column"),
    (
        {"EP_MESSAGES_EMBEDDING_COLUMN": "content"},
        "EP_MESSAGES_EMBEDDING_COLUMN ('content') is also one of the table's other columns; "
        "vectors need a column of their own",
    ),
    (
        {"EP_API_MAX_QUERY_CHARS": "1000000"},
        "EP_API_MAX_QUERY_CHARS must be a whole number from 1 to 100000 (PostgreSQL's text "
        "search can exhaust its stack on longer input), got 1000000",
    ),
    (
        {"EP_API_STATEMENT_TIMEOUT_SECONDS": "0"},
        "EP_API_STATEMENT_TIMEOUT_SECONDS must be a number above 0 and at most 3600, got 0",
    ),
    (
        {"EP_API_DB_POOL_SIZE": "0"},
        "EP_API_DB_POOL_SIZE must be a whole number from 1 to 1000, got 0",
    ),
    (
        {"EP_API_CORS_ORIGINS": "https://app.example.com/search"},
        "EP_API_CORS_ORIGINS must list origins such as https://app.example.com (scheme, host "
        "and port only) or *, got 'https://app.example.com/search'",
    ),
    (
        {"EP_MESSAGES_TABLE": "app.messages"},
        "EP_MESSAGES_TABLE ('app.messages') contains a dot: schema-qualified names are not "
        "supported; put the schema on the search_path of the database user instead",
    ),
]


@pytest.mark.parametrize(
    ("env", "message"), SETTINGS_CASES, ids=["-".join(env) for env, _ in SETTINGS_CASES]
)
def test_a_setting_that_cannot_work_is_refused_by_name(
    env: dict[str, str], message: str, run_cli, baseline, small_data: Settings
) -> None:
    assert run_cli("status", **env) == (2, f"error: {message}\n")
    assert "s3cr3t" not in message
    assert _snapshot(small_data.effective_database_url) == baseline


def test_the_timeout_setting_reaches_the_embedder() -> None:
    settings = load_settings({"EP_EMBEDDING_TIMEOUT_SECONDS": "2.5"})
    embedder = build_resources(settings)["embedder"]
    assert isinstance(embedder, EmbedderResource)
    assert embedder.timeout_seconds == 2.5


def test_settings_providers_are_the_buildable_ones() -> None:
    assert PROVIDERS == BUILDABLE_PROVIDERS


def test_every_name_made_from_a_setting_is_checked_by_the_settings(
    fresh_database_url: str,
) -> None:
    """Under settings with tables and embedding columns of recognisable names, every
    relation and column `ensure_schema` creates whose name contains one of them (other
    than PostgreSQL's own `_pkey`, `_key`) is one `postgres_names` checks: a name derived
    from a long setting cannot slip past the 63-byte limit unnoticed."""
    env = {"EP_EXTRACTION_TABLE": "xtr_t"}
    for key in ("messages", "topics", "atoms"):
        env[f"EP_{key.upper()}_TABLE"] = f"{key[:3]}_t"
        env[f"EP_{key.upper()}_EMBEDDING_COLUMN"] = f"{key[:3]}_vec"
    settings = replace(load_settings(env), database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION)
        names = conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind IN ('r', 'i') UNION SELECT a.attname FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0"
        ).fetchall()
    made = {
        name
        for (name,) in names
        if any(part in name for part in env.values()) and not name.endswith(("_pkey", "_key"))
    }
    checked = {n.name for n in postgres_names(settings)}
    assert len(made) > 15 and made <= checked
    for spec in settings.tables.values():
        assert hnsw_index_name(shadow_spec(spec)) in checked
        assert shadow_spec(spec).embedding_column in checked


def test_commands_that_read_the_tables_say_to_create_them_first(
    run_cli, fresh_database_url: str
) -> None:
    expected = (
        "error: the database has no table(s) extractions, messages, topics, atoms yet; run "
        "`embedding-pipeline schema` (or `ingest`) first\n"
    )
    for command in (["search", "why"], ["status"], ["backlog"], ["model", "status"]):
        assert run_cli(*command, DATABASE_URL=fresh_database_url) == (2, expected)


def test_the_openai_provider_without_its_extra_is_refused_naming_it(
    run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `openai` client is an extra; a runtime install without it says which."""
    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
    assert run_cli("status", EP_EMBEDDING_PROVIDER="openai", OPENAI_API_KEY="sk-x") == (
        2,
        "error: EP_EMBEDDING_PROVIDER: the openai provider needs the 'openai' package: "
        "pip install 'embedding_pipeline[openai]'\n",
    )


def test_an_unreachable_database_is_one_line_without_the_password(run_cli) -> None:
    code, err = run_cli("status", DATABASE_URL="postgresql://app:s3cr3t-pw@127.0.0.1:1/app")
    assert code == 2
    assert err.startswith(
        "error: the database is unreachable: connection failed: connection to server at "
        '"127.0.0.1", port 1 failed'
    )
    assert err.count("\n") == 1 and "s3cr3t" not in err


@pytest.mark.parametrize("command", [["status"], ["materialize"], ["check"], ["search", "x"]])
def test_openai_without_a_key_is_named_before_anything_runs(run_cli, command) -> None:
    assert run_cli(
        *command, EP_EMBEDDING_PROVIDER="openai", EP_EMBEDDING_DIMENSIONS="384", OPENAI_API_KEY=None
    ) == (
        2,
        "error: EP_EMBEDDING_PROVIDER is openai but OPENAI_API_KEY is not set (for an "
        "OpenAI-compatible server that wants no key, any value will do)\n",
    )


def test_a_failed_materialization_prints_the_reason_in_one_line(
    run_cli, baseline, small_data: Settings
) -> None:
    """A model of another size than the columns: each embedding step refuses before it
    claims a row (SchemaError); the run's log has one line per event and the error names
    every step once."""
    code, err = run_cli(
        "materialize",
        EP_EMBEDDING_PROVIDER="openai",
        EP_EMBEDDING_DIMENSIONS="256",
        OPENAI_API_KEY="sk-test-key-never-shown",
    )
    lines = err.splitlines()
    assert code == 2
    assert lines[-1] == (
        "error: materialize_all failed: atom_embeddings, message_embeddings, topic_embeddings: "
        "messages.embedding holds vector(384) but the configured model produces 256 "
        "dimensions; switch models with `embedding-pipeline model switch` instead of editing "
        "the column"
    )
    # one run: the embedding steps fail, the checks after them are not executed
    events = (" - STEP_FAILURE - ", "RUN_FAILURE", "were not executed", "Not executing")
    assert all(any(e in line for e in events) for line in lines[:-1])
    assert "Traceback" not in err and "Stack Trace" not in err
    assert "sk-test-key" not in err
    assert _snapshot(small_data.effective_database_url) == baseline


def test_failing_checks_are_named_with_their_reasons(run_cli, baseline, small_data) -> None:
    # the topics are not embedded, and (with a freshness limit of 0.06 s) overdue
    code, err = run_cli("check", "--table", "topics", EP_FRESHNESS_WARN_MINUTES="0.001")
    assert code == 2
    assert err.startswith(
        "error: asset checks failed with ERROR: topic_embeddings.no_missing_embeddings ("
    )
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _snapshot(small_data.effective_database_url) == baseline


def _subprocess(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def deep_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "deep.json"
    path.write_text('{"id": 1, "messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    yield path


def test_the_command_itself_prints_no_traceback(
    deep_file: Path, small_data: Settings, baseline, tmp_path: Path
) -> None:
    """As a user runs it: deep nesting (a RecursionError inside json) and a malformed
    DATABASE_URL end in one line and exit code 2."""
    env = {"DATABASE_URL": small_data.effective_database_url, "DAGSTER_HOME": str(tmp_path)}
    deep = _subprocess(["ingest", str(deep_file)], env)
    assert (deep.returncode, deep.stderr) == (
        2,
        f"error: {deep_file}: line 1 column 100022: JSON nested 100001 levels deep, too deep "
        "to read\n",
    )
    bad_url = _subprocess(["status"], {**env, "DATABASE_URL": SECRET_URL})
    assert bad_url.returncode == 2
    assert bad_url.stderr.startswith("error: DATABASE_URL (postgresql://app:***@db.internal")
    assert bad_url.stderr.count("\n") == 1 and "s3cr3t" not in bad_url.stderr
    assert _snapshot(small_data.effective_database_url) == baseline
