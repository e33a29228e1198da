"""Switching models: from the 384-dimension local model to a 768-dimension model served
over the Ollama protocol (a real local HTTP server), through the CLI; search staying on
the old vectors until the swap; a stale configuration refused; an interrupted switch
resumed; a switch of another size never silently replacing one in progress."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import EmbeddingError, LocalEmbedder, build_embedder
from embedding_pipeline.lib.engine.model_switch import (
    abort_switch,
    fill_shadow,
    model_status,
    prepare_shadow,
    shadow_spec,
    switch_models,
)
from embedding_pipeline.lib.quality.index import index_scans
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import index_state, vector_column_dimension
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.lib.store.schema import SchemaError
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.vectors import fake_vector
from embedding_pipeline_tests.support.database import embed_small_chat
from embedding_pipeline_tests.support.incremental import (
    HashEmbedder,
    HashEmbedderResource,
    insert_messages,
)

OLLAMA_MODEL = "nomic-embed-text"
#: nomic-embed-text with its own prompts (search_query: / search_document:) in the id.
OLLAMA_ID = f"ollama:{OLLAMA_MODEL}+prompts:03aa22a9"
TABLES = ("messages", "topics", "atoms")


@pytest.fixture
def populated(fresh_database_url: str) -> Settings:
    """The small chat embedded with the local model, with HNSW indexes."""
    return embed_small_chat(Settings(database_url=fresh_database_url))


@pytest.fixture
def ollama(httpserver: HTTPServer) -> list[list[str]]:
    """An Ollama-protocol server answering 768-dimension vectors; returns the inputs seen."""
    seen: list[list[str]] = []

    def embed(request: Request) -> Response:
        body = json.loads(request.data)
        assert body["model"] == OLLAMA_MODEL
        seen.append(list(body["input"]))
        vectors = [fake_vector(text, 768).tolist() for text in body["input"]]
        return Response(
            json.dumps({"model": OLLAMA_MODEL, "embeddings": vectors}),
            content_type="application/json",
        )

    httpserver.expect_request("/api/embed", method="POST").respond_with_handler(embed)
    return seen


def counts(url: str) -> dict[str, int]:
    with db.connection(url, vector=False) as conn:
        return {
            t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # noqa: S608
            for t in TABLES
        }


def test_cli_switch_from_local_to_a_768_dimension_ollama_model(
    populated, ollama, httpserver, monkeypatch, tmp_path, capsys
):
    url = populated.effective_database_url
    rows = counts(url)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("OLLAMA_HOST", httpserver.url_for("").rstrip("/"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    from embedding_pipeline import cli

    assert cli.main(["model", "switch", "--provider", "ollama", "--model", OLLAMA_MODEL]) == 0
    out = capsys.readouterr().out
    assert "EP_EMBEDDING_PROVIDER=ollama EP_EMBEDDING_MODEL=nomic-embed-text" in out
    assert sum(len(batch) for batch in ollama) == sum(rows.values())

    with db.connection(url) as conn:
        for spec in populated.tables.values():
            assert vector_column_dimension(conn, spec) == 768
            assert vector_column_dimension(conn, shadow_spec(spec)) is None
            assert index_state(conn, hnsw_index_name(spec)) == "valid"
            models = conn.execute(
                f"SELECT embedding_model, count(*) FROM {spec.table} GROUP BY 1"  # noqa: S608
            ).fetchall()
            assert models == [(OLLAMA_ID, rows[spec.table])]
            assert model_status(conn, spec).registered_model == OLLAMA_ID
    assert all(text.startswith("search_document: ") for batch in ollama for text in batch)
    searcher = Searcher(
        populated,
        embedder=build_embedder("ollama", model=OLLAMA_MODEL, ollama_host=httpserver.url_for("")),
    )
    engine = engine_for(url)
    text = "The nightly backup job failed again with a disk full error."
    with engine.connect() as conn:
        # the stored vector of that message (hash vectors mean nothing: a query would
        # find nothing nearer than chance), searched with the new model's id and index
        hits = searcher.search(conn, text, k=1, vector=fake_vector(f"search_document: {text}", 768))
    engine.dispose()
    assert hits[0].text.startswith("The nightly backup job failed")

    old_config = build_definitions(populated)
    result = dg.materialize(
        [old_config.get_assets_def("message_embeddings")],
        partition_key="2025-09-01",
        resources={"postgres": PostgresResource(database_url=url), "embedder": EmbedderResource()},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "holds vector(768)" in str(failure.step_failure_data.error)
    assert "model switch" in str(failure.step_failure_data.error)

    new_config = {
        "postgres": PostgresResource(database_url=url),
        "embedder": EmbedderResource(
            provider="ollama", model_name=OLLAMA_MODEL, ollama_host=httpserver.url_for("")
        ),
    }
    ollama.clear()
    with db.connection(url) as conn:
        insert_messages(conn, [datetime(2025, 9, 2, tzinfo=UTC)], chat_id=4242)
    result = dg.materialize(
        [old_config.get_assets_def("message_embeddings")],
        partition_key="2025-09-01",
        resources=new_config,
    )
    assert result.success
    assert sum(len(batch) for batch in ollama) == 1


def test_search_stays_on_the_old_vectors_until_the_swap(populated):
    url = populated.effective_database_url
    spec = populated.tables["messages"]
    searcher = Searcher(populated, embedder=LocalEmbedder())
    engine = engine_for(url)
    with engine.connect() as search_conn:
        before = searcher.search(search_conn, "disk full backup", k=3)
    with db.connection(url, vector=False) as conn:
        prepare_shadow(conn, spec, 768)
    with db.connection(url) as conn, engine.connect() as search_conn:
        fill_shadow(conn, spec, HashEmbedder(model_id="test:hash-768", dimension=768), batch_size=2)
        assert searcher.search(search_conn, "disk full backup", k=3) == before
        search_conn.exec_driver_sql("SET enable_seqscan = off")
        plan = searcher.explain(search_conn, "disk full backup", k=3)
        search_conn.rollback()
        assert hnsw_index_name(spec) in index_scans(plan)
        assert model_status(conn, spec).shadow_filled == counts(url)["messages"]
        assert abort_switch(conn, spec)
        assert vector_column_dimension(conn, shadow_spec(spec)) is None
        assert searcher.search(search_conn, "disk full backup", k=3) == before
    engine.dispose()


def test_runs_configured_for_the_old_model_are_refused_after_a_same_size_switch(populated):
    url = populated.effective_database_url
    specs = list(populated.tables.values())
    reports = switch_models(
        url, specs, HashEmbedder(model_id="test:hash"), populated.hnsw, batch_size=8
    )
    assert all(r.previous_model == "local:all-MiniLM-L6-v2-int8" for r in reports)
    assert sum(r.embedded for r in reports) == sum(counts(url).values())

    defs = build_definitions(populated)
    result = dg.materialize(
        [defs.get_assets_def("topic_embeddings")],
        partition_key="2025-10-01",
        resources={"postgres": PostgresResource(database_url=url), "embedder": EmbedderResource()},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "was switched to test:hash" in str(failure.step_failure_data.error)
    with db.connection(url) as conn:
        models = conn.execute("SELECT DISTINCT embedding_model FROM topics").fetchall()
    assert models == [("test:hash",)]

    result = dg.materialize(
        [defs.get_assets_def("topic_embeddings")],
        partition_key="2025-10-01",
        resources={
            "postgres": PostgresResource(database_url=url),
            "embedder": HashEmbedderResource(),
        },
    )
    assert result.success


def test_an_interrupted_switch_resumes_and_another_size_is_refused(populated):
    url = populated.effective_database_url
    spec = populated.tables["messages"]
    with db.connection(url) as conn:
        insert_messages(conn, [datetime(2025, 10, 9, tzinfo=UTC)] * 10, chat_id=77)
    total = counts(url)["messages"]
    with db.connection(url, vector=False) as conn:
        prepare_shadow(conn, spec, 768)
    failing = HashEmbedder(model_id="test:hash-768", dimension=768, fail_after_calls=2)
    with db.connection(url) as conn, pytest.raises(EmbeddingError):
        fill_shadow(conn, spec, failing, batch_size=3)
    with db.connection(url, vector=False) as conn:
        assert model_status(conn, spec).shadow_filled == 6
        with pytest.raises(SchemaError, match="--abort"):
            prepare_shadow(conn, spec, 1024)
        conn.rollback()
    resumed = HashEmbedder(model_id="test:hash-768", dimension=768)
    reports = switch_models(url, [spec], resumed, populated.hnsw, batch_size=3)
    assert reports[0].embedded == total - 6
    assert resumed.stats.texts == total - 6
    with db.connection(url, vector=False) as conn:
        assert vector_column_dimension(conn, spec) == 768
