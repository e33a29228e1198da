"""One real PostgreSQL+pgvector server for the session (started with the project's own
code), a fresh database per test module, and the settings and resources pointing at it."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import ChatExport, load_export, load_extraction
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, free_port
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.fault_server import Faults, FaultServer

DATA = Path(__file__).parent / "data"
SAMPLE = Path(__file__).parent.parent / "embedding_pipeline" / "sample_data"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """The session's server, in a temporary folder on a free port."""
    base = Path(tempfile.mkdtemp(prefix="ep-test-pg-"))
    server = EmbeddedPostgres(base / "pg", free_port())
    server.start()
    try:
        yield server
    finally:
        server.drop_data()


def create_database(server: EmbeddedPostgres, name: str) -> str:
    """(Re)create an empty database `name` on `server`; returns its URL."""
    name = re.sub(r"[^a-z0-9_]", "_", name.lower())[:60]
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url(name)


@pytest.fixture(scope="module")
def database_url(pg_server: EmbeddedPostgres, request: pytest.FixtureRequest) -> str:
    """A new, empty database for the test module."""
    return create_database(pg_server, request.module.__name__.split(".")[-1])


@pytest.fixture
def fresh_database_url(pg_server: EmbeddedPostgres, request: pytest.FixtureRequest) -> str:
    """A new, empty database for one test."""
    return create_database(pg_server, f"t_{request.node.name}")


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture(scope="module")
def resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "postgres": PostgresResource(database_url=settings.effective_database_url),
        "embedder": EmbedderResource(batch_size=16),
    }


@pytest.fixture(scope="module")
def defs(settings: Settings, resources: dict[str, dg.ConfigurableResource]) -> dg.Definitions:
    return build_definitions(settings, resources)


@pytest.fixture(scope="module")
def schema(settings: Settings) -> Settings:
    with db.connection(settings.effective_database_url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, LOCAL_MODEL_ID)
    return settings


def ingest_small_chat(settings: Settings) -> Settings:
    """The schema, then the small test chat and its extraction as one extraction."""
    with db.connection(settings.effective_database_url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, LOCAL_MODEL_ID)
    with db.connection(settings.effective_database_url) as conn:
        ingest(
            conn,
            settings,
            load_export(DATA / "small_export.json"),
            load_extraction(DATA / "small_extraction.json"),
        )
    return settings


def small_export_with_text(folder: Path, message_id: int, text: str) -> ChatExport:
    """The small test export with message `message_id`'s text replaced (as a newer export
    of the chat would have it), written to `folder` and loaded."""
    raw = json.loads((DATA / "small_export.json").read_text())
    next(m for m in raw["messages"] if m["id"] == message_id)["text"] = text
    path = folder / f"small_export_{message_id}_edited.json"
    path.write_text(json.dumps(raw))
    return load_export(path)


def embed_small_chat(settings: Settings) -> Settings:
    """`ingest_small_chat`, then every row embedded with the local model."""
    ingest_small_chat(settings)
    with db.connection(settings.effective_database_url) as conn:
        for spec in settings.tables.values():
            sync_embeddings(conn, spec, LocalEmbedder(), Window(), batch_size=16)
    return settings


def embed_months(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *names: str,
    start: str = "2025-09-01",
    end: str = "2025-10-01",
) -> dg.ExecuteInProcessResult:
    """Materialize the embedding assets `names` over the months `start` to `end` (by
    default the two the small test chat covers) in one run; it must succeed."""
    result = dg.materialize(
        [defs.get_assets_def(name) for name in names],
        resources=defs.resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": start,
            "dagster/asset_partition_range_end": end,
        },
    )
    assert result.success
    return result


@pytest.fixture(scope="module")
def small_data(schema: Settings) -> Settings:
    """The small test chat and its extraction, ingested once for the module."""
    return ingest_small_chat(schema)


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    with db.connection(settings.effective_database_url, vector=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A provider speaking the OpenAI and Ollama protocols (no faults until configured;
    inputs over 8,192 tokens refused, as OpenAI does)."""
    with FaultServer(Faults(max_input_tokens=8192)) as server:
        yield server
