"""EP_VECTOR_TYPE=halfvec: the column, its HNSW operator class, search and the checks follow
it; a model too large for `vector` is refused when the settings load; `model switch`
changes the storage type."""

from __future__ import annotations

from dataclasses import replace

import pytest

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LocalEmbedder
from embedding_pipeline.lib.engine.model_switch import switch_models
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import vector_column_type
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.lib.store.schema import SchemaError, ensure_schema
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.runner import run_embedding_checks
from embedding_pipeline.search import Searcher, engine_for
from embedding_pipeline.settings import EmbedderSettings, Settings, SettingsError, load_settings
from embedding_pipeline_tests.support.database import embed_small_chat

HALFVEC = EmbedderSettings(vector_type="halfvec")
LARGE = {"EP_EMBEDDING_PROVIDER": "openai", "EP_EMBEDDING_MODEL": "text-embedding-3-large"}


def test_a_model_too_large_for_vector_is_refused_when_the_settings_load():
    with pytest.raises(SettingsError, match=r"3072-dimension .* set EP_VECTOR_TYPE=halfvec"):
        load_settings(LARGE)
    assert load_settings({**LARGE, "EP_VECTOR_TYPE": "halfvec"}).embedder.vector_type == "halfvec"
    assert load_settings({**LARGE, "EP_EMBEDDING_DIMENSIONS": "1536"}).embedder.dimensions == 1536
    assert load_settings({"EP_VECTOR_TYPE": " HalfVec "}).embedder.vector_type == "halfvec"
    with pytest.raises(SettingsError, match="takes halfvec up to 4000"):
        load_settings({**LARGE, "EP_VECTOR_TYPE": "halfvec", "EP_EMBEDDING_DIMENSIONS": "4001"})


def opclass(conn, name: str) -> str:
    row = conn.execute(
        "SELECT opc.opcname FROM pg_index x JOIN pg_opclass opc ON opc.oid = x.indclass[0] "
        "WHERE x.indexrelid = to_regclass(%s)",
        (name,),
    ).fetchone()
    return str(row[0])


def test_a_halfvec_column_is_indexed_searched_and_checked(fresh_database_url, instance):
    settings = embed_small_chat(Settings(database_url=fresh_database_url, embedder=HALFVEC))
    with db.connection(fresh_database_url, vector=False) as conn:
        for spec in settings.tables.values():
            assert vector_column_type(conn, spec) == ("halfvec", 384)
            assert opclass(conn, hnsw_index_name(spec)) == "halfvec_cosine_ops"
            missing = conn.execute(
                f"SELECT count(*) FROM {spec.table} WHERE embedding IS NULL"  # noqa: S608
            ).fetchone()
            assert missing == (0,)

    searcher = Searcher(settings, embedder=LocalEmbedder())
    engine = engine_for(fresh_database_url)
    with engine.connect() as conn:
        for mode in ("vector", "hybrid"):
            [hit] = searcher.search(conn, "backup disk full", table="atoms", k=1, mode=mode)
            assert hit.key == "a-1"
        plan = str(searcher.explain(conn, "backup disk full", table="atoms", k=1))
        [near] = searcher.similar(conn, "atoms", hit.id, k=1)
    engine.dispose()
    assert "embedding <=>" in plan and near.id != hit.id

    resources = {
        "postgres": PostgresResource(database_url=fresh_database_url),
        "embedder": EmbedderResource(),
    }
    run = run_embedding_checks(
        settings, defs=build_definitions(settings, resources), instance=instance
    )
    outcomes = {(o.asset, o.check): o for o in run.outcomes}
    assert all(o.passed for o in run.outcomes), [o for o in run.outcomes if not o.passed]
    present = outcomes[("atom_embeddings", "hnsw_index_present")]
    assert present.metadata["opclass"] == "halfvec_cosine_ops"
    assert outcomes[("atom_embeddings", "dimension_matches_model")].metadata["column_type"] == (
        "halfvec(384)"
    )
    assert outcomes[("message_embeddings", "search_recall")].passed

    # the same column with EP_VECTOR_TYPE=vector: the schema refuses, the check fails
    as_vector = replace(settings, embedder=EmbedderSettings())
    with (
        db.connection(fresh_database_url, vector=False) as conn,
        pytest.raises(SchemaError, match="model switch --vector-type vector"),
    ):
        ensure_schema(conn, as_vector, 384)
    run = run_embedding_checks(
        as_vector, defs=build_definitions(as_vector, resources), instance=instance
    )
    dimension = next(o for o in run.outcomes if o.check == "dimension_matches_model")
    assert not dimension.passed and "EP_VECTOR_TYPE is vector" in dimension.description


def test_model_switch_changes_the_storage_type(fresh_database_url):
    settings = embed_small_chat(Settings(database_url=fresh_database_url))
    specs = list(settings.tables.values())
    switch_models(
        fresh_database_url,
        specs,
        LocalEmbedder(),
        settings.hnsw,
        batch_size=16,
        vector_type="halfvec",
    )
    with db.connection(fresh_database_url, vector=False) as conn:
        for spec in specs:
            assert vector_column_type(conn, spec) == ("halfvec", 384)
            assert opclass(conn, hnsw_index_name(spec)) == "halfvec_cosine_ops"
        ensure_schema(conn, replace(settings, embedder=HALFVEC), 384)  # now the configuration
    searcher = Searcher(replace(settings, embedder=HALFVEC), embedder=LocalEmbedder())
    engine = engine_for(fresh_database_url)
    with engine.connect() as conn:
        [hit] = searcher.search(conn, "what do we eat on Friday", table="atoms", k=1)
    engine.dispose()
    assert hit.key == "a-3"
