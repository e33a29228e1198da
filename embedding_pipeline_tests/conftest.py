"""One real PostgreSQL+pgvector server for the session (started with the project's own
code), a fresh database per test module, and the settings and resources pointing at it.
The helpers the tests import are in `support/`; this file holds only fixtures and hooks.

Every test is marked with its group, the folder it lives in (`pytest -m search`); the
markers are registered in pyproject.toml and `--strict-markers` refuses any other."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, free_port
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.fault_server import Faults, FaultServer
from embedding_pipeline_tests.support.database import create_database, ingest_small_chat


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


#: The test groups: one folder and one marker each.
GROUPS = ("unit", "engine", "dagster", "search", "ui", "deployment")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its group, the folder below this one that holds it."""
    for item in items:
        group = item.path.resolve().relative_to(HERE).parts[0]
        if group not in GROUPS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of the folders {GROUPS}")
        item.add_marker(group)


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A provider speaking the OpenAI and Ollama protocols (no faults until configured;
    inputs over 8,192 tokens refused, as OpenAI does)."""
    with FaultServer(Faults(max_input_tokens=8192)) as server:
        yield server
