"""Shared by the provider-fault tests: embedder resources pointing at a `FaultServer`,
Dagster runs of `message_embeddings` over one partition, and what the rows hold after."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import numpy as np

from embedding_pipeline.assets import build_embedding_asset
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.partitions import monthly_partitions
from embedding_pipeline.resources import EmbedderResource
from embedding_pipeline.settings import EngineSettings, Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline.testing.vectors import fake_vector
from embedding_pipeline_tests.support.incremental import insert_messages, materialization_metadata
from embedding_pipeline_tests.support.runs import materialize as materialize_asset

SECRET = "sk-test-FAULTS-7f3a9"
OPENAI_ID = "openai:text-embedding-3-small@384"
OLLAMA_ID = "ollama:all-minilm"
#: Retries fall due at once, so that consecutive runs each try a refused row again.
ENGINE = EngineSettings(row_retry_base_seconds=0, progress_interval_seconds=1)


def resource(provider: str, server: FaultServer, **options: Any) -> EmbedderResource:
    """The embedder resource of `provider` pointing at `server` (384 dimensions)."""
    options.setdefault("timeout_seconds", 5.0)
    options.setdefault("retry_deadline_seconds", 60.0)
    if provider == "openai":
        return EmbedderResource(
            provider="openai",
            dimensions=LOCAL_DIMENSION,
            openai_api_key=SECRET,
            openai_base_url=server.openai_base_url,
            **options,
        )
    return EmbedderResource(
        provider="ollama", model_name="all-minilm", ollama_host=server.url, **options
    )


def model_id(provider: str) -> str:
    return OPENAI_ID if provider == "openai" else OLLAMA_ID


def schema_for(url: str) -> Settings:
    settings = Settings(database_url=url, engine=ENGINE)
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, OPENAI_ID)
    return settings


def month_rows(settings: Settings, month: str, count: int, prefix: str) -> list[int]:
    """`count` new messages spread over the first day of `month` (a partition key)."""
    start = datetime.fromisoformat(month).replace(tzinfo=UTC)
    with db.connection(settings.effective_database_url) as conn:
        return insert_messages(
            conn, [start + timedelta(minutes=i) for i in range(count)], prefix=prefix
        )


def materialize(
    settings: Settings,
    embedder: EmbedderResource,
    partition: str,
    instance: dg.DagsterInstance,
) -> dg.ExecuteInProcessResult:
    """One Dagster run of `message_embeddings` for `partition`, failures returned."""
    asset = build_embedding_asset(
        "messages",
        settings.tables["messages"],
        settings,
        monthly_partitions(settings.partition_start),
    )
    return materialize_asset(asset, settings, embedder, partition, instance, raise_on_error=False)


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return materialization_metadata(result)["message_embeddings"]


def stored(settings: Settings, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """id -> (content, embedding, model, embedding hash, source hash) of the given rows."""
    with db.connection(settings.effective_database_url) as conn:
        rows = conn.execute(
            "SELECT id, content, embedding, embedding_model, embedding_hash, "
            "embedding_source_hash FROM messages WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    return {int(r[0]): tuple(r[1:]) for r in rows}


def assert_embedded(settings: Settings, ids: list[int], model: str) -> None:
    """Every row carries the fake provider's vector of its current text, by `model`."""
    rows = stored(settings, ids)
    assert sorted(rows) == sorted(ids)
    for row_id, (content, embedding, row_model, digest, _) in rows.items():
        assert embedding is not None, f"row {row_id} has no vector"
        np.testing.assert_allclose(embedding.to_numpy(), fake_vector(content), atol=1e-6)
        assert row_model == model
        assert digest == hashlib.sha256(content.encode()).hexdigest()
