"""Provider faults against a real local server that injects them
(`embedding_pipeline.testing.FaultServer`), real Dagster runs and the real test database: a
storm of 429s and 500s, refused connections, resets and cut-off answers, a row the provider
rejects, a 1 MB text, whole-provider errors, rate-limit headers; and the
`embedding-pipeline errors` commands."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import numpy as np
import pytest

from embedding_pipeline import cli
from embedding_pipeline.checks import LAG, NO_FAILED
from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, build_embedder
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.quality.status import table_status
from embedding_pipeline.lib.store import db
from embedding_pipeline.resources import PostgresResource
from embedding_pipeline.runner import run_embedding_checks
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.sensors import BACKLOG_SENSOR
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline.testing.vectors import fake_vector
from embedding_pipeline_tests.support.faults import (
    OLLAMA_ID,
    OPENAI_ID,
    SECRET,
    assert_embedded,
    materialize,
    metadata,
    model_id,
    month_rows,
    resource,
    schema_for,
    stored,
)
from embedding_pipeline_tests.support.runs import event_log_text


@pytest.fixture(scope="module")
def faults_db(database_url: str) -> Settings:
    return schema_for(database_url)


# --- transient faults: one run rides them out ----------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_a_storm_of_429_and_500_is_ridden_out_by_one_run(
    provider: str, faults_db: Settings, fault_server: FaultServer, instance: dg.DagsterInstance
) -> None:
    month = "2025-03-01" if provider == "openai" else "2025-04-01"
    ids = month_rows(faults_db, month, 160, f"storm {provider}")
    fault_server.configure(rate_429=0.3, rate_500=0.1, retry_after=0, retry_after_ms=20)

    result = materialize(
        faults_db, resource(provider, fault_server, batch_size=8, concurrency=4), month, instance
    )

    assert result.success
    counts = fault_server.snapshot()
    assert counts.outcomes["429"] > 0 and counts.outcomes["500"] > 0, counts.outcomes
    assert_embedded(faults_db, ids, model_id(provider))
    texts = {content for content, *_ in stored(faults_db, ids).values()}
    # every text was answered exactly once: a retry re-sent only requests that failed
    assert set(counts.answered) == texts
    assert counts.answered_more_than_once() == []
    assert counts.sent_more_than_once(), "the storm made the engine send some texts again"
    meta = metadata(result)
    assert meta["rows_embedded"] == len(ids) and meta["rows_failed"] == 0
    # each failed request was retried once, and none gave up
    assert meta["retries"] == counts.faults
    assert meta["retry_seconds_waited"] > 0


def test_resets_and_cut_off_answers_are_retried(
    faults_db: Settings, fault_server: FaultServer, instance: dg.DagsterInstance
) -> None:
    month = "2025-05-01"
    ids = month_rows(faults_db, month, 48, "connection faults")
    fault_server.configure(
        script=("reset", "cutoff"), rate_reset=0.15, rate_cutoff=0.15, latency=0.02
    )

    result = materialize(
        faults_db, resource("ollama", fault_server, batch_size=4, concurrency=2), month, instance
    )

    assert result.success
    assert_embedded(faults_db, ids, OLLAMA_ID)
    counts = fault_server.snapshot()
    assert counts.outcomes["reset"] > 0 and counts.outcomes["cutoff"] > 0, counts.outcomes
    assert counts.answered_more_than_once() == []
    assert metadata(result)["retries"] == counts.faults


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_a_provider_refusing_connections_for_a_while_is_waited_for(
    provider: str, fault_server: FaultServer
) -> None:
    embedder = resource(provider, fault_server, retry_deadline_seconds=10.0).build()
    fault_server.down(0.5, mode="refuse")  # the port is closed: connections are refused
    started = time.monotonic()

    vectors = embedder.embed(["are you there?"])

    assert time.monotonic() - started >= 0.4
    np.testing.assert_allclose(vectors[0], fake_vector("are you there?"), atol=1e-6)
    assert embedder.retry_stats.reasons.get("connection", 0) >= 1
    assert dict(fault_server.snapshot().outcomes) == {"200": 1}


def test_retry_after_is_honoured(fault_server: FaultServer) -> None:
    fault_server.configure(script=("429",), retry_after=1)
    embedder = build_embedder(
        "openai",
        openai_api_key=SECRET,
        openai_base_url=fault_server.openai_base_url,
        dimensions=LOCAL_DIMENSION,
        retry=RetryPolicy(deadline_seconds=10, base_seconds=0.01),
    )
    started = time.monotonic()
    embedder.embed(["wait for me"])
    assert time.monotonic() - started >= 1.0
    assert embedder.retry_stats.retries == 1 and embedder.retry_stats.seconds_waited >= 1.0
    assert dict(fault_server.snapshot().outcomes) == {"429": 1, "200": 1}


def test_rate_limit_headers_slow_the_client_before_it_is_refused(fault_server: FaultServer) -> None:
    """The server grants 3 requests a second and says so in x-ratelimit-*: the client
    waits for the reset once the budget is spent, and is never answered 429."""
    fault_server.configure(requests_per_window=3, window_seconds=1.0)
    embedder = build_embedder(
        "openai",
        openai_api_key=SECRET,
        openai_base_url=fault_server.openai_base_url,
        dimensions=LOCAL_DIMENSION,
        retry=RetryPolicy(deadline_seconds=0),
    )
    for i in range(6):
        embedder.embed([f"budget {i}"])
    assert dict(fault_server.snapshot().outcomes) == {"200": 6}
    # the wait for the reset: a second less the time the first three requests took
    assert embedder.stats.rate_limit_seconds > 0.3


# --- the provider refuses: fast failure, or one row isolated --------------------------------


@pytest.mark.parametrize(
    ("provider", "status", "reason"),
    [
        ("openai", 401, f"Incorrect API key provided: {SECRET}"),
        ("ollama", 404, 'model "all-minilm" not found, try pulling it first'),
    ],
)
def test_a_whole_provider_error_fails_the_run_fast_with_its_reason(
    provider: str,
    status: int,
    reason: str,
    faults_db: Settings,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
) -> None:
    month = "2025-06-01" if provider == "openai" else "2025-07-01"
    ids = month_rows(faults_db, month, 8, f"refused {provider}")
    fault_server.configure(status=status, status_message=reason)
    before = stored(faults_db, ids)

    started = time.monotonic()
    result = materialize(
        faults_db,
        resource(provider, fault_server, retry_deadline_seconds=300.0),
        month,
        instance,
    )

    assert not result.success
    assert time.monotonic() - started < 20  # not 300 s of retries
    assert fault_server.snapshot().requests == 1
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data
    description = data.user_failure_data.description if data.user_failure_data else ""
    assert description and f"answered HTTP {status}: " in description
    assert reason.replace(SECRET, "***") in description
    assert SECRET not in event_log_text(instance, result.run_id)
    assert stored(faults_db, ids) == before


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[int, str, str]]:
    """`embedding-pipeline ARGS` in this process: (exit code, stdout, stderr). Keyword
    arguments set environment variables."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))

    def run(*args: str, **env: str) -> tuple[int, str, str]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_materialize_names_refused_rows_and_fails_on_a_401_in_one_line_without_the_key(
    faults_db: Settings, fault_server: FaultServer, run_cli: Callable[..., tuple[int, str, str]]
) -> None:
    """`embedding-pipeline materialize` as a user runs it: a refused row is named and the
    command succeeds; a key refused by the provider fails it with the reason, no key."""
    env = {
        "DATABASE_URL": faults_db.effective_database_url,
        "EP_EMBEDDING_PROVIDER": "openai",
        "EP_EMBEDDING_DIMENSIONS": "384",
        "OPENAI_API_KEY": SECRET,
        "OPENAI_BASE_URL": fault_server.openai_base_url,
    }
    [*_, bad] = month_rows(faults_db, "2025-10-01", 4, "cli")
    with db.connection(faults_db.effective_database_url) as conn:
        conn.execute("UPDATE messages SET content = 'POISON for the CLI' WHERE id = %s", (bad,))
        conn.commit()
    fault_server.configure(poison=("POISON",))

    code, out, err = run_cli("materialize", "--table", "messages", **env)

    assert (code, out.splitlines()[-1]) == (
        0,
        "1 row(s) refused by the provider are recorded in the errors table: "
        "`embedding-pipeline errors list`",
    )
    assert out.splitlines()[0].endswith(", failed 1")
    assert SECRET not in out + err

    month_rows(faults_db, "2025-11-01", 4, "cli 401")
    fault_server.configure(status=401, status_message=f"Incorrect API key provided: {SECRET}")

    code, out, err = run_cli("materialize", "--table", "messages", **env)

    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("error: materialize_all failed: ")
    assert "answered HTTP 401: " in last and "Incorrect API key provided: ***" in last
    assert "Traceback" not in err and SECRET not in out + err


def test_a_poisoned_row_is_isolated_recorded_bounded_and_cleared_by_an_edit(
    fresh_database_url: str,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
    run_cli: Callable[..., tuple[int, str, str]],
) -> None:
    settings = schema_for(fresh_database_url)
    month = "2025-03-01"
    ids = month_rows(settings, month, 64, "poison test")
    bad = ids[37]
    with db.connection(fresh_database_url) as conn:
        conn.execute("UPDATE messages SET content = 'POISON: refuse me' WHERE id = %s", (bad,))
        conn.commit()
    fault_server.configure(poison=("POISON",))
    embedder = resource("openai", fault_server, batch_size=16)
    spec = settings.tables["messages"]

    first = materialize(settings, embedder, month, instance)

    assert first.success
    meta = metadata(first)
    assert meta["rows_embedded"] == len(ids) - 1 and meta["run_rows_failed"] == 1
    [sample] = meta["failed_samples"]
    assert sample["id"] == bad and "HTTP 400" in sample["reason"] and "POISON" in sample["reason"]
    assert_embedded(settings, [i for i in ids if i != bad], OPENAI_ID)
    assert stored(settings, [bad])[bad][1] is None
    with db.connection(fresh_database_url) as conn:
        [record] = row_errors.list_errors(conn, [spec])
    assert (record.table, record.row_id, record.attempts) == ("messages", bad, 1)
    assert record.error_class == "HTTP 400" and "POISON" in record.message

    code, out, _ = run_cli("errors", "list", DATABASE_URL=fresh_database_url)
    assert code == 0
    [line] = [line for line in out.splitlines() if line.startswith("messages")]
    assert line.split()[:3] == ["messages", str(bad), "1"] and "HTTP 400" in line

    sent_in_first_run = fault_server.snapshot().received["POISON: refuse me"]
    for _ in range(2):
        assert materialize(settings, embedder, month, instance).success
    # tried again alone by each of the next two runs: 3 attempts in all ...
    assert fault_server.snapshot().received["POISON: refuse me"] - sent_in_first_run == 2
    with db.connection(fresh_database_url) as conn:
        [record] = row_errors.list_errors(conn, [spec])
    assert record.attempts == 3 and record.next_attempt_at is None
    checks = run_embedding_checks(
        settings,
        defs=build_definitions(
            settings,
            {
                "postgres": PostgresResource(database_url=fresh_database_url),
                "embedder": embedder,
            },
        ),
        instance=instance,
        tables=["messages"],
    )
    outcome = {o.check: o for o in checks.outcomes}
    assert not outcome[NO_FAILED].passed and outcome[NO_FAILED].severity == "ERROR"
    assert f"id {bad}: " in outcome[NO_FAILED].description
    assert "HTTP 400" in outcome[NO_FAILED].description
    # the missing check counts the given-up row as failed, not pending: a warning only
    missing = outcome["no_missing_embeddings"]
    assert (missing.severity, missing.metadata["missing_pending"]) == ("WARN", 0)
    assert missing.metadata["missing_failed"] == 1

    fault_server.reset_counts()
    # ... and then never again
    fourth = materialize(settings, embedder, month, instance)
    assert fourth.success and metadata(fourth)["provider_requests"] == 0
    assert fault_server.snapshot().requests == 0
    code, out, _ = run_cli("errors", "list", "--json", DATABASE_URL=fresh_database_url)
    [listed] = json.loads(out)
    assert (listed["id"], listed["attempts"], listed["next_attempt_at"]) == (bad, 3, None)

    with db.connection(fresh_database_url) as conn:
        conn.execute("UPDATE messages SET content = 'a harmless text' WHERE id = %s", (bad,))
        conn.commit()
    fixed = materialize(settings, embedder, month, instance)

    assert fixed.success and metadata(fixed)["rows_embedded"] == 1
    assert_embedded(settings, ids, OPENAI_ID)
    with db.connection(fresh_database_url) as conn:
        assert row_errors.list_errors(conn, [spec]) == []
    assert fault_server.snapshot().received == {"a harmless text": 1}


def test_a_row_given_up_serves_no_stale_vector_and_counts_as_failed_everywhere(
    fresh_database_url: str,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
    run_cli: Callable[..., tuple[int, str, str]],
) -> None:
    """A row embedded once, then edited into text the provider refuses for good: while it
    waits for its next tries it still has its old vector; once given up, the vector is
    withdrawn, so no search mode finds the old text, and status, the checks and the
    backlog sensor count the row as failed. Emptying a row's text withdraws its vector at
    once and is counted apart, not as a failure."""
    settings = schema_for(fresh_database_url)
    month = "2025-06-01"
    ids = month_rows(settings, month, 6, "given up")
    bad, emptied = ids[2], ids[4]
    embedder = resource("openai", fault_server, batch_size=4)
    assert materialize(settings, embedder, month, instance).success
    with db.connection(fresh_database_url) as conn:
        old_text = conn.execute("SELECT content FROM messages WHERE id = %s", (bad,)).fetchone()[0]
        conn.execute("UPDATE messages SET content = 'POISON: refuse me' WHERE id = %s", (bad,))
        conn.execute("UPDATE messages SET content = '  ' WHERE id = %s", (emptied,))
        conn.commit()
    fault_server.configure(poison=("POISON",))
    searcher = Searcher(settings, embedder=embedder.build())
    engine = engine_for(fresh_database_url)

    def found(text: str, mode: str) -> list[int]:
        with engine.connect() as conn:
            hits = searcher.search(conn, text, table="messages", k=10, mode=mode)
        return [int(h.id) for h in hits]

    first = materialize(settings, embedder, month, instance)
    assert first.success and metadata(first)["vectors_withdrawn"] == 1  # the emptied row
    assert stored(settings, [bad])[bad][1] is not None  # refused once: tried again later
    assert found(old_text, "vector")[0] == bad
    for _ in range(2):
        assert materialize(settings, embedder, month, instance).success
    assert stored(settings, [bad, emptied]) and all(
        row[1] is None for row in stored(settings, [bad, emptied]).values()
    )
    for mode in ("vector", "hybrid"):
        assert bad not in found(old_text, mode), mode
        assert emptied not in found(old_text, mode), mode

    with db.connection(fresh_database_url) as conn:
        status = table_status(conn, settings.tables["messages"], OPENAI_ID)
    assert (status.missing, status.failed, status.empty) == (0, 1, 1)
    code, out, err = run_cli(
        "status",
        DATABASE_URL=fresh_database_url,
        EP_EMBEDDING_PROVIDER="openai",
        EP_EMBEDDING_DIMENSIONS="384",
        OPENAI_API_KEY=SECRET,
    )
    assert code == 0, err
    assert "1 row(s) the provider refused have no current vector" in out
    defs = build_definitions(
        settings,
        {"postgres": PostgresResource(database_url=fresh_database_url), "embedder": embedder},
    )
    outcome = {
        o.check: o
        for o in run_embedding_checks(
            settings, defs=defs, instance=instance, tables=["messages"]
        ).outcomes
    }
    assert (outcome[NO_FAILED].passed, outcome[NO_FAILED].severity) == (False, "ERROR")
    assert outcome[NO_FAILED].metadata["empty_text"] == 1
    assert not outcome[LAG].passed and "refused for good" in outcome[LAG].description
    missing = outcome["no_missing_embeddings"]  # the emptied row: a warning only
    assert (missing.passed, missing.severity) == (False, "WARN")
    assert missing.metadata["missing_empty_text"] == 1
    tick = defs.resolve_sensor_def(BACKLOG_SENSOR)(
        dg.build_sensor_context(instance=instance, resources=defs.resources)
    )
    assert not tick.run_requests
    assert tick.skip_reason is not None
    reason = tick.skip_reason.skip_message or ""
    assert "1 given up" in reason and "1 with empty text" in reason

    with db.connection(fresh_database_url) as conn:
        conn.execute("UPDATE messages SET content = 'fixed again' WHERE id = %s", (bad,))
        conn.commit()
    assert materialize(settings, embedder, month, instance).success
    assert found("fixed again", "vector")[0] == bad


@pytest.mark.parametrize(("provider", "limit"), [("openai", 8191), ("ollama", 2048)])
def test_a_1_mb_text_is_cut_to_the_model_limit_and_keeps_its_full_hash(
    provider: str,
    limit: int,
    faults_db: Settings,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
) -> None:
    month = "2025-08-01" if provider == "openai" else "2025-09-01"
    [row] = month_rows(faults_db, month, 1, f"huge {provider}")
    text = (f"{provider}: all work and no play makes a dull text. " * 25_000)[:1_000_000]
    with db.connection(faults_db.effective_database_url) as conn:
        conn.execute("UPDATE messages SET content = %s WHERE id = %s", (text, row))
        conn.commit()
    cut = text.encode()[:limit].decode("utf-8", "ignore")

    result = materialize(faults_db, resource(provider, fault_server), month, instance)

    assert result.success
    meta = metadata(result)
    assert (meta["rows_embedded"], meta["truncated"], meta["rows_failed"]) == (1, 1, 0)
    assert fault_server.snapshot().received == {cut: 1}  # the server refuses anything over 32 KB
    _, embedding, model, digest, source = stored(faults_db, [row])[row]
    np.testing.assert_allclose(embedding.to_numpy(), fake_vector(cut), atol=1e-6)
    assert model == model_id(provider)
    assert digest == source == hashlib.sha256(text.encode()).hexdigest()


# --- embedding-pipeline errors --------------------------------------------------------------


@pytest.fixture
def recorded(fresh_database_url: str) -> Settings:
    """Failures recorded for messages 1 and 2 and topic 1 (no rows needed: the commands
    read and change the errors table only)."""
    settings = schema_for(fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        for key, failures in (
            ("messages", [(1, "HTTP 400", "too long"), (2, "empty_text", "the text is empty")]),
            ("topics", [(1, "HTTP 422", "unprocessable")]),
        ):
            row_errors.record_failures(
                conn,
                settings.tables[key],
                OPENAI_ID,
                [row_errors.RowFailure(rid, "h", cls, msg) for rid, cls, msg in failures],
                row_errors.RowErrorPolicy(retry_base_seconds=3600),
            )
        conn.commit()
    return settings


def errors_json(
    run_cli: Callable[..., tuple[int, str, str]], *args: str, **env: str
) -> list[dict[str, Any]]:
    code, out, _ = run_cli("errors", "list", "--json", *args, **env)
    assert code == 0
    return json.loads(out)


def test_errors_list_retry_and_clear(
    recorded: Settings, run_cli: Callable[..., tuple[int, str, str]]
) -> None:
    url = recorded.effective_database_url
    code, out, err = run_cli("errors", "list", DATABASE_URL=url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["table", "id", "attempts", "next", "try", "reason"]
    assert lines[1].split()[:3] == ["messages", "1", "1"] and lines[1].endswith("too long")
    assert "given up" in lines[2] and lines[2].endswith("the text is empty")
    assert lines[3].split()[:3] == ["topics", "1", "1"] and "UTC" in lines[3]
    assert lines[4].startswith("3 failed row(s)")
    assert [(r["table"], r["id"]) for r in errors_json(run_cli, "--table", "topics")] == [
        ("topics", 1)
    ]

    assert run_cli("errors", "retry", "2", "--table", "messages")[:2] == (
        0,
        "messages: 1 row(s) due again, attempts reset\nthe next run tries them: "
        "`embedding-pipeline materialize`, or launch their partitions in the Dagster UI\n",
    )
    retried = {(r["table"], r["id"]): r for r in errors_json(run_cli)}
    assert retried["messages", 2]["attempts"] == 0
    due = datetime.fromisoformat(retried["messages", 2]["next_attempt_at"])
    assert due <= datetime.now(UTC)
    assert retried["messages", 1]["attempts"] == 1  # untouched

    assert run_cli("errors", "clear", "--all", "--table", "messages")[:2] == (
        0,
        "messages: 2 record(s) removed; the rows are pending again\n",
    )
    assert [(r["table"], r["id"]) for r in errors_json(run_cli)] == [("topics", 1)]
    assert run_cli("errors", "clear", "1")[0] == 0
    assert run_cli("errors", "list")[1] == "no failed rows\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retry"], "errors retry: name the row ids (see `errors list`) or --all"),
        (["clear", "1", "--all"], "errors clear: name row ids or --all, not both"),
        (["retry", "x1"], "errors retry: 'x1' is not a row id"),
        (
            ["retry", "1"],
            "errors retry: id 1 (messages, topics) is recorded for more than one table; "
            "name one with --table",
        ),
        (
            ["clear", "9", "--table", "messages"],
            "errors clear: no failed row with id 9 in messages (see `errors list`)",
        ),
    ],
)
def test_errors_commands_refuse_bad_input_in_one_line(
    recorded: Settings,
    run_cli: Callable[..., tuple[int, str, str]],
    args: list[str],
    message: str,
) -> None:
    before = errors_json(run_cli, DATABASE_URL=recorded.effective_database_url)
    assert run_cli("errors", *args) == (2, "", f"error: {message}\n")
    assert errors_json(run_cli) == before


def test_errors_on_a_database_without_the_schema_say_what_to_run(
    fresh_database_url: str, run_cli: Callable[..., tuple[int, str, str]]
) -> None:
    code, _, err = run_cli("errors", "list", DATABASE_URL=fresh_database_url)
    assert code == 2 and err.startswith("error: the database has no table(s)")
    assert "`embedding-pipeline schema`" in err and err.count("\n") == 1
