"""The search service as anyone who reaches its port would try it: `embedding-pipeline
serve` as a real process on a free port, over the sample chat in the real PostgreSQL with
the real local model, with API keys (from a file) on.

Every hostile input of issue 14 gets its 4xx with a JSON body naming the field; Hypothesis
finds no 5xx over the request body and the path and query parameters; a 1 MB query is
refused at once; a statement past the statement timeout gets 504 and the next request is
answered; keys are required (constant-time compared, never logged) except for /healthz and
the docs; `--host 0.0.0.0` without keys refuses to start; the log holds no query text,
filter value, key or traceback; /metrics parses and counts the requests just made; CORS is
off unless configured."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from embedding_pipeline.search import Searcher, engine_for
from embedding_pipeline.search.auth import ApiKeys
from embedding_pipeline.search.http import build_router
from embedding_pipeline.settings import (
    ApiSettings,
    EmbedderSettings,
    Settings,
    SettingsError,
    api_keys,
)
from embedding_pipeline_tests.support.search import VENV_BIN, sample_settings, serve, serve_env

SEARCH = "/api/v1/semantic_search/messages"
KEYS = ("k-one-4242", "k-two-4242")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
#: Sent in queries, filter values and path keys; must never reach the log.
MARKER = "zq-private-marker-7731"
BIGINT_PLUS_ONE = "9223372036854775808"
HUGE = "99999999999999999999"
MAX_QUERY_CHARS = 2000


@pytest.fixture(scope="module")
def sample(pg_server) -> Settings:
    return sample_settings(pg_server)


@pytest.fixture(scope="module")
def service(
    sample: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, Path]]:
    """The keyed service; the keys come from a file, with a comment and both separators."""
    workdir = tmp_path_factory.mktemp("service")
    keys = workdir / "api-keys"
    keys.write_text(f"# search service keys\n{KEYS[0]}\n\n{KEYS[1]}, \n")
    env = {"DATABASE_URL": sample.effective_database_url, "EP_API_KEYS": str(keys)}
    with (
        serve(env, workdir) as (base, log_path),
        httpx.Client(base_url=base, timeout=30, headers=AUTH) as client,
    ):
        yield client, log_path
    log = log_path.read_text()
    assert "Traceback" not in log and MARKER not in log
    assert not any(key in log for key in KEYS)


@pytest.fixture(scope="module")
def api(service: tuple[httpx.Client, Path]) -> httpx.Client:
    return service[0]


def _post_raw(client: httpx.Client, path: str, body: str | bytes) -> httpx.Response:
    """A body as written (`json=` cannot send a lone surrogate: it encodes to UTF-8)."""
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


# -- every input of the issue -------------------------------------------------------------

HOSTILE = [
    ("POST", SEARCH, {"query": "x", "filters": {"topic": HUGE}}, 422, "filters.topic"),
    ("POST", SEARCH, {"query": "x", "filters": {"topic": BIGINT_PLUS_ONE}}, 422, "filters.topic"),
    ("POST", SEARCH, {"query": "x", "filters": {"topic": int(HUGE)}}, 422, "filters.topic"),
    ("POST", SEARCH, '{"query": "x", "filters": {"extraction": 1e20}}', 422, "filters.extraction"),
    (
        "POST",
        SEARCH,
        {"query": "x", "filters": {"extraction": int(HUGE)}},
        422,
        "filters.extraction",
    ),
    ("POST", SEARCH, {"query": f"{MARKER}\x00x", "mode": "text"}, 422, "query"),
    ("POST", SEARCH, {"query": f"{MARKER}\x00x", "mode": "hybrid"}, 422, "query"),
    ("POST", SEARCH, {"query": "x", "filters": {"author": f"{MARKER}\x00"}}, 422, "filters.author"),
    ("POST", SEARCH, '{"query": "\\ud800 zq-private-marker-7731"}', 422, "query"),
    ("POST", SEARCH, '{"query": "x", "filters": {"author": "\\udfff"}}', 422, "filters.author"),
    (
        "POST",
        SEARCH,
        {"query": "x", "mode": "text", "filters": {"topic": "²"}},
        422,
        "filters.topic",
    ),
    ("POST", SEARCH, {"query": "x" * (MAX_QUERY_CHARS + 1)}, 422, "query"),
    ("POST", SEARCH, {"query": "x", "filters": {"kind": "k" * 201}}, 422, "filters.kind"),
    ("POST", SEARCH, b"\xff\xfe{not json", 422, "body"),
    ("POST", SEARCH, "[1, 2, 3]", 422, "body"),
    ("POST", SEARCH, '{"query": "x", "limit": NaN}', 422, "limit"),
    ("GET", f"/api/v1/similar/messages/{HUGE}", None, 422, "id"),
    ("GET", f"/api/v1/similar/messages/{BIGINT_PLUS_ONE}", None, 422, "id"),
    ("GET", "/api/v1/similar/messages/-1", None, 422, "id"),
    ("GET", "/api/v1/similar/messages/%C2%B2", None, 422, "id"),
    ("GET", "/api/v1/similar/messages/1?author=%00", None, 422, "author"),
    ("GET", f"/api/v1/similar/atoms/1?topic={HUGE}", None, 422, "topic"),
    ("GET", f"/api/v1/messages/{HUGE}/atoms", None, 422, "id"),
    ("GET", f"/api/v1/topics/{HUGE}/messages", None, 422, "topic"),
    ("GET", "/api/v1/topics/%C2%B2/messages", None, 422, "topic"),
    ("GET", "/api/v1/topics/%D9%A1/messages", None, 422, "topic"),
    ("GET", "/api/v1/topics/%00/messages", None, 422, "topic"),
    ("GET", f"/api/v1/topics/{'k' * 201}/messages", None, 422, "topic"),
    ("GET", "/api/v1/similar/messages/999999", None, 404, None),
    ("GET", f"/api/v1/topics/{MARKER}/messages", None, 404, None),
    ("GET", "/api/v1/messages/999999/atoms", None, 404, None),
    ("GET", "/api/v1/nothing/here", None, 404, None),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), HOSTILE)
def test_every_hostile_input_gets_its_4xx_with_a_json_body(
    api: httpx.Client, method: str, path: str, body: Any, status: int, field: str | None
):
    if method == "GET":
        answer = api.get(path)
    elif isinstance(body, str | bytes):
        answer = _post_raw(api, path, body)
    else:
        answer = _post_raw(api, path, json.dumps(body))
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error.get("field") == field
    assert "\n" not in error["detail"] and MARKER not in error["detail"]
    if field:
        assert error["detail"].startswith(f"{field}: ")


def test_a_topic_given_as_a_string_of_digits_is_its_id(api: httpx.Client):
    by_path = api.get("/api/v1/topics/2/messages", params={"limit": 3}).json()["results"]
    by_filter = api.post(
        SEARCH, json={"query": "x", "mode": "vector", "limit": 3, "filters": {"topic": "2"}}
    ).json()["results"]
    assert by_path and {m["topic_id"] for m in by_path} == {2}
    assert by_filter and {m["topic_id"] for m in by_filter} == {2}


# -- Hypothesis: no 5xx, whatever is sent ---------------------------------------------------

#: NUL, lone surrogates, digits of other scripts, and tsquery's operators and quotes.
ODD = ["\x00", "\ud800", "\udfff", "²", "\u0661", "'", '"', "\\", "&", "|", "!", ":*", "<->"]
TEXT = st.lists(st.characters(exclude_categories=()) | st.sampled_from(ODD), max_size=20).map(
    "".join
)
NUMBERS = st.integers() | st.sampled_from([0, -1, 2**63 - 1, 2**63, int(HUGE)]) | st.floats()
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3)
)
DATES = st.sampled_from(["2025-10-01", "2025-10-01T12:00:00+02:00", "2025-13-45", ""]) | TEXT
FILTERS = (
    st.fixed_dictionaries(
        {},
        optional={
            "since": DATES | JSON_VALUES,
            "until": DATES | JSON_VALUES,
            "author": TEXT | JSON_VALUES,
            "topic": TEXT | NUMBERS | st.sampled_from(["1", "2", "k8s-outage", HUGE]),
            "extraction": NUMBERS | TEXT,
            "kind": st.sampled_from(["decision", "task"]) | TEXT,
        },
    )
    | JSON_VALUES
)
BODIES = (
    st.fixed_dictionaries(
        {},
        optional={
            "query": TEXT | st.sampled_from(["deploy failed", "ticket 48213"]) | JSON_VALUES,
            "limit": st.integers(-5, 105) | JSON_VALUES,
            "filters": FILTERS,
            "mode": st.sampled_from(["vector", "text", "hybrid"]) | TEXT,
        },
    )
    | JSON_VALUES
)
TABLES = st.sampled_from(["messages", "topics", "atoms"]) | TEXT
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _quoted(value: object) -> str:
    return quote(str(value).encode("utf-8", "surrogatepass"), safe="")


def _assert_answered_without_5xx(answer: httpx.Response) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.text)
    body = answer.json()
    assert ("results" in body) if answer.status_code == 200 else ("detail" in body)


def test_a_trailing_slash_is_a_json_404_not_a_redirect(api: httpx.Client):
    """Found by Hypothesis: the table `0/` (quoted `0%2F`) ended in a 307 with no body."""
    for path in ("/api/v1/semantic_search/0%2F", "/api/v1/semantic_search/messages/"):
        answer = _post_raw(api, path, json.dumps({"query": "deploy"}).encode())
        assert answer.status_code == 404 and "detail" in answer.json(), path


@PROPERTY
@given(table=TABLES, body=BODIES | st.binary(max_size=80))
def test_no_request_body_gets_a_5xx(api: httpx.Client, table: str, body: Any):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    _assert_answered_without_5xx(
        _post_raw(api, f"/api/v1/semantic_search/{_quoted(table)}", content)
    )


@PROPERTY
@given(
    query=TEXT.filter(str.strip),
    mode=st.sampled_from(["vector", "text", "hybrid"]),
    table=st.sampled_from(["messages", "topics", "atoms"]),
)
@example(query="\ud800\udc00", mode="vector", table="messages")  # a pair: one character
@example(query="\ud800", mode="vector", table="messages")  # alone: not Unicode
def test_any_storable_query_text_is_searched(api: httpx.Client, query: str, mode: str, table: str):
    """Whatever the words (operators of tsquery, quotes, digits of other scripts, any
    script): text PostgreSQL can store is searched, anything else is a 422 on `query`."""
    body = json.dumps({"query": query, "mode": mode, "limit": 3})
    answer = _post_raw(api, f"/api/v1/semantic_search/{table}", body)
    # what the server reads: a surrogate pair in the JSON is one character (\ud800\udc00
    # is U+10000), a lone surrogate stays one
    received = json.loads(body)["query"]
    storable = "\x00" not in received and not any(0xD800 <= ord(c) <= 0xDFFF for c in received)
    if storable:
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) <= 3
    else:
        assert answer.status_code == 422 and answer.json()["field"] == "query"


PARAMS = st.dictionaries(
    st.sampled_from(["limit", "since", "until", "author", "topic", "extraction", "kind"]) | TEXT,
    TEXT | NUMBERS | st.sampled_from(["1", "2", "decision", "2025-10-01"]),
    max_size=4,
)
IDS = NUMBERS | TEXT | st.sampled_from(["1", "2", "313", "k8s-outage", HUGE])


@PROPERTY
@given(route=st.sampled_from(["similar", "atoms", "topic"]), table=TABLES, row=IDS, params=PARAMS)
def test_no_path_or_query_parameter_gets_a_5xx(
    api: httpx.Client, route: str, table: str, row: object, params: dict[str, object]
):
    path = {
        "similar": f"/api/v1/similar/{_quoted(table)}/{_quoted(row)}",
        "atoms": f"/api/v1/messages/{_quoted(row)}/atoms",
        "topic": f"/api/v1/topics/{_quoted(row)}/messages",
    }[route]
    query = "&".join(f"{_quoted(k)}={_quoted(v)}" for k, v in params.items())
    _assert_answered_without_5xx(api.get(f"{path}?{query}" if query else path))


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_a_1mb_query_is_refused_at_once(api: httpx.Client, mode: str):
    query = " ".join(f"{MARKER}{i}" for i in range(40_000))[:1_000_000]
    started = time.monotonic()
    huge = api.post(SEARCH, json={"query": query, "mode": mode})
    long = api.post(SEARCH, json={"query": query[:50_000], "mode": mode})
    assert time.monotonic() - started < 2
    assert huge.status_code == 413 and huge.json()["field"] == "body"
    assert long.status_code == 422
    assert long.json()["detail"] == "query: must be at most 2000 characters long, got 50000"
    assert api.post(SEARCH, json={"query": "deploy", "mode": mode}).status_code == 200


def test_a_statement_past_the_timeout_gets_504_and_the_next_request_is_answered(
    sample: Settings, tmp_path: Path
):
    """A migration holds the messages table locked: the search waits, the statement
    timeout cancels it (504, not "database unavailable"), and once the lock is gone the
    same search is answered; /healthz does not touch the table and stays ok."""
    env = {"DATABASE_URL": sample.effective_database_url, "EP_API_STATEMENT_TIMEOUT_SECONDS": "0.5"}
    with (
        serve(env, tmp_path) as (base, log_path),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        with psycopg.connect(sample.effective_database_url) as lock:
            lock.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            slow = [
                client.post(SEARCH, json={"query": f"{MARKER} deploy", "mode": mode})
                for mode in ("vector", "text")
            ]
            waited = time.monotonic() - started
            health = client.get("/healthz")
            lock.rollback()
        after = client.post(SEARCH, json={"query": "deploy", "limit": 3})
        log = log_path.read_text()
    assert [a.status_code for a in slow] == [504, 504]
    assert slow[0].json()["detail"].startswith("the search took too long (over 0.5 s)")
    assert waited < 5
    assert health.status_code == 200
    assert after.status_code == 200 and len(after.json()["results"]) == 3
    assert "search took too long: QueryCanceled" in log
    assert MARKER not in log and "database unavailable" not in log


def test_the_router_in_an_applications_own_app_keeps_the_timeout_and_the_keys(
    sample: Settings,
):
    """Mounted under a prefix in an app with its own catch-all exception handler and its
    own engine (no statement timeout of its own): the router sets the timeout in each
    request's transaction, leaves none behind on the app's connections, and asks for a
    key."""
    app = FastAPI()

    @app.exception_handler(Exception)
    async def everything(request: Any, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the application's own handler", status_code=599)

    engine = engine_for(sample.effective_database_url)
    settings = replace(sample, api=ApiSettings(statement_timeout_seconds=0.5))
    router = build_router(Searcher(settings), engine, api_keys=ApiKeys([KEYS[0]]))
    app.include_router(router, prefix="/search")
    key = {"Authorization": f"Bearer {KEYS[0]}"}
    with TestClient(app) as client:
        with psycopg.connect(sample.effective_database_url) as lock:
            lock.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            slow = client.post(f"/search{SEARCH}", json={"query": "deploy"}, headers=key)
            lock.rollback()
        fine = client.post(f"/search{SEARCH}", json={"query": "deploy"}, headers=key)
        refused = client.post(f"/search{SEARCH}", json={"query": "deploy"})
        health = client.get("/search/healthz")
    assert slow.status_code == 504 and slow.json()["detail"].startswith("the search took")
    assert fine.status_code == 200 and fine.json()["results"]
    assert refused.status_code == 401 and refused.json()["detail"].startswith("missing or")
    assert health.status_code == 200
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "0"
    engine.dispose()


def test_the_query_is_cut_to_the_models_input_limit(httpserver: HTTPServer):
    """As a run cuts a row: a query for Ollama reaches it cut to EP_OLLAMA_MAX_INPUT_TOKENS
    (by UTF-8 bytes, the tokenizer-free bound)."""
    received: list[str] = []

    def embed(request: Any) -> Any:
        from werkzeug import Response

        received.extend(request.get_json()["input"])
        return Response(json.dumps({"embeddings": [[0.1] * 384]}), content_type="application/json")

    httpserver.expect_request("/api/embed", method="POST").respond_with_handler(embed)
    embedder = EmbedderSettings(
        provider="ollama",
        model="all-minilm",
        dimensions=384,
        ollama_host=httpserver.url_for("").rstrip("/"),
        ollama_max_input_tokens=50,
    )
    searcher = Searcher(Settings(embedder=embedder))
    vector = searcher.embed_query("why " * 400)
    assert vector.shape == (384,)
    assert received == [("why " * 400)[:50]]
    searcher.close()


# -- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Bearer {KEYS[0]}x"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": KEYS[0]},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer k-one-4242\u00e9".encode("latin-1")},
    ],
    ids=["none", "wrong", "longer", "basic", "no-scheme", "empty", "latin-1"],
)
def test_without_an_accepted_key_every_route_but_health_and_docs_gets_401(
    api: httpx.Client, headers: dict[str, str | bytes]
):
    bare = httpx.Client(base_url=str(api.base_url), timeout=30)
    for method, path in [
        ("POST", SEARCH),
        ("GET", "/api/v1/similar/messages/1"),
        ("GET", "/api/v1/messages/1/atoms"),
        ("GET", "/api/v1/topics/2/messages"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/nothing/here"),
    ]:
        answer = bare.request(method, path, headers=headers, json={"query": MARKER})
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json() == {
            "detail": "missing or unknown API key: send the header `Authorization: Bearer <key>`"
        }
    assert bare.get("/healthz", headers=headers).status_code == 200
    assert bare.get("/docs", headers=headers).status_code == 200
    assert bare.get("/openapi.json", headers=headers).status_code == 200
    bare.close()


def test_each_configured_key_is_accepted(api: httpx.Client):
    for key in KEYS:
        answer = api.post(
            SEARCH, json={"query": "deploy", "limit": 1}, headers={"Authorization": f"bearer {key}"}
        )
        assert answer.status_code == 200, answer.text


def test_openapi_declares_the_bearer_scheme_on_every_api_route(api: httpx.Client):
    spec = api.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the keys in EP_API_KEYS, sent as `Authorization: Bearer <key>`.",
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            expected = [] if path == "/healthz" else [{"apiKey": []}]
            assert operation.get("security", []) == expected, path
            if path != "/healthz":
                assert {"401", "413", "504"} <= set(operation["responses"])


@pytest.mark.parametrize(
    ("value", "file", "keys"),
    [
        ("k1", None, ("k1",)),
        (" k1 , k2,k1,, ", None, ("k1", "k2")),
        ("", None, ()),
        ("FILE", "# keys\nk1\n\n k2 , k3 # old\n", ("k1", "k2", "k3")),
    ],
)
def test_api_keys_come_from_the_variable_or_a_file(tmp_path: Path, value, file, keys):
    if file is not None:
        (tmp_path / "keys").write_text(file)
        value = str(tmp_path / "keys")
    assert api_keys({"EP_API_KEYS": value}) == keys


@pytest.mark.parametrize(
    ("value", "file", "message"),
    [
        (" , ", None, "EP_API_KEYS is set but EP_API_KEYS holds no key"),
        ("/no/such/keys", None, "EP_API_KEYS names the file '/no/such/keys': No such file"),
        ("FILE", "# nothing yet\n", "EP_API_KEYS is set but the file "),
        ("secret-k1 secret-k2", None, "a key in EP_API_KEYS contains a space, a control or"),
        ("secret-k1\x07", None, "a key in EP_API_KEYS contains a space, a control or"),
    ],
)
def test_unusable_api_keys_are_refused_without_showing_a_key(tmp_path: Path, value, file, message):
    if file is not None:
        (tmp_path / "keys").write_text(file)
        value = str(tmp_path / "keys")
    with pytest.raises(SettingsError) as caught:
        api_keys({"EP_API_KEYS": value})
    assert str(caught.value).startswith(message)
    assert "secret" not in str(caught.value)


def test_serve_with_unusable_keys_refuses_to_start_in_one_line(tmp_path: Path):
    done = subprocess.run(
        [str(VENV_BIN / "embedding-pipeline"), "serve", "--port", "1"],
        env=serve_env({"EP_API_KEYS": "/no/such/keys"}, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "error: EP_API_KEYS names the file '/no/such/keys': No such file or directory\n"
    )


def test_serve_on_a_public_host_without_keys_refuses_to_start(tmp_path: Path):
    done = subprocess.run(
        [str(VENV_BIN / "embedding-pipeline"), "serve", "--host", "0.0.0.0", "--port", "1"],
        env=serve_env({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        "error: --host 0.0.0.0 is reachable from other machines and EP_API_KEYS is not set"
    )
    assert "--allow-unauthenticated" in done.stderr


def test_serve_on_a_public_host_starts_with_allow_unauthenticated(sample: Settings, tmp_path: Path):
    env = {"DATABASE_URL": sample.effective_database_url}
    with (
        serve(env, tmp_path, "--host", "0.0.0.0", "--allow-unauthenticated") as (base, log_path),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        answer = client.post(SEARCH, json={"query": "deploy", "limit": 1})
    assert answer.status_code == 200
    assert "search API ready on http://0.0.0.0:" in log_path.read_text()
    assert "no API key required" in log_path.read_text()


# -- private logs -----------------------------------------------------------------------------


def test_the_log_holds_no_query_text_filter_value_or_key(service: tuple[httpx.Client, Path]):
    """Markers in queries, filters and path keys, in answered and refused requests: the
    log names each request by id, route template, status and query length only."""
    api, log_path = service
    before = len(log_path.read_text())
    sent = [
        api.post(SEARCH, json={"query": f"{MARKER} deploy", "mode": "hybrid"}),
        api.post(SEARCH, json={"query": f"{MARKER} deploy", "filters": {"author": MARKER}}),
        api.post(SEARCH, json={"query": f"{MARKER} \x00", "mode": "text"}),
        api.post(SEARCH, json={"query": f"{MARKER}", "filters": {"since": MARKER}}),
        api.get(f"/api/v1/topics/{MARKER}/messages", params={"author": MARKER}),
        api.get("/api/v1/similar/messages/1", params={"author": MARKER, "kind": MARKER}),
        api.get(f"/api/v1/similar/messages/{MARKER}"),
    ]
    assert [a.status_code for a in sent] == [200, 200, 422, 422, 404, 422, 422]
    time.sleep(0.2)
    log = log_path.read_text()[before:]
    assert MARKER not in log and "Traceback" not in log
    lines = [line for line in log.splitlines() if "embedding_pipeline.search.access" in line]
    assert len(lines) == len(sent)
    assert "POST /api/v1/semantic_search/{table} 200 " in lines[0]
    assert lines[0].endswith(f"query_chars={len(MARKER) + 7}")
    assert "GET /api/v1/topics/{topic}/messages 404 " in lines[4]
    ids = [answer.headers["x-request-id"] for answer in sent]
    assert all(
        f"request={request_id} " in line for request_id, line in zip(ids, lines, strict=True)
    )


# -- metrics ----------------------------------------------------------------------------------


def _metrics(api: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = api.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_parse_and_count_the_requests_just_made(api: httpx.Client):
    route = "/api/v1/semantic_search/{table}"
    query = f"metrics {time.time()}"  # new to the cache
    before = _metrics(api)
    answers = [
        api.post(SEARCH, json={"query": query}),
        api.post(SEARCH, json={"query": query, "mode": "hybrid"}),
        api.post(SEARCH, json={"query": "deploy", "mode": "text"}),
        api.post(SEARCH, json={"query": ""}),
        api.get("/api/v1/similar/messages/999999"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 422, 404]
    after = _metrics(api)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests = "ep_search_requests_total"
    assert grew(requests, route=route, method="POST", status="200") == 3
    assert grew(requests, route=route, method="POST", status="422") == 1
    assert grew(requests, route="/api/v1/similar/{table}/{id}", method="GET", status="404") == 1
    assert grew(requests, route="/metrics", method="GET", status="200") == 1
    assert grew("ep_search_request_duration_seconds_count", route=route) == 4
    assert grew("ep_search_query_embedding_seconds_count") == 2
    # 3 searches, and a model check before each of the 2 embeddings unless the column's
    # model was checked within the last few seconds
    assert 3 <= grew("ep_search_database_seconds_count", route=route) <= 5
    assert grew("ep_search_query_vectors_total", source="model") == 1
    assert grew("ep_search_query_vectors_total", source="cache") == 1
    assert after[("ep_search_requests_in_flight", ())] == 1  # the /metrics request itself
    assert after[("ep_search_query_cache_entries", ())] >= 1


# -- concurrency and CORS -------------------------------------------------------------------


def test_concurrent_clients_get_the_answers_one_client_gets(api: httpx.Client):
    """16 clients at once, repeats included: every answer is the one a lone request gets
    (the shared embeddings and batches change nothing)."""
    queries = [f"deploy failed on day {i % 6}" for i in range(32)]
    alone = {q: api.post(SEARCH, json={"query": q, "limit": 5}).json()["results"] for q in queries}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: api.post(SEARCH, json={"query": q, "limit": 5}), queries))
    assert all(a.status_code == 200 for a in answers)
    for query, answer in zip(queries, answers, strict=True):
        assert [h["id"] for h in answer.json()["results"]] == [h["id"] for h in alone[query]]


def test_cors_is_off_unless_origins_are_configured(sample: Settings, api: httpx.Client, tmp_path):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    closed = api.options(SEARCH, headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    env = {
        "DATABASE_URL": sample.effective_database_url,
        "EP_API_KEYS": KEYS[0],
        "EP_API_CORS_ORIGINS": "https://app.example.com",
    }
    with serve(env, tmp_path) as (base, _), httpx.Client(base_url=base, timeout=30) as client:
        allowed = client.options(SEARCH, headers=preflight)
        other = client.options(SEARCH, headers={**preflight, "Origin": "https://evil.example"})
        simple = client.get(
            "/api/v1/topics/2/messages",
            headers={"Origin": "https://app.example.com", "Authorization": f"Bearer {KEYS[0]}"},
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
