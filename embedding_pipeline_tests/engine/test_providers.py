"""The OpenAI and Ollama embedders against a real local HTTP server speaking their APIs
(pytest-httpserver, no client mocking): requests, answers, every kind of failure, and a
Dagster run that writes the vectors into the test database or fails without writing."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import dagster as dg
import numpy as np
import psycopg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from embedding_pipeline.assets import build_embedding_asset
from embedding_pipeline.lib.embedders import Embedder, EmbeddingError, build_embedder
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.lib.store import db
from embedding_pipeline.partitions import monthly_partitions
from embedding_pipeline.resources import EmbedderResource
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.vectors import b64, fake_vector
from embedding_pipeline_tests.support.incremental import figures
from embedding_pipeline_tests.support.runs import event_log_text, materialize

SECRET = "sk-test-SECRET123"
OPENAI_MODEL = "text-embedding-3-small"
OLLAMA_MODEL = "all-minilm"
#: The prompt tag of nomic-embed-text's own prompts (catalog.prompted_model_id).
NOMIC = "03aa22a9"
DIM = 384  # the test schema's vector(384)


# --- a fake provider: deterministic vectors, answers in each protocol ----------------------


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def openai_body(
    vectors: list[np.ndarray], encoding: str = "base64", rotate: bool = True
) -> dict[str, Any]:
    """A /v1/embeddings answer; `rotate` moves every item away from its index's place."""
    items = [
        {
            "object": "embedding",
            "index": i,
            "embedding": b64(v) if encoding == "base64" else [float(x) for x in v],
        }
        for i, v in enumerate(vectors)
    ]
    if rotate:
        items = items[1:] + items[:1]
    return {
        "object": "list",
        "data": items,
        "model": OPENAI_MODEL,
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


def ollama_body(vectors: list[np.ndarray]) -> dict[str, Any]:
    return {"model": OLLAMA_MODEL, "embeddings": [[float(x) for x in v] for v in vectors]}


@dataclass(frozen=True)
class Provider:
    """How to build one provider's embedder against a server, and how that server talks."""

    name: str
    path: str
    model: str
    body: Callable[[list[np.ndarray]], dict[str, Any]]
    error: Callable[[str], dict[str, Any]]

    def build(self, base_url: str, **options: Any) -> Embedder:
        """The embedder, by default without retries (each failure surfaces at once)."""
        options.setdefault("model", self.model)
        options.setdefault("timeout", 5.0)
        options.setdefault("retry", RetryPolicy(deadline_seconds=0))
        if self.name == "openai":
            return build_embedder(
                "openai",
                openai_api_key=SECRET,
                openai_base_url=f"{base_url.rstrip('/')}/v1",
                **options,
            )
        return build_embedder("ollama", ollama_host=base_url, **options)

    def answer(self, dim: int = DIM, count_delta: int = 0) -> Callable[[Request], Response]:
        """A handler answering `fake_vector(text, dim)` per input text (plus or minus
        `count_delta` vectors)."""

        def handler(request: Request) -> Response:
            texts = request.get_json()["input"]
            vectors = [fake_vector(t, dim) for t in texts]
            if count_delta < 0:
                vectors = vectors[:count_delta]
            vectors += [fake_vector(f"extra {i}", dim) for i in range(max(count_delta, 0))]
            return json_response(self.body(vectors))

        return handler


OPENAI = Provider(
    "openai",
    "/v1/embeddings",
    OPENAI_MODEL,
    openai_body,
    lambda message: {
        "error": {"message": message, "type": "invalid_request_error", "code": None, "param": None}
    },
)
OLLAMA = Provider(
    "ollama", "/api/embed", OLLAMA_MODEL, ollama_body, lambda message: {"error": message}
)
PROVIDERS = [pytest.param(OPENAI, id="openai"), pytest.param(OLLAMA, id="ollama")]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def root(httpserver: HTTPServer) -> str:
    return httpserver.url_for("")


def sent(httpserver: HTTPServer) -> list[dict[str, Any]]:
    """The JSON bodies of the requests the server received, in order."""
    return [request.get_json() for request, _ in httpserver.log]


# --- OpenAI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_openai_request_and_answer_in_index_order(httpserver: HTTPServer, encoding: str) -> None:
    texts = ["first text", "second text", "third text"]
    httpserver.expect_oneshot_request(
        "/v1/embeddings",
        method="POST",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": OPENAI_MODEL, "input": texts, "encoding_format": "base64"},
    ).respond_with_json(openai_body([fake_vector(t, 1536) for t in texts], encoding))
    embedder = OPENAI.build(root(httpserver))

    vectors = embedder.embed(texts)

    httpserver.check_assertions()  # the request matched: model, input, format, key
    assert embedder.model_id == f"openai:{OPENAI_MODEL}"
    assert vectors.dtype == np.float32 and vectors.shape == (3, 1536)
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t, 1536) for t in texts]), rtol=1e-6)
    assert embedder.stats.calls == 1 and embedder.stats.texts == 3


@pytest.mark.parametrize(
    ("dimensions", "model_id", "requested"),
    [
        (None, "openai:text-embedding-3-small", None),
        (1536, "openai:text-embedding-3-small", None),
        (384, "openai:text-embedding-3-small@384", 384),
    ],
)
def test_openai_dimensions_are_requested_and_named(
    httpserver: HTTPServer, dimensions: int | None, model_id: str, requested: int | None
) -> None:
    expected = dimensions or 1536
    httpserver.expect_request("/v1/embeddings").respond_with_handler(OPENAI.answer(expected))
    embedder = OPENAI.build(root(httpserver), dimensions=dimensions)

    vectors = embedder.embed(["a", "b"])

    assert embedder.model_id == model_id
    assert embedder.dimension == expected and vectors.shape == (2, expected)
    [body] = sent(httpserver)
    assert body.get("dimensions") == requested


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        pytest.param(
            {
                "data": [
                    {"index": 0, "embedding": [1.0, 2.0, 3.0]},
                    {"index": 0, "embedding": [1.0, 2.0, 3.0]},
                ]
            },
            r"indices \[0, 0\], expected 0\.\.1",
            id="duplicate-index",
        ),
        pytest.param(
            {"data": [{"index": 0, "embedding": "AAA"}, {"index": 1, "embedding": "AAAA"}]},
            "malformed embeddings",
            id="bad-base64",
        ),
        pytest.param(
            {
                "data": [
                    {"index": 0, "embedding": "AAAAAAA="},
                    {"index": 1, "embedding": "AAAAAAA="},
                ]
            },
            "not float32",
            id="base64-not-float32",
        ),
        pytest.param({"object": "list"}, "without a list of embeddings", id="no-data"),
    ],
)
def test_openai_malformed_answers_are_embedding_errors(
    httpserver: HTTPServer, answer: dict[str, Any], match: str
) -> None:
    httpserver.expect_request("/v1/embeddings").respond_with_json(answer)
    with pytest.raises(EmbeddingError, match=match):
        OPENAI.build(root(httpserver), dimensions=3).embed(["a", "b"])


def test_openai_key_and_url_credentials_stay_out_of_errors_and_repr() -> None:
    url = f"http://user:url-password@127.0.0.1:{closed_port()}/v1?token=query-secret"
    embedder = build_embedder(
        "openai",
        model=OPENAI_MODEL,
        openai_api_key=SECRET,
        openai_base_url=url,
        timeout=2,
        retry=RetryPolicy(deadline_seconds=0),
    )
    with pytest.raises(EmbeddingError, match="unreachable") as raised:
        embedder.embed(["a"])
    for text in (str(raised.value), repr(raised.value), repr(embedder)):
        assert "127.0.0.1" in text or "OpenAIEmbedder" in text
        for secret in (SECRET, "url-password", "query-secret"):
            assert secret not in text


def test_openai_key_echoed_across_the_truncation_point_is_still_removed(
    httpserver: HTTPServer,
) -> None:
    """Long error bodies echoing the key at every position around the point where the
    message is shortened: no prefix of the key may survive the cut."""
    embedder = OPENAI.build(root(httpserver))
    for offset in range(150, 330, 3):
        body = "x" * offset + f" {SECRET} " + "y" * 400
        httpserver.expect_oneshot_request("/v1/embeddings").respond_with_json(
            {"error": {"message": body, "type": "invalid_request_error"}}, status=401
        )
        with pytest.raises(EmbeddingError) as raised:
            embedder.embed(["a"])
        message = str(raised.value)
        assert "HTTP 401" in message
        leaked = [size for size in range(6, len(SECRET) + 1) if SECRET[:size] in message]
        assert not leaked, f"offset {offset}: {message[-80:]}"


# --- Ollama ---------------------------------------------------------------------------------


def test_ollama_request_and_answer(httpserver: HTTPServer) -> None:
    texts = ["first text", "second text"]
    httpserver.expect_oneshot_request(
        "/api/embed",
        method="POST",
        json={"model": OLLAMA_MODEL, "input": texts},
    ).respond_with_json(ollama_body([fake_vector(t) for t in texts]))
    embedder = OLLAMA.build(root(httpserver))

    vectors = embedder.embed(texts)

    httpserver.check_assertions()
    assert embedder.model_id == f"ollama:{OLLAMA_MODEL}" and embedder.dimension == DIM
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t) for t in texts]), rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "dimensions", "model_id", "requested"),
    [
        ("all-minilm", None, "ollama:all-minilm", None),
        ("all-minilm", 384, "ollama:all-minilm", None),
        # nomic-embed-text's own prompts (search_query: / search_document:) are in its id
        ("nomic-embed-text", 256, f"ollama:nomic-embed-text@256+prompts:{NOMIC}", 256),
        (
            "nomic-embed-text:latest",
            256,
            f"ollama:nomic-embed-text:latest@256+prompts:{NOMIC}",
            256,
        ),
        ("my-own-model", 1000, "ollama:my-own-model", None),  # declares, does not shorten
    ],
)
def test_ollama_dimensions_are_requested_and_named(
    httpserver: HTTPServer, model: str, dimensions: int | None, model_id: str, requested: int | None
) -> None:
    embedder = OLLAMA.build(root(httpserver), model=model, dimensions=dimensions)
    httpserver.expect_request("/api/embed").respond_with_handler(OLLAMA.answer(embedder.dimension))

    assert embedder.embed(["a"]).shape == (1, embedder.dimension)
    assert embedder.model_id == model_id
    [body] = sent(httpserver)
    assert body["model"] == model and body.get("dimensions") == requested


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        pytest.param(
            Response("not json", content_type="text/plain"), "unusable answer", id="not-json"
        ),
        pytest.param(json_response({"model": OLLAMA_MODEL}), "unusable answer", id="no-embeddings"),
        pytest.param(
            json_response({"embeddings": [["x", "y", "z"]]}), "unusable answer", id="not-numbers"
        ),
        pytest.param(
            json_response({"embeddings": [[[1.0], [2.0]]]}), "unusable answer", id="nested-lists"
        ),
    ],
)
def test_ollama_malformed_answers_are_embedding_errors(
    httpserver: HTTPServer, answer: Response, match: str
) -> None:
    httpserver.expect_request("/api/embed").respond_with_response(answer)
    with pytest.raises(EmbeddingError, match=f"Ollama at .* {match}"):
        OLLAMA.build(root(httpserver), dimensions=3).embed(["a"])


# --- both providers -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrong_dimension_names_expected_and_got(httpserver: HTTPServer, provider: Provider) -> None:
    httpserver.expect_request(provider.path).respond_with_handler(provider.answer(dim=768))
    embedder = provider.build(root(httpserver), dimensions=DIM)
    with pytest.raises(EmbeddingError, match="dimension 768, expected 384"):
        embedder.embed(["a", "b"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("delta", "match"), [(-1, "1 vectors for 2 texts"), (1, "3 vectors for 2 texts")]
)
def test_wrong_number_of_vectors(
    httpserver: HTTPServer, provider: Provider, delta: int, match: str
) -> None:
    httpserver.expect_request(provider.path).respond_with_handler(
        provider.answer(count_delta=delta)
    )
    with pytest.raises(EmbeddingError, match=match):
        provider.build(root(httpserver), dimensions=DIM).embed(["a", "b"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ragged_or_non_finite_vectors(httpserver: HTTPServer, provider: Provider) -> None:
    good, short = fake_vector("a", 3), fake_vector("b", 2)
    httpserver.expect_oneshot_request(provider.path).respond_with_json(provider.body([good, short]))
    httpserver.expect_oneshot_request(provider.path).respond_with_json(
        provider.body([good, np.array([1.0, float("nan"), 0.0])])
    )
    embedder = provider.build(root(httpserver), dimensions=3)
    with pytest.raises(EmbeddingError, match=r"differing dimensions \[2, 3\], expected 3"):
        embedder.embed(["a", "b"])
    with pytest.raises(EmbeddingError, match="non-finite vector for text #1"):
        embedder.embed(["a", "b"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unreachable_service_fails_fast(provider: Provider) -> None:
    embedder = provider.build(f"http://127.0.0.1:{closed_port()}", timeout=3.0)
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=f"(?i){provider.name} at .* is unreachable"):
        embedder.embed(["a"])
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_slow_service_times_out(httpserver: HTTPServer, provider: Provider) -> None:
    def slow(request: Request) -> Response:
        time.sleep(1.5)
        return provider.answer()(request)

    httpserver.expect_request(provider.path).respond_with_handler(slow)
    embedder = provider.build(root(httpserver), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=r"did not answer within 0\.3s"):
        embedder.embed(["a"])
    assert time.monotonic() - started < 1.4
    # let the server finish the abandoned request so it does not leak into the next test
    deadline = time.monotonic() + 5
    while not httpserver.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(httpserver.log) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (401, "Incorrect API key provided"),
        (404, f'model "{OLLAMA_MODEL}" not found, try pulling it first'),
        (429, "Rate limit reached for requests"),
        (500, "The server had an error while processing your request"),
    ],
)
def test_http_errors_name_status_and_reason_but_never_the_key(
    httpserver: HTTPServer, provider: Provider, status: int, reason: str
) -> None:
    # the OpenAI-speaking server echoes the key back, as a careless proxy might
    echo = f" (key: {SECRET})" if provider is OPENAI else ""
    httpserver.expect_request(provider.path).respond_with_json(
        provider.error(reason + echo), status=status
    )
    embedder = provider.build(root(httpserver))
    with pytest.raises(EmbeddingError, match=f"answered HTTP {status}: ") as raised:
        embedder.embed(["a"])
    message = str(raised.value)
    assert reason + echo.replace(SECRET, "***") in message
    assert SECRET not in message and SECRET not in repr(raised.value)
    assert raised.value.__cause__ is None  # no client exception (with headers) attached
    assert len(httpserver.log) == 1  # no retries inside the client


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unknown_model_needs_dimensions(httpserver: HTTPServer, provider: Provider) -> None:
    with pytest.raises(ValueError, match="EP_EMBEDDING_DIMENSIONS"):
        provider.build(root(httpserver), model="some-unknown-model")
    assert (
        provider.build(root(httpserver), model="some-unknown-model", dimensions=1000).dimension
        == 1000
    )
    assert (
        EmbedderResource(
            provider=provider.name, model_name="some-unknown-model", dimensions=1000
        ).dimension
        == 1000
    )
    with pytest.raises(ValueError, match="EP_EMBEDDING_DIMENSIONS"):
        _ = EmbedderResource(provider=provider.name, model_name="some-unknown-model").dimension


# --- end to end: a Dagster run against the fake provider and the test database -------------


SEPTEMBER, OCTOBER = "2025-09-01", "2025-10-01"
Row = tuple[Any, ...]


@pytest.fixture(scope="module")
def message_embeddings(small_data: Settings) -> dg.AssetsDefinition:
    return build_embedding_asset(
        "messages",
        small_data.tables["messages"],
        small_data,
        monthly_partitions(small_data.partition_start),
    )


@pytest.fixture
def no_embeddings(small_data: Settings) -> Settings:
    """Every message without a vector, so each test starts from the same state."""
    with db.connection(small_data.effective_database_url) as conn:
        conn.execute(
            "UPDATE messages SET embedding = NULL, embedding_model = NULL, "
            "embedding_hash = NULL, embedded_at = NULL"
        )
        conn.commit()
    return small_data


def openai_resource(httpserver: HTTPServer, **options: Any) -> EmbedderResource:
    return EmbedderResource(
        provider="openai",
        model_name=OPENAI_MODEL,
        dimensions=DIM,
        openai_api_key=SECRET,
        openai_base_url=httpserver.url_for("/v1"),
        timeout_seconds=5.0,
        **options,
    )


def ollama_resource(httpserver: HTTPServer, **options: Any) -> EmbedderResource:
    return EmbedderResource(
        provider="ollama",
        model_name=OLLAMA_MODEL,
        ollama_host=root(httpserver),
        timeout_seconds=5.0,
        **options,
    )


def messages(conn: psycopg.Connection) -> list[Row]:
    """Every message with its embedding columns, by id."""
    return conn.execute(
        "SELECT id, sent_at, content, embedding, embedding_model, embedding_hash, embedded_at "
        "FROM messages ORDER BY id"
    ).fetchall()


def in_month(row: Row, partition: str) -> bool:
    return row[1] is not None and row[1].astimezone(UTC).strftime("%Y-%m-01") == partition


def comparable(rows: list[Row]) -> list[Row]:
    return [(*r[:3], None if r[3] is None else r[3].to_list(), *r[4:]) for r in rows]


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [event] = result.get_asset_materialization_events()
    return figures(event.materialization.metadata)


def assert_embedded_by(rows: list[Row], partition: str, model_id: str) -> list[Row]:
    """The partition's messages carry fake_vector(content) made by `model_id`; returns them."""
    mine = [r for r in rows if in_month(r, partition)]
    assert mine, f"the test data has no messages in {partition}"
    for row_id, _, content, embedding, model, digest, embedded_at in mine:
        assert embedding is not None, f"message {row_id} was not embedded"
        np.testing.assert_allclose(embedding.to_numpy(), fake_vector(content), rtol=1e-5)
        assert model == model_id
        assert digest == hashlib.sha256(content.encode()).hexdigest()
        assert embedded_at is not None
    return mine


def test_dagster_run_through_openai_embeds_exactly_its_partition(
    no_embeddings: Settings,
    message_embeddings: dg.AssetsDefinition,
    httpserver: HTTPServer,
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
) -> None:
    httpserver.expect_request("/v1/embeddings", method="POST").respond_with_handler(OPENAI.answer())

    result = materialize(
        message_embeddings,
        no_embeddings,
        openai_resource(httpserver, batch_size=2),
        SEPTEMBER,
        instance,
    )

    assert result.success
    rows = messages(conn)
    mine = assert_embedded_by(rows, SEPTEMBER, "openai:text-embedding-3-small@384")
    assert all(r[3] is None and r[4] is None for r in rows if not in_month(r, SEPTEMBER))
    bodies = sent(httpserver)
    assert sorted(t for body in bodies for t in body["input"]) == sorted(r[2] for r in mine)
    assert all(body["dimensions"] == DIM and body["model"] == OPENAI_MODEL for body in bodies)
    metadata = materialization_metadata(result)
    assert metadata["provider_requests"] == len(bodies) == -(-len(mine) // 2)
    assert metadata["run_rows_embedded"] == len(mine)
    assert metadata["model"] == "openai:text-embedding-3-small@384"
    assert SECRET not in event_log_text(instance, result.run_id)

    # a second run finds the partition up to date and calls no provider
    again = materialize(
        message_embeddings,
        no_embeddings,
        openai_resource(httpserver, batch_size=2),
        SEPTEMBER,
        instance,
    )
    assert materialization_metadata(again)["provider_requests"] == 0
    assert len(httpserver.log) == len(bodies)
    assert comparable(messages(conn)) == comparable(rows)


def test_dagster_run_through_ollama_reembeds_rows_of_another_model(
    no_embeddings: Settings,
    message_embeddings: dg.AssetsDefinition,
    httpserver: HTTPServer,
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
) -> None:
    httpserver.expect_request("/v1/embeddings").respond_with_handler(OPENAI.answer())
    httpserver.expect_request("/api/embed", method="POST").respond_with_handler(OLLAMA.answer())
    first = materialize(
        message_embeddings, no_embeddings, openai_resource(httpserver), OCTOBER, instance
    )
    assert first.success
    openai_requests = len(httpserver.log)

    result = materialize(
        message_embeddings, no_embeddings, ollama_resource(httpserver), OCTOBER, instance
    )

    assert result.success
    rows = messages(conn)
    mine = assert_embedded_by(rows, OCTOBER, f"ollama:{OLLAMA_MODEL}")
    assert all(r[3] is None for r in rows if not in_month(r, OCTOBER))
    ollama_bodies = [
        request.get_json() for request, _ in httpserver.log if request.path == "/api/embed"
    ]
    assert len(httpserver.log) - openai_requests == len(ollama_bodies)
    assert sorted(t for b in ollama_bodies for t in b["input"]) == sorted(r[2] for r in mine)
    metadata = materialization_metadata(result)
    assert metadata["provider_requests"] == len(ollama_bodies)
    assert metadata["run_rows_embedded"] == len(mine)  # all stale: another model made them
    assert metadata["up_to_date"] == 0


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        pytest.param(
            OLLAMA.answer(dim=768),
            "ollama:all-minilm returned vectors of dimension 768, expected 384",
            id="wrong-dimension",
        ),
        pytest.param(
            lambda _: json_response({"error": "model 'all-minilm' not found"}, 404),
            r"Ollama at http://localhost:\d+/ answered HTTP 404: model 'all-minilm' not found",
            id="model-not-found",
        ),
    ],
)
def test_dagster_run_fails_cleanly_and_writes_nothing(
    no_embeddings: Settings,
    message_embeddings: dg.AssetsDefinition,
    httpserver: HTTPServer,
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
    answer: Callable[[Request], Response],
    match: str,
) -> None:
    httpserver.expect_request("/v1/embeddings").respond_with_handler(OPENAI.answer())
    httpserver.expect_request("/api/embed").respond_with_handler(answer)
    assert materialize(
        message_embeddings, no_embeddings, openai_resource(httpserver), SEPTEMBER, instance
    ).success
    before = comparable(messages(conn))
    assert any(r[3] is not None for r in before)

    result = materialize(
        message_embeddings,
        no_embeddings,
        ollama_resource(httpserver),
        SEPTEMBER,
        instance,
        raise_on_error=False,
    )

    assert result.success is False
    [failure] = result.get_step_failure_events()
    error = failure.step_failure_data.error
    assert error is not None
    assert re.search(match, error.message), error.message
    assert "its rows were not written" in error.message
    assert comparable(messages(conn)) == before


def test_dagster_run_answered_401_fails_without_leaking_the_key(
    no_embeddings: Settings,
    message_embeddings: dg.AssetsDefinition,
    httpserver: HTTPServer,
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
) -> None:
    httpserver.expect_request("/v1/embeddings").respond_with_json(
        OPENAI.error(f"Incorrect API key provided: {SECRET}"), status=401
    )
    before = comparable(messages(conn))

    result = materialize(
        message_embeddings,
        no_embeddings,
        openai_resource(httpserver),
        SEPTEMBER,
        instance,
        raise_on_error=False,
    )

    assert result.success is False
    log = event_log_text(instance, result.run_id)
    assert "answered HTTP 401: " in log and "Incorrect API key provided: ***" in log
    assert SECRET not in log
    assert comparable(messages(conn)) == before


@pytest.mark.parametrize("host", ["http://user:pw@127.0.0.1:99999", "127.0.0.1:abc"])
def test_a_client_that_cannot_be_made_is_a_one_line_error_not_a_retry(host: str) -> None:
    """The SDK client is made on first use; a host it refuses fails at once (no retry
    deadline spent), naming the service without the host's password."""
    embedder = build_embedder(
        "ollama", ollama_host=host, model="all-minilm", retry=RetryPolicy(deadline_seconds=30)
    )
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match="cannot make a client") as raised:
        embedder.warm_up()
    assert time.monotonic() - started < 5
    assert type(raised.value) is EmbeddingError and "pw" not in str(raised.value)
    with pytest.raises(EmbeddingError, match="cannot make a client"):
        embedder.embed(["hello"])
    assert embedder.retry_stats.retries == 0
