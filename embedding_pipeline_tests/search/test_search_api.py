"""The Python search API against the real database and the real local model: hits and
their fields, every filter, hybrid ranking on keyword queries, sync and async
connections and sessions, the caller's transaction left alone, similar rows and lookups,
bad input, the model-mismatch refusal, iterative index scans on a selective filter, the
CLI, and the quality figures in docs/search.md."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from pgvector.psycopg import register_vector
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from embedding_pipeline.lib.embedders import LocalEmbedder
from embedding_pipeline.lib.engine.model_switch import switch_models
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.quality.index import index_scans
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import build_hnsw_index_concurrently, hnsw_index_name
from embedding_pipeline.lib.store.schema import SchemaError, ensure_schema
from embedding_pipeline.search import (
    InvalidQuery,
    ModelMismatch,
    NotFound,
    Searcher,
    api,
    engine_for,
)
from embedding_pipeline.search.evaluation import (
    QUESTIONS,
    QUESTIONS_ATOMS_TOPICS,
    QUESTIONS_ATOMS_TOPICS_ES,
    evaluate,
    load_questions,
)
from embedding_pipeline.settings import SearchSettings, Settings, load_settings
from embedding_pipeline_tests.support.database import ingest_small_chat
from embedding_pipeline_tests.support.incremental import HashEmbedder
from embedding_pipeline_tests.support.paths import ROOT
from embedding_pipeline_tests.support.search import sample_settings

DOCS = ROOT / "docs" / "search.md"
FRIDAY = "Why did the deployment fail on Friday?"


@pytest.fixture(scope="module")
def sample(pg_server) -> Settings:
    return sample_settings(pg_server)


@pytest.fixture(scope="module")
def searcher(sample: Settings) -> Searcher:
    return Searcher(sample, embedder=LocalEmbedder())


@pytest.fixture(scope="module")
def engine(sample: Settings) -> Iterator[sa.Engine]:
    engine = engine_for(sample.effective_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as connection:
        yield connection


def message_id(conn: sa.Connection, telegram_id: int) -> int:
    return int(
        conn.exec_driver_sql(
            "SELECT id FROM messages WHERE telegram_message_id = %(t)s", {"t": telegram_id}
        ).scalar_one()
    )


def test_hits_carry_the_rows_fields(searcher, conn):
    [hit] = searcher.search(conn, "OOMKilled exit code 137", k=1)
    assert hit.table == "messages"
    assert "OOMKilled" in hit.text
    assert (hit.author, hit.author_id, hit.topic) == (
        "Oleg Kuznetsov",
        "user581203311",
        "k8s-outage",
    )
    assert hit.time == datetime(2025, 10, 10, 17, 0, 8, tzinfo=UTC)
    assert hit.vector_rank == 1 and hit.text_rank is None
    assert 0.0 < hit.score < 1.0

    [atom] = searcher.search(
        conn, "Android 14 crash when opening an offline trip", table="atoms", k=1
    )
    assert (atom.key, atom.kind, atom.topic) == ("atom-rel-007", "solution", "release-2-4")
    assert atom.title == "Android 14 crash on offline trips fixed"
    assert atom.text.startswith(atom.title + "\n")

    [topic] = searcher.search(conn, "double charge refunds", table="topics", k=1, mode="hybrid")
    assert (topic.key, topic.topic, topic.topic_id) == (
        "billing-double-charge",
        "billing-double-charge",
        topic.id,
    )
    assert topic.title == "Customer double charge bug"


def test_the_friday_question_and_a_date_filter_that_excludes_october(searcher, conn):
    hits = searcher.search(conn, FRIDAY, k=3)
    assert len(hits) == 3
    assert all("deploy" in h.text.lower() for h in hits)
    assert all(h.time and h.time.month == 10 for h in hits)
    before = searcher.search(conn, FRIDAY, k=3, filters={"until": "2025-10-01"})
    assert len(before) == 3
    assert {h.id for h in before}.isdisjoint(h.id for h in hits)
    assert all(h.time < datetime(2025, 10, 1, tzinfo=UTC) for h in before)
    hybrid = searcher.search(conn, FRIDAY, k=3, mode="hybrid")
    assert len(hybrid) == 3 and all(h.vector_rank or h.text_rank for h in hybrid)
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)


def test_time_bounds_are_inclusive_then_exclusive(searcher, conn):
    ticket = message_id(conn, 273)
    sent = conn.exec_driver_sql(
        "SELECT sent_at FROM messages WHERE id = %(i)s", {"i": ticket}
    ).scalar_one()
    text = dict(k=5, mode="text")
    assert ticket in {
        h.id for h in searcher.search(conn, "ticket 48213", filters={"since": sent}, **text)
    }
    assert ticket not in {
        h.id for h in searcher.search(conn, "ticket 48213", filters={"until": sent}, **text)
    }
    naive = sent.astimezone(UTC).replace(tzinfo=None).isoformat()
    assert ticket in {
        h.id for h in searcher.search(conn, "ticket 48213", filters={"since": naive}, **text)
    }


def test_author_topic_extraction_and_kind_filters(searcher, conn):
    marcus = "user490331276"
    hits = searcher.search(conn, "deploy rollback", k=10, filters={"author": marcus}, mode="hybrid")
    assert len(hits) == 10 and {h.author_id for h in hits} == {marcus}

    by_key = searcher.search(conn, "slow query", k=10, filters={"topic": "pg-upgrade"})
    topic_id = by_key[0].topic_id
    by_id = searcher.search(conn, "slow query", k=10, filters={"topic": topic_id})
    assert [h.id for h in by_key] == [h.id for h in by_id]
    assert {h.topic for h in by_key} == {"pg-upgrade"} and len(by_key) == 10

    decisions = searcher.search(
        conn, "what did we decide", table="atoms", k=10, filters={"kind": "decision"}
    )
    count = conn.exec_driver_sql("SELECT count(*) FROM atoms WHERE kind = 'decision'").scalar()
    assert len(decisions) == count == 9 and {h.kind for h in decisions} == {"decision"}

    extraction = conn.exec_driver_sql("SELECT max(id) FROM extractions").scalar_one()
    assert len(searcher.search(conn, "upgrade", k=5, filters={"extraction": extraction})) == 5
    assert searcher.search(conn, "upgrade", k=5, filters={"extraction": extraction + 1}) == []

    atoms = searcher.search(conn, "payments", table="atoms", k=5, filters={"author": marcus})
    topics = searcher.search(conn, "payments", table="topics", k=5, filters={"author": marcus})
    assert atoms and topics
    for hit in atoms:
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM atoms_messages l JOIN messages m ON m.id = l.message_id "
            "WHERE l.atom_id = %(a)s AND m.author_id = %(u)s",
            {"a": hit.id, "u": marcus},
        ).scalar_one()
    for hit in topics:
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM messages WHERE topic_id = %(t)s AND author_id = %(u)s",
            {"t": hit.id, "u": marcus},
        ).scalar_one()


@pytest.mark.parametrize(
    ("query", "telegram_id"), [("ticket 48213", 273), ("ComparisonError", 233)]
)
def test_hybrid_finds_a_keyword_that_vector_search_misses(searcher, conn, query, telegram_id):
    wanted = message_id(conn, telegram_id)
    assert wanted not in {h.id for h in searcher.search(conn, query, k=5)}
    [text_hit] = [h for h in searcher.search(conn, query, k=5, mode="text") if h.id == wanted]
    assert text_hit.text_rank == 1
    hybrid = searcher.search(conn, query, k=5, mode="hybrid")
    assert wanted in {h.id for h in hybrid[:2]}
    assert next(h for h in hybrid if h.id == wanted).text_rank == 1


def test_connections_sessions_and_async_give_the_same_hits(searcher, engine, sample, monkeypatch):
    options = dict(k=5, mode="hybrid", filters={"since": "2025-09-01"})
    with engine.connect() as conn:
        expected = searcher.search(conn, "double charge", **options)
    with Session(engine) as session:
        assert searcher.search(session, "double charge", **options) == expected
    monkeypatch.setattr(api, "default_searcher", lambda: searcher)
    with engine.connect() as conn:
        assert api.search(conn, "double charge", **options) == expected
    url = sample.effective_database_url.replace("postgresql://", "postgresql+psycopg_async://")

    async def run() -> tuple[list, list, list]:
        async_engine = create_async_engine(url)
        try:
            async with async_engine.connect() as aconn:
                first = await searcher.search_async(aconn, "double charge", **options)
                similar = await api.similar_async(aconn, "messages", expected[0].id, k=3)
            async with AsyncSession(async_engine) as session:
                second = await searcher.search_async(session, "double charge", **options)
            return first, second, similar
        finally:
            await async_engine.dispose()

    first, second, similar = asyncio.run(run())
    assert first == expected and second == expected
    with engine.connect() as conn:
        assert similar == searcher.similar(conn, "messages", expected[0].id, k=3)


def test_search_leaves_the_callers_transaction_and_settings_alone(searcher, conn):
    with conn.begin():
        conn.exec_driver_sql("SET LOCAL hnsw.ef_search = 17")
        assert searcher.search(conn, "disk full", k=3, filters={"author": "user581203311"})
        assert conn.in_transaction()
        assert conn.exec_driver_sql("SHOW hnsw.ef_search").scalar_one() == "17"
        assert conn.exec_driver_sql("SHOW hnsw.iterative_scan").scalar_one() == "off"
    assert searcher.search(conn, "disk full", k=3)
    assert not conn.in_transaction()
    assert conn.exec_driver_sql("SHOW hnsw.ef_search").scalar_one() == "40"
    conn.rollback()


def test_similar_rows_and_lookups(searcher, conn):
    oom = message_id(conn, 226)
    hits = searcher.similar(conn, "messages", oom, k=5)
    assert len(hits) == 5 and oom not in {h.id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(
        h.time < datetime(2025, 10, 1, tzinfo=UTC)
        for h in searcher.similar(conn, "messages", oom, k=5, filters={"until": "2025-10-01"})
    )
    with pytest.raises(NotFound, match="no row with id 999999"):
        searcher.similar(conn, "messages", 999_999)

    atoms = searcher.atoms_for_message(conn, message_id(conn, 273))
    assert "atom-bill-001" in {a.key for a in atoms}
    assert searcher.atoms_for_message(conn, message_id(conn, 5)) == []  # a message without atoms
    with pytest.raises(NotFound):
        searcher.atoms_for_message(conn, 999_999)

    by_key = searcher.messages_for_topic(conn, "billing-double-charge", limit=100)
    assert len(by_key) > 10 and {m.topic for m in by_key} == {"billing-double-charge"}
    assert [m.time for m in by_key] == sorted(m.time for m in by_key)
    assert searcher.messages_for_topic(conn, by_key[0].topic_id, limit=100) == by_key
    assert searcher.messages_for_topic(conn, str(by_key[0].topic_id), limit=100) == by_key
    assert len(searcher.messages_for_topic(conn, "billing-double-charge", limit=3)) == 3
    with pytest.raises(NotFound):
        searcher.messages_for_topic(conn, "no-such-topic")


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        ({"query": ""}, "query", "must not be empty"),
        ({"query": "   "}, "query", "must not be empty"),
        ({"k": 0}, "k", "from 1 to 100"),
        ({"k": 101}, "k", "from 1 to 100"),
        ({"table": "users"}, "table", "unknown table 'users'"),
        ({"mode": "fuzzy"}, "mode", "unknown mode 'fuzzy'"),
        ({"filters": {"colour": "red"}}, "filters.colour", "unknown field; expected one of since"),
        ({"filters": {"since": "last week"}}, "filters.since", "valid datetime"),
        ({"filters": {"since": 1700000000}}, "filters.since", "ISO 8601"),
        ({"filters": {"kind": "decision"}}, "filters.kind", "does not apply to messages"),
        ({"filters": {"since": "2025-10-02", "until": "2025-10-01"}}, "filters.until", "later"),
        ({"vector": [0.1, 0.2]}, "vector", "expected 384 numbers"),
        ({"query": "deploy\x00"}, "query", "NUL"),
        ({"query": "\ud800deploy"}, "query", "lone surrogate"),
        ({"query": "x" * 2001}, "query", "at most 2000 characters long, got 2001"),
        ({"filters": {"author": "a\x00"}}, "filters.author", "NUL"),
        ({"filters": {"topic": 2**63}}, "filters.topic", "from 1 to 9223372036854775807"),
        ({"filters": {"topic": "²"}}, "filters.topic", "digits 0-9"),
        ({"filters": {"extraction": 2**63}}, "filters.extraction", "less than or equal"),
    ],
)
def test_bad_input_is_refused_naming_the_field(searcher, conn, options, field, reason):
    arguments = {"query": "deploy", **options}
    with pytest.raises(InvalidQuery) as caught:
        searcher.search(conn, arguments.pop("query"), **arguments)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not conn.in_transaction()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s, c: s.similar(c, "messages", 2**63), "id"),
        (lambda s, c: s.similar(c, "messages", 0), "id"),
        (lambda s, c: s.atoms_for_message(c, 2**63), "message_id"),
        (lambda s, c: s.messages_for_topic(c, 2**63), "topic"),
        (lambda s, c: s.messages_for_topic(c, "99999999999999999999"), "topic"),
        (lambda s, c: s.messages_for_topic(c, "²"), "topic"),
        (lambda s, c: s.messages_for_topic(c, "k\x00"), "topic"),
    ],
    ids=["similar-huge", "similar-0", "atoms-huge", "topic-huge", "topic-digits", "topic-²", "nul"],
)
def test_lookups_refuse_ids_beyond_bigint_and_unstorable_keys(searcher, conn, call, field):
    with pytest.raises(InvalidQuery) as caught:
        call(searcher, conn)
    assert caught.value.field == field and "\n" not in str(caught.value)
    assert not conn.in_transaction()


def test_a_column_of_another_model_is_refused(fresh_database_url):
    settings = ingest_small_chat(Settings(database_url=fresh_database_url))
    spec = settings.tables["messages"]
    with db.connection(fresh_database_url) as pg:
        sync_embeddings(pg, spec, HashEmbedder(model_id="test:hash"), Window(), batch_size=64)
    engine = engine_for(fresh_database_url)
    local = Searcher(settings, embedder=LocalEmbedder())
    hashed = Searcher(settings, embedder=HashEmbedder(model_id="test:hash"))
    try:
        with engine.connect() as conn:
            with pytest.raises(ModelMismatch, match=r"test:hash \(stored with its vectors\)"):
                local.search(conn, "backup", k=3)
            assert local.embedder.stats.calls == 0  # refused before the query was embedded
            assert local.search(conn, "backup", k=3, mode="text")
            assert len(hashed.search(conn, "backup", k=3)) == 3

        switch_models(
            fresh_database_url,
            [spec],
            HashEmbedder(model_id="test:hash-b"),
            settings.hnsw,
            batch_size=64,
        )
        with engine.connect() as conn:
            with pytest.raises(
                ModelMismatch, match=r"test:hash-b \(registered by `model switch`\)"
            ):
                hashed.search(conn, "backup", k=3, mode="hybrid")
            switched = Searcher(settings, embedder=HashEmbedder(model_id="test:hash-b"))
            assert len(switched.search(conn, "backup", k=3)) == 3
    finally:
        engine.dispose()


def _synthetic_messages(url: str, settings: Settings, rows: int, model_id: str) -> np.ndarray:
    """`rows` messages: 90% by `common` with vectors around the query, 10% by `rare` with
    vectors around a far point, so the query's nearest neighbours are all `common`; no
    B-tree index on the author. Returns the query vector."""
    rng = np.random.default_rng(7)
    query, far = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 384)))
    spec = settings.tables["messages"]
    with psycopg.connect(url) as conn:
        ensure_schema(conn, settings, 384)
        register_vector(conn)
        # loaded first, indexed after: quicker than inserting into the graph row by row;
        # without the author index the planner reads the few rare rows through it itself
        conn.execute(
            sql.SQL("DROP INDEX {}, messages_author_id_idx").format(
                sql.Identifier(hnsw_index_name(spec))
            )
        )
        columns = (
            "chat_id, telegram_message_id, author_id, sent_at, content, embedding, embedding_model"
        )
        with conn.cursor().copy(
            f"COPY messages ({columns}) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int8", "text", "timestamptz", "text", "vector", "text"])
            for i in range(rows):
                rare = i % 10 == 0
                vector = (far if rare else query) + rng.normal(scale=0.06, size=384)
                copy.write_row(
                    [
                        1,
                        i,
                        "rare" if rare else "common",
                        datetime(2025, 1, 1, tzinfo=UTC),
                        f"message {i}",
                        (vector / np.linalg.norm(vector)).astype(np.float32),
                        model_id,
                    ]
                )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        build_hnsw_index_concurrently(conn, spec, settings.hnsw)
        conn.execute("ANALYZE messages")
    return query


def test_a_selective_filter_returns_k_rows_only_with_iterative_scans_or_an_exact_scan(
    fresh_database_url,
):
    settings = Settings(database_url=fresh_database_url)
    embedder = HashEmbedder(model_id="test:synthetic")
    query = _synthetic_messages(fresh_database_url, settings, 3_000, embedder.model_id)
    engine = engine_for(fresh_database_url)
    index = hnsw_index_name(settings.tables["messages"])
    found: dict[str, list[int]] = {}
    try:
        with engine.connect() as conn:
            with conn.begin():  # the exact answer: a sequential scan and sort
                conn.exec_driver_sql("SET LOCAL enable_indexscan = off")
                exact = (
                    conn.exec_driver_sql(
                        "SELECT id FROM messages WHERE author_id = 'rare' "
                        "ORDER BY embedding <=> %(q)s::vector LIMIT 10",
                        {"q": str(query.tolist())},
                    )
                    .scalars()
                    .all()
                )
            assert len(exact) == 10
            for mode in ("off", "relaxed_order", "strict_order"):
                search = SearchSettings(iterative_scan=mode, exact_below_rows=0)
                searcher = Searcher(replace(settings, search=search), embedder=embedder)
                options = dict(k=10, vector=query, filters={"author": "rare"})
                hits = searcher.search(conn, "q", **options)
                assert {h.author_id for h in hits} <= {"rare"}
                found[mode] = [h.id for h in hits]
                plan = searcher.explain(conn, "q", analyze=True, **options)
                assert index in index_scans(plan), plan
            # by default, a filter keeping 300 rows is answered by an exact scan of them
            searcher = Searcher(settings, embedder=embedder)
            found["exact"] = [h.id for h in searcher.search(conn, "q", **options)]
            assert index not in index_scans(searcher.explain(conn, "q", **options))
    finally:
        engine.dispose()
    assert len(found["off"]) < 10
    for mode in ("relaxed_order", "strict_order"):
        assert len(found[mode]) == 10
        assert len(set(found[mode]) & set(exact)) >= 9
    assert found["exact"] == exact


def test_cli_search_json_and_its_errors(sample, monkeypatch, tmp_path, capsys):
    from embedding_pipeline import cli

    monkeypatch.setenv("DATABASE_URL", sample.effective_database_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    argv = ["search", FRIDAY, "-k", "2", "--mode", "hybrid", "--until", "2025-10-01", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "hybrid" and set(out["results"]) == {"messages", "topics", "atoms"}
    assert all(
        len(hits) == 2 and all(h["time"] < "2025-10-01" for h in hits)
        for key, hits in out["results"].items()
        if key == "messages"
    )
    assert cli.main(["search", "decisions", "--kind", "decision", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {"atoms"}
    assert cli.main(["search", "x", "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: filters.since: ") and err.count("\n") == 1


QUALITY_ROW = re.compile(
    r"^\| ([\w.]+\.json) \(\d+\) \| all-MiniLM-L6-v2 \| (vector|text|hybrid) \| "
    r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
    re.M,
)


@pytest.mark.parametrize(
    "path", [QUESTIONS, QUESTIONS_ATOMS_TOPICS, QUESTIONS_ATOMS_TOPICS_ES], ids=lambda p: p.name
)
def test_the_quality_tables_in_the_docs_are_what_the_questions_measure(searcher, conn, path):
    """docs/search.md's figures of the local model on each labelled set are measured, and
    hybrid is at least as good as the better single mode (recall@5 and MRR, within 0.01)."""
    questions = load_questions(path)
    assert len(questions) >= 30
    result = evaluate(conn, searcher, questions)
    documented = {
        mode: tuple(float(x) for x in figures)
        for name, mode, *figures in QUALITY_ROW.findall(DOCS.read_text())
        if name == path.name
    }
    measured = {
        mode: (round(f.recall, 3), round(f.mrr, 3), round(f.ndcg, 3))
        for mode in result.modes
        for f in [result.overall(mode)]
    }
    assert documented == measured
    hybrid = result.overall("hybrid")
    for single in ("vector", "text"):
        assert hybrid.recall >= result.overall(single).recall - 0.01
        assert hybrid.mrr >= result.overall(single).mrr - 0.01


def test_search_settings_come_from_the_environment():
    env = {
        "EP_SEARCH_TEXT_LANGUAGE": "simple",
        "EP_SEARCH_RRF_K": "30",
        "EP_SEARCH_HYBRID_CANDIDATES": "80",
        "EP_SEARCH_ITERATIVE_SCAN": "STRICT_ORDER",
        "EP_SEARCH_MAX_SCAN_TUPLES": "5000",
        "EP_SEARCH_EXACT_BELOW_ROWS": "0",
    }
    assert load_settings(env).search == SearchSettings(
        text_language="simple",
        rrf_k=30,
        hybrid_candidates=80,
        iterative_scan="strict_order",
        max_scan_tuples=5000,
        exact_below_rows=0,
    )
    assert load_settings({}).search == SearchSettings()
    with pytest.raises(ValueError, match="EP_SEARCH_ITERATIVE_SCAN must be one of off"):
        load_settings({"EP_SEARCH_ITERATIVE_SCAN": "sometimes"})
    with pytest.raises(ValueError, match="EP_SEARCH_RRF_K must be an integer"):
        load_settings({"EP_SEARCH_RRF_K": "sixty"})


def test_the_search_columns_follow_the_language_setting(fresh_database_url):
    settings = ingest_small_chat(Settings(database_url=fresh_database_url))
    lexemes = "SELECT tsvector_to_array(search_tsv) FROM atoms ORDER BY id LIMIT 1"
    with db.connection(fresh_database_url, vector=False) as conn:
        indexes = {
            r[0]
            for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        }
        assert {
            "messages_search_tsv_gin_idx",
            "messages_author_id_idx",
            "messages_topic_id_idx",
            "atoms_kind_idx",
            "atoms_topic_id_idx",
        } <= indexes
        english = set(conn.execute(lexemes).fetchone()[0])
        assert not ensure_schema(conn, settings, 384).changed
        simple = replace(settings, search=SearchSettings(text_language="simple"))
        report = ensure_schema(conn, simple, 384)
        # the tracking trigger computes the text vectors: a new language rewrites them
        assert set(report.created_triggers) == {
            "messages_embedding_tracking",
            "topics_embedding_tracking",
            "atoms_embedding_tracking",
        }
        plain = set(conn.execute(lexemes).fetchone()[0])
        assert plain != english and {"the", "and"} & plain and not {"the", "and"} & english
        with pytest.raises(SchemaError, match="'klingon' is not a text search configuration"):
            ensure_schema(
                conn, replace(settings, search=SearchSettings(text_language="klingon")), 384
            )
