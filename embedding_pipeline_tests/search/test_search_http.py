"""`embedding-pipeline serve` as a real process on a free port, called over HTTP: the
search a new user tries after `make demo`, filters and modes, similar rows and lookups,
OpenAPI docs, health, a 422 naming the field for every kind of bad input, and 503s
without traceback, URL, password or API key when the database and the embedding
provider are down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import free_port
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.database import create_database
from embedding_pipeline_tests.support.search import sample_settings, serve

FRIDAY = "Why did the deployment fail on Friday?"
SEARCH = "/api/v1/semantic_search/messages"


@pytest.fixture(scope="module")
def sample(pg_server) -> Settings:
    return sample_settings(pg_server)


@pytest.fixture(scope="module")
def api(sample: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = {"DATABASE_URL": sample.effective_database_url}
    with (
        serve(env, tmp_path_factory.mktemp("serve")) as (base, _),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        yield client


def test_the_friday_search_a_new_user_tries(api):
    answer = api.post(SEARCH, json={"query": FRIDAY, "limit": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "local:all-MiniLM-L6-v2-int8" and body["mode"] == "vector"
    assert body["took_ms"] >= body["embed_ms"] > 0
    hits = body["results"]
    assert len(hits) == 3 and all("deploy" in h["text"].lower() for h in hits)
    assert {"id", "score", "text", "time", "author", "topic"} <= set(hits[0])

    before = api.post(
        SEARCH, json={"query": FRIDAY, "limit": 3, "filters": {"until": "2025-10-01"}}
    ).json()["results"]
    assert len(before) == 3
    assert {h["id"] for h in before}.isdisjoint(h["id"] for h in hits)
    assert all(h["time"] < "2025-10-01" for h in before)

    hybrid = api.post(SEARCH, json={"query": FRIDAY, "limit": 3, "mode": "hybrid"}).json()
    assert hybrid["mode"] == "hybrid" and len(hybrid["results"]) == 3
    text = api.post(SEARCH, json={"query": "ticket 48213", "limit": 1, "mode": "text"}).json()
    assert "48213" in text["results"][0]["text"] and text["model"] is None


def test_atoms_topics_similar_rows_and_lookups(api):
    atoms = api.post(
        "/api/v1/semantic_search/atoms",
        json={"query": "double charge", "limit": 5, "filters": {"kind": "decision"}},
    ).json()["results"]
    assert atoms and {a["kind"] for a in atoms} == {"decision"}
    topics = api.post("/api/v1/semantic_search/topics", json={"query": "flaky tests"}).json()
    assert topics["results"][0]["key"] == "flaky-ci"

    oom = api.post(SEARCH, json={"query": "OOMKilled exit code 137", "limit": 1}).json()
    oom_id = oom["results"][0]["id"]
    similar = api.get(f"/api/v1/similar/messages/{oom_id}", params={"limit": 4})
    assert similar.status_code == 200
    assert len(similar.json()["results"]) == 4
    assert oom_id not in {h["id"] for h in similar.json()["results"]}
    missing = api.get("/api/v1/similar/messages/999999")
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]

    linked = api.get(f"/api/v1/messages/{oom_id}/atoms").json()["results"]
    assert "atom-k8s-002" in {a["key"] for a in linked}
    messages = api.get("/api/v1/topics/k8s-outage/messages", params={"limit": 2}).json()
    assert [m["topic"] for m in messages["results"]] == ["k8s-outage", "k8s-outage"]
    assert api.get("/api/v1/topics/no-such-topic/messages").status_code == 404


def test_openapi_docs_and_health(api):
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = api.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/semantic_search/{table}",
        "/api/v1/similar/{table}/{id}",
        "/api/v1/messages/{id}/atoms",
        "/api/v1/topics/{topic}/messages",
        "/healthz",
    } <= set(paths)
    assert "422" in paths["/api/v1/semantic_search/{table}"]["post"]["responses"]
    health = api.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "database": "ok",
        "model": "local:all-MiniLM-L6-v2-int8",
    }


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (SEARCH, {"query": ""}, "query"),
        (SEARCH, {"query": "   "}, "query"),
        (SEARCH, {"limit": 3}, "query"),
        (SEARCH, {"query": "x", "limit": 101}, "limit"),
        (SEARCH, {"query": "x", "limit": 0}, "limit"),
        ("/api/v1/semantic_search/users", {"query": "x"}, "table"),
        (SEARCH, {"query": "x", "mode": "fuzzy"}, "mode"),
        (SEARCH, {"query": "x", "filters": {"colour": "red"}}, "filters.colour"),
        (SEARCH, {"query": "x", "filters": {"since": "last week"}}, "filters.since"),
        (SEARCH, {"query": "x", "filters": {"until": "2025-13-45"}}, "filters.until"),
        (SEARCH, {"query": "x", "filters": {"kind": "decision"}}, "filters.kind"),
        (SEARCH, {"query": "x", "filters": {"extraction": "one"}}, "filters.extraction"),
        (SEARCH, {"query": "x", "lmit": 3}, "lmit"),
        (SEARCH, "{not json", "body"),
        ("/api/v1/similar/messages/1?since=yesterday", None, "since"),
        ("/api/v1/similar/messages/1?colour=red", None, "colour"),
        ("/api/v1/similar/messages/abc", None, "id"),
        ("/api/v1/similar/users/1", None, "table"),
    ],
)
def test_bad_input_gets_a_422_naming_the_field(api, path, body, field):
    if body is None:
        answer = api.get(path)
    elif isinstance(body, str):
        answer = api.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        answer = api.post(path, json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["field"] == field
    assert error["detail"].startswith(f"{field}: ") and "\n" not in error["detail"]


def test_a_column_of_another_model_answers_409(sample, httpserver: HTTPServer, tmp_path: Path):
    """A server configured for an Ollama model (a real local server speaking its protocol)
    over columns the local model filled: vector search is refused, text search works."""
    httpserver.expect_request("/api/embed", method="POST").respond_with_json(
        {"model": "all-minilm", "embeddings": [[0.05] * 384]}
    )
    env = {
        "DATABASE_URL": sample.effective_database_url,
        "EP_EMBEDDING_PROVIDER": "ollama",
        "EP_EMBEDDING_MODEL": "all-minilm",
        "OLLAMA_HOST": httpserver.url_for("").rstrip("/"),
    }
    with serve(env, tmp_path) as (base, _), httpx.Client(base_url=base) as client:
        refused = client.post(SEARCH, json={"query": "deploy", "mode": "hybrid"})
        text = client.post(SEARCH, json={"query": "deploy", "mode": "text"})
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith(
        "messages.embedding holds vectors of local:all-MiniLM-L6-v2-int8 (stored with its "
        "vectors) but queries would be embedded with ollama:all-minilm"
    )
    assert text.status_code == 200 and text.json()["results"]
    assert httpserver.log == []  # the mismatch was found before the query was embedded


def test_outages_answer_503_without_traceback_url_password_or_key(pg_server, tmp_path: Path):
    """The database down (every route that needs it), then the embedding provider down
    over a live database whose columns hold no vectors yet (the column's model is checked
    before the query is embedded, so the provider is only reached with a database)."""
    password, key = "S3cret-pw-4242", "sk-test-SECRET-KEY-4242"
    dead_db, dead_provider = free_port(), free_port()
    provider = {
        "EP_EMBEDDING_PROVIDER": "openai",
        "EP_EMBEDDING_DIMENSIONS": "384",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{dead_provider}/v1",
        "OPENAI_API_KEY": key,
    }
    env = {"DATABASE_URL": f"postgresql://ep:{password}@127.0.0.1:{dead_db}/app", **provider}
    with serve(env, tmp_path) as (base, log_path), httpx.Client(base_url=base) as client:
        answers = {
            "vector": client.post(SEARCH, json={"query": "deploy", "mode": "hybrid"}),
            "database": client.post(SEARCH, json={"query": "deploy", "mode": "text"}),
            "similar": client.get("/api/v1/similar/messages/1"),
            "health": client.get("/healthz"),
        }
        db_log = log_path.read_text()
    empty = create_database(pg_server, "search_provider_outage")
    with db.connection(empty, vector=False) as conn:
        ensure_schema(conn, Settings(database_url=empty), LOCAL_DIMENSION, LOCAL_MODEL_ID)
    env = {"DATABASE_URL": empty, **provider}
    with serve(env, tmp_path) as (base, log_path), httpx.Client(base_url=base) as client:
        answers["provider"] = client.post(SEARCH, json={"query": "deploy", "mode": "hybrid"})
        provider_log = log_path.read_text()

    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 503)
    assert "embedding provider is unavailable" in answers["provider"].json()["detail"]
    for name in ("vector", "database", "similar"):
        assert "database is unavailable" in answers[name].json()["detail"]
    assert answers["health"].json()["database"] == "unreachable"
    assert "database unavailable" in db_log
    assert "embedding provider unavailable" in provider_log
    for text in [db_log, provider_log, *(a.text for a in answers.values())]:
        for secret in (password, key, f"ep:{password}", str(dead_db) + "/app"):
            assert secret not in text
        assert "Traceback" not in text
