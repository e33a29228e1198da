"""The asset checks, run through Dagster against the real database: each one is made to fail
by really breaking the table (NULLs, edited text, dropped or wrong indexes, a narrow
ef_search, a column of another dimension) and then to pass again once the pipeline repairs
it. Results are read from the run (`get_asset_check_evaluations`) and from the instance."""

from dataclasses import replace
from datetime import UTC, datetime

import dagster as dg
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from embedding_pipeline import checks, runner
from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib import quality
from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID
from embedding_pipeline.lib.engine.claims import CLAIM_SESSION_NAME, lock_namespace
from embedding_pipeline.lib.quality.index import _index_options
from embedding_pipeline.lib.quality.search import _percentile
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import bulk_load_lock_key
from embedding_pipeline.settings import CheckSettings, HnswSettings, TableSpec, load_settings
from embedding_pipeline_tests.support.runs import embed_months

MESSAGES = "message_embeddings"
TOPICS = "topic_embeddings"
SEPTEMBER = "2025-09-01"
OCTOBER = "2025-10-01"
MESSAGES_INDEX = "messages_embedding_hnsw_idx"


_embed = embed_months


def _check_defs(defs, keys):
    return [c for c in defs.asset_checks if set(c.check_keys) & set(keys)]


def _run_checks(defs, instance, asset, *names):
    """Execute only the named checks of `asset` in a Dagster run; the run and evaluations."""
    keys = [dg.AssetCheckKey(dg.AssetKey(asset), name) for name in names]
    result = dg.materialize(
        [defs.get_assets_def(asset), *_check_defs(defs, keys)],
        selection=dg.AssetSelection.checks(*keys),
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(names)
    return result, evaluations


def _check(defs, instance, asset, name):
    return _run_checks(defs, instance, asset, name)[1][name]


def _meta(evaluation):
    return {key: value.value for key, value in evaluation.metadata.items()}


def _sql(conn, *statements):
    for statement in statements:
        conn.execute(statement)
    conn.commit()


def _ids(conn, table, where="TRUE"):
    return [r[0] for r in conn.execute(f"SELECT id FROM {table} WHERE {where} ORDER BY id")]  # noqa: S608


def _variant(settings, resources, *, hnsw=None, **check_fields):
    changed = replace(
        settings,
        checks=replace(settings.checks, **check_fields),
        hnsw=hnsw or settings.hnsw,
    )
    return build_definitions(changed, resources)


@pytest.fixture(scope="module")
def embedded(small_data, defs, instance):
    """The small data set, embedded; each test leaves it as it found it."""
    _embed(defs, instance, MESSAGES, TOPICS, "atom_embeddings")
    return small_data


def test_every_embedding_asset_carries_nine_checks_with_the_intended_blocking(defs):
    specs = {
        (spec.asset_key.to_user_string(), spec.name): spec
        for c in defs.asset_checks
        for spec in c.check_specs
    }
    assert len(specs) == 27
    for asset in (MESSAGES, TOPICS, "atom_embeddings"):
        blocking = {name for name in checks.CHECK_NAMES if specs[(asset, name)].blocking}
        assert blocking == {
            checks.NO_MISSING,
            checks.DIMENSION,
            checks.INDEX_PRESENT,
            checks.INDEX_USED,
        }
        assert all(specs[(asset, name)].description for name in checks.CHECK_NAMES)


def test_all_checks_pass_on_a_freshly_embedded_database(embedded, defs, instance, settings):
    run = runner.run_embedding_checks(settings, defs=defs, instance=instance)
    assert len(run.outcomes) == 27
    assert [o for o in run.outcomes if not o.passed] == []
    by_key = {(o.asset, o.check): o for o in run.outcomes}
    assert by_key[(MESSAGES, checks.NO_MISSING)].metadata["missing"] == 0
    assert by_key[(MESSAGES, checks.NO_MISSING)].metadata["rows"] == 4
    assert by_key[(MESSAGES, checks.NO_STALE)].metadata["stale"] == 0
    assert by_key[(MESSAGES, checks.INDEX_USED)].metadata["can_serve"] is True
    assert by_key[(MESSAGES, checks.RECALL)].metadata["recall"] == 1.0
    assert by_key[(MESSAGES, checks.LATENCY)].metadata["p95_ms"] > 0
    assert by_key[(MESSAGES, checks.LAG)].metadata["pending_rows"] == 0
    assert instance.get_run_by_id(run.run_id).job_name == "run_checks"
    lines = runner.summary_lines(run)
    assert len(lines) == 28
    assert any("missing 0 of 4 rows" in line for line in lines)
    assert any("recall@10 1.000" in line for line in lines)
    assert any("p95" in line for line in lines)


def test_missing_embeddings_wait_for_a_run_then_fail_once_overdue_then_pass(
    embedded, defs, instance, conn, settings
):
    """Alone (no run materialized the asset), rows missing for less than the freshness
    limit are the next run's and pass; rows overdue with no run embedding them are an
    ERROR that names them, whoever else holds some of them."""
    nulled = _ids(conn, "messages")[:2]
    _sql(conn, f"UPDATE messages SET embedding = NULL WHERE id IN ({nulled[0]}, {nulled[1]})")  # noqa: S608
    result, evaluations = _run_checks(defs, instance, MESSAGES, checks.NO_MISSING)
    waiting = evaluations[checks.NO_MISSING]
    assert waiting.passed and result.success
    assert _meta(waiting)["missing"] == 2 and _meta(waiting)["missing_overdue"] == 0
    assert "2 waiting less than 15 min for a run" in (waiting.description or "")

    conn.execute(
        "UPDATE messages SET embedding_pending_since = now() - interval '20 minutes' "
        "WHERE id = ANY(%s)",
        (nulled,),
    )
    conn.commit()
    claim = (lock_namespace(settings.tables["messages"]) << 32) + nulled[1]
    with db.connection(settings.effective_database_url, autocommit=True) as other:
        other.execute(
            "SELECT set_config('application_name', %s, false)",
            [f"{CLAIM_SESSION_NAME} run feedf00d"],
        )
        other.execute(f"SELECT pg_advisory_lock({claim})")
        result, evaluations = _run_checks(defs, instance, MESSAGES, checks.NO_MISSING)
    failed = evaluations[checks.NO_MISSING]
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.ERROR
    meta = _meta(failed)
    assert (meta["missing"], meta["missing_overdue"], meta["rows"]) == (2, 1, 4)
    assert meta["missing_claimed_by_another_run"] == 1
    assert meta["sample_ids"][0] == nulled[0]
    assert "run feedf00d" in meta["claimed_by"][0]
    assert "no run is embedding them" in (failed.description or "")
    assert not result.success, "a blocking ERROR check fails its run"
    key = dg.AssetCheckKey(dg.AssetKey(MESSAGES), checks.NO_MISSING)
    recorded = instance.get_latest_asset_check_evaluation_record(key).evaluation
    assert recorded.passed is False
    assert recorded.metadata["missing"].value == 2

    _embed(defs, instance, MESSAGES)
    result, evaluations = _run_checks(defs, instance, MESSAGES, checks.NO_MISSING)
    assert evaluations[checks.NO_MISSING].passed
    assert result.success
    assert instance.get_latest_asset_check_evaluation_record(key).evaluation.passed


def test_the_rows_a_run_owes_are_those_of_its_months_that_existed_when_it_started(
    embedded, defs, instance, conn, settings
):
    """The measurement behind the check: a row missing since before the start snapshot is
    owed; one inserted after it, or edited after it (a new row version), is not."""
    spec = settings.tables["messages"]
    october = _ids(conn, "messages", "sent_at >= '2025-10-01'")
    _sql(conn, f"UPDATE messages SET embedding = NULL WHERE id = {october[0]}")  # noqa: S608
    snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    conn.commit()
    _sql(conn, f"UPDATE messages SET embedding = NULL WHERE id = {october[1]}")  # noqa: S608
    window = Window(start=datetime(2025, 10, 1, tzinfo=UTC))

    def measure() -> quality.MissingReport:
        with db.connection(settings.effective_database_url, vector=False) as fresh:
            return quality.count_missing(
                fresh,
                spec,
                sample_ids=5,
                model_id=LOCAL_MODEL_ID,
                overdue_minutes=15,
                window=window,
                start_snapshot=snapshot,
            )

    report = measure()
    assert report.in_run
    assert (report.owed, report.new_in_run, report.pending_in_run) == (1, 1, 2)
    assert report.sample_ids[0] == october[0]
    assert check_outcome(report).severity == dg.AssetCheckSeverity.ERROR
    _sql(conn, f"UPDATE messages SET content = content || ' (edited)' WHERE id = {october[0]}")  # noqa: S608
    report = measure()
    assert (report.owed, report.new_in_run) == (0, 2)
    outcome = check_outcome(report)
    assert outcome.passed
    assert "2 written after this run started" in (outcome.description or "")
    _sql(conn, f"UPDATE messages SET content = 'Lunch order for Friday' WHERE id = {october[0]}")  # noqa: S608
    _embed(defs, instance, MESSAGES)


def check_outcome(report: quality.MissingReport) -> dg.AssetCheckResult:
    return checks.missing_outcome(report, OCTOBER, 15)


def test_embedding_lag_warns_with_the_months_of_rows_waiting_too_long_then_passes(
    embedded, defs, instance, conn
):
    """The trigger stamps `embedding_pending_since` when a vector is removed; a row that
    has waited 20 minutes is past the 15-minute default, one that waited 2 is not."""
    september = _ids(conn, "messages", "sent_at < '2025-10-01'")[0]
    october = _ids(conn, "messages", "sent_at >= '2025-10-01'")[0]
    waited = "UPDATE messages SET embedding_pending_since = now() - %s::interval WHERE id = %s"
    conn.execute("UPDATE messages SET embedding = NULL WHERE id IN (%s, %s)", (september, october))
    conn.execute(waited, ("2 minutes", october))
    conn.commit()
    assert _check(defs, instance, MESSAGES, checks.LAG).passed, "2 minutes is within 15"
    conn.execute(waited, ("20 minutes", september))
    conn.commit()
    lag = _check(defs, instance, MESSAGES, checks.LAG)
    assert not lag.passed
    assert lag.severity == dg.AssetCheckSeverity.WARN
    meta = _meta(lag)
    assert meta["pending_rows"] == 2
    assert 19.5 < meta["oldest_pending_minutes"] < 25
    assert meta["pending_by_partition"] == {SEPTEMBER: 1, OCTOBER: 1}
    assert f"{SEPTEMBER}: 1" in lag.description

    _embed(defs, instance, MESSAGES)
    lag = _check(defs, instance, MESSAGES, checks.LAG)
    assert lag.passed and _meta(lag)["pending_rows"] == 0


def test_missing_check_in_a_partition_run_errors_only_for_its_own_rows(
    embedded, defs, instance, conn, settings
):
    september = _ids(conn, "messages", "sent_at < '2025-10-01'")
    october = _ids(conn, "messages", "sent_at >= '2025-10-01'")
    key = dg.AssetCheckKey(dg.AssetKey(MESSAGES), checks.NO_MISSING)
    selection = dg.AssetSelection.assets(MESSAGES).without_checks() | dg.AssetSelection.checks(key)
    assets = [defs.get_assets_def(MESSAGES), *_check_defs(defs, [key])]

    def october_run():
        result = dg.materialize(
            assets,
            selection=selection,
            resources=defs.resources,
            instance=instance,
            partition_key=OCTOBER,
            raise_on_error=False,
        )
        return result, result.get_asset_check_evaluations()[0]

    # a row of another month, missing for minutes: the next run's, this one passes
    _sql(conn, f"UPDATE messages SET embedding = NULL WHERE id = {september[0]}")  # noqa: S608
    result, evaluation = october_run()
    assert evaluation.passed and result.success
    assert _meta(evaluation)["missing_in_run_partitions"] == 0
    assert _meta(evaluation)["missing_owed_by_run"] == 0
    assert _meta(evaluation)["run_partitions"] == OCTOBER
    assert "1 pending in other months" in (evaluation.description or "")
    # ... overdue, with no run at it: a WARN to act on, but not this run's failure
    conn.execute(
        "UPDATE messages SET embedding_pending_since = now() - interval '1 hour' WHERE id = %s",
        (september[0],),
    )
    conn.commit()
    result, evaluation = october_run()
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _meta(evaluation)["sample_ids"] == [september[0]]
    assert result.success, "rows of other months do not fail this month's run"

    # a row of the run's own month that another session (not a run) keeps locked while
    # the run goes by: it existed when the run started, the run owes it: ERROR
    _sql(conn, f"UPDATE messages SET embedding = NULL WHERE id = {october[0]}")  # noqa: S608
    claim = (lock_namespace(settings.tables["messages"]) << 32) + october[0]
    _sql(conn, f"SELECT pg_advisory_lock({claim})")
    try:
        result, evaluation = october_run()
    finally:
        _sql(conn, f"SELECT pg_advisory_unlock({claim})")
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert _meta(evaluation)["missing_owed_by_run"] == 1
    assert _meta(evaluation)["missing_in_run_partitions"] == 1
    assert _meta(evaluation)["missing_claimed_by_another_run"] == 0
    assert f"ids {october[0]}" in (evaluation.description or "")
    assert not result.success, "the blocking check fails the run"

    # the same row claimed by another run's claiming session (a scale-out, an overlapping
    # backfill): that run is embedding it now, named in the result; this one passes
    with db.connection(settings.effective_database_url, autocommit=True) as other:
        other.execute(
            "SELECT set_config('application_name', %s, false)",
            [f"{CLAIM_SESSION_NAME} run 0badcafe"],
        )
        other.execute(f"SELECT pg_advisory_lock({claim})")
        result, evaluation = october_run()
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _meta(evaluation)["missing_claimed_by_another_run"] == 1
    assert _meta(evaluation)["missing_owed_by_run"] == 0
    assert "being embedded by another run" in (evaluation.description or "")
    assert "run 0badcafe" in (evaluation.description or "")
    assert result.success

    # an empty text: nothing to embed, no vector, counted apart; a warning, not a failure
    _sql(conn, f"UPDATE messages SET content = '' WHERE id = {october[0]}")  # noqa: S608
    conn.execute(
        "UPDATE messages SET embedding_pending_since = now() WHERE id = %s", (september[0],)
    )
    conn.commit()
    result, evaluation = october_run()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _meta(evaluation)["missing_empty_text"] == 1
    assert _meta(evaluation)["missing_failed"] == 0
    assert "1 with empty text" in (evaluation.description or "")
    assert result.success
    no_failed = _check(defs, instance, MESSAGES, checks.NO_FAILED)
    assert no_failed.passed
    assert _meta(no_failed)["empty_text"] == 1

    _sql(conn, f"UPDATE messages SET content = 'Lunch order for Friday' WHERE id = {october[0]}")  # noqa: S608
    _embed(defs, instance, MESSAGES)
    assert _check(defs, instance, MESSAGES, checks.NO_MISSING).passed
    assert _check(defs, instance, MESSAGES, checks.NO_FAILED).passed
    assert _check(defs, instance, MESSAGES, checks.NO_FAILED).description == "failed 0 rows"


def test_stale_embeddings_warn_for_edited_text_and_other_model_then_pass(
    embedded, defs, instance, conn
):
    edited, other = _ids(conn, "messages")[1:3]
    _sql(
        conn,
        f"UPDATE messages SET content = content || ' (edited)' WHERE id = {edited}",  # noqa: S608
        f"UPDATE messages SET embedding_model = 'openai:old-model' WHERE id = {other}",  # noqa: S608
    )
    result, evaluations = _run_checks(defs, instance, MESSAGES, checks.NO_STALE)
    failed = evaluations[checks.NO_STALE]
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.WARN
    meta = _meta(failed)
    assert meta["stale"] == 2
    assert meta["stale_text_changed"] == 1
    assert meta["stale_other_model"] == 1
    assert meta["sample_ids"] == [edited, other]
    assert meta["model"] == LOCAL_MODEL_ID
    assert result.success, "a WARN check does not fail the run"

    _embed(defs, instance, MESSAGES)
    assert _check(defs, instance, MESSAGES, checks.NO_STALE).passed


def test_dimension_check_fails_on_a_column_of_another_dimension(embedded, defs, instance, conn):
    passed = _check(defs, instance, TOPICS, checks.DIMENSION)
    assert passed.passed
    assert _meta(passed)["declared_dimension"] == 384
    assert _meta(passed)["stored_dimensions"] == {"384": 2}

    _sql(conn, "ALTER TABLE topics ALTER COLUMN embedding TYPE vector(8) USING NULL")
    failed = _check(defs, instance, TOPICS, checks.DIMENSION)
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.ERROR
    assert _meta(failed)["declared_dimension"] == 8
    assert _meta(failed)["model_dimension"] == 384
    assert _meta(failed)["column_type"] == "vector(8)"

    _sql(conn, "ALTER TABLE topics ALTER COLUMN embedding TYPE vector(384) USING NULL")
    _embed(defs, instance, TOPICS)
    assert _check(defs, instance, TOPICS, checks.DIMENSION).passed


def test_dimension_check_samples_stored_vectors_of_an_undeclared_column(
    embedded, defs, instance, conn
):
    bad = _ids(conn, "topics")[0]
    _sql(
        conn,
        "DROP INDEX topics_embedding_hnsw_idx",
        "ALTER TABLE topics ALTER COLUMN embedding TYPE vector USING embedding",
        f"UPDATE topics SET embedding = '[1,2,3]' WHERE id = {bad}",  # noqa: S608
    )
    failed = _check(defs, instance, TOPICS, checks.DIMENSION)
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.ERROR
    meta = _meta(failed)
    assert meta["column_type"] == "vector"
    assert meta["stored_dimensions"] == {"3": 1, "384": 1}
    assert meta["mismatched_ids"] == [bad]

    _sql(
        conn,
        f"UPDATE topics SET embedding = NULL WHERE id = {bad}",  # noqa: S608
        "ALTER TABLE topics ALTER COLUMN embedding TYPE vector(384) USING embedding",
    )
    _embed(defs, instance, TOPICS)
    assert _check(defs, instance, TOPICS, checks.DIMENSION).passed
    assert _check(defs, instance, TOPICS, checks.INDEX_PRESENT).passed


def test_index_checks_fail_without_the_index_and_with_the_wrong_operator_class(
    embedded, defs, instance, conn, settings
):
    names = (checks.INDEX_PRESENT, checks.INDEX_USED)
    _sql(conn, f"DROP INDEX {MESSAGES_INDEX}")
    result, evaluations = _run_checks(defs, instance, MESSAGES, *names)
    for name in names:
        assert not evaluations[name].passed
        assert evaluations[name].severity == dg.AssetCheckSeverity.ERROR
    assert "no HNSW index at all" in evaluations[checks.INDEX_PRESENT].description
    assert _meta(evaluations[checks.INDEX_USED])["can_serve"] is False
    assert not result.success

    # another run holds the column's build lock (it loads without the index and builds it
    # at its end, or is building it): reported with the run, a warning, not a failed run
    with db.connection(settings.effective_database_url, autocommit=True) as other:
        other.execute(
            "SELECT set_config('application_name', %s, false)",
            [f"{CLAIM_SESSION_NAME} run b1d0b1d0"],
        )
        other.execute(
            "SELECT pg_advisory_lock(%s)", [bulk_load_lock_key(settings.tables["messages"])]
        )
        result, evaluations = _run_checks(defs, instance, MESSAGES, *names)
    for name in names:
        assert not evaluations[name].passed
        assert evaluations[name].severity == dg.AssetCheckSeverity.WARN, name
        assert "run b1d0b1d0" in (evaluations[name].description or ""), name
    [builder] = _meta(evaluations[checks.INDEX_PRESENT])["built_by"]
    assert "holds the build lock" in builder
    assert result.success

    _sql(conn, f"CREATE INDEX {MESSAGES_INDEX} ON messages USING hnsw (embedding vector_l2_ops)")
    _result, evaluations = _run_checks(defs, instance, MESSAGES, *names)
    present = evaluations[checks.INDEX_PRESENT]
    assert not present.passed
    assert present.severity == dg.AssetCheckSeverity.ERROR
    assert [i["opclass"] for i in _meta(present)["hnsw_indexes"]] == ["vector_l2_ops"]
    used = evaluations[checks.INDEX_USED]
    assert not used.passed
    assert used.severity == dg.AssetCheckSeverity.ERROR
    assert "Seq Scan" in _meta(used)["forced_plan_outline"]

    _sql(conn, f"DROP INDEX {MESSAGES_INDEX}")
    _embed(defs, instance, MESSAGES)
    result, evaluations = _run_checks(defs, instance, MESSAGES, *names)
    assert result.success
    present, used = evaluations[checks.INDEX_PRESENT], evaluations[checks.INDEX_USED]
    assert present.passed and used.passed
    meta = _meta(present)
    assert (meta["index_name"], meta["opclass"], meta["m"], meta["ef_construction"]) == (
        MESSAGES_INDEX,
        "vector_cosine_ops",
        16,
        64,
    )
    assert meta["size_bytes"] > 0
    assert f"Index Scan using {MESSAGES_INDEX}" in _meta(used)["forced_plan_outline"]


def test_index_used_warns_when_the_planner_prefers_a_seqscan_above_the_row_limit(
    embedded, defs, settings, resources, instance, conn
):
    _sql(conn, "ANALYZE messages")
    at_small_size = _check(defs, instance, MESSAGES, checks.INDEX_USED)
    meta = _meta(at_small_size)
    assert at_small_size.passed
    assert meta["can_serve"] is True
    assert meta["chosen_by_default"] is False
    assert "Seq Scan on messages" in meta["default_plan_outline"]
    assert meta["default_plan"][0]["Plan"]["Node Type"] == "Limit"

    strict = _variant(settings, resources, planner_warn_rows=4)
    warned = _check(strict, instance, MESSAGES, checks.INDEX_USED)
    assert not warned.passed
    assert warned.severity == dg.AssetCheckSeverity.WARN
    assert _meta(warned)["can_serve"] is True


def test_recall_drops_below_threshold_with_a_tiny_ef_search_then_passes(
    embedded, defs, settings, resources, instance
):
    narrow = _variant(settings, resources, hnsw=replace(settings.hnsw, ef_search=1))
    failed = _check(narrow, instance, MESSAGES, checks.RECALL)
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.WARN
    meta = _meta(failed)
    assert meta["recall"] == pytest.approx(0.25)
    assert meta["ef_search"] == 1
    assert meta["queries"] == 4

    passed = _check(defs, instance, MESSAGES, checks.RECALL)
    meta = _meta(passed)
    assert passed.passed
    assert meta["recall"] == 1.0
    assert meta["threshold"] == 0.95
    assert meta["hnsw_plan"] == f"Limit > Index Scan using {MESSAGES_INDEX}"
    assert meta["exact_plan"] == "Limit > Sort > Seq Scan on messages"


def test_latency_reports_percentiles_and_warns_above_the_limit(
    embedded, defs, settings, resources, instance
):
    passed = _check(defs, instance, MESSAGES, checks.LATENCY)
    meta = _meta(passed)
    assert passed.passed
    assert 0 < meta["p50_ms"] <= meta["p95_ms"] <= meta["max_ms"]
    assert meta["queries"] == 4

    strict = _variant(settings, resources, latency_warn_ms=0.0)
    warned = _check(strict, instance, MESSAGES, checks.LATENCY)
    assert not warned.passed
    assert warned.severity == dg.AssetCheckSeverity.WARN
    assert _meta(warned)["warn_ms"] == 0.0


def test_a_database_error_is_a_failed_error_result_not_a_crash(
    embedded, settings, resources, instance
):
    spec = replace(settings.tables["messages"], embedding_column="no_such_column")
    broken = build_definitions(
        replace(settings, tables={**settings.tables, "messages": spec}), resources
    )
    _result, evaluations = _run_checks(
        broken, instance, MESSAGES, checks.NO_MISSING, checks.DIMENSION
    )
    missing, dimension = evaluations[checks.NO_MISSING], evaluations[checks.DIMENSION]
    assert not missing.passed and missing.severity == dg.AssetCheckSeverity.ERROR
    assert missing.description.startswith("database error: column")
    assert _meta(missing)["error_type"] == "UndefinedColumn"
    assert not dimension.passed
    assert dimension.description == "`messages.no_such_column` does not exist"


def test_a_check_that_raises_leaves_the_other_results_and_is_named(
    embedded, settings, resources, instance, monkeypatch
):
    """The checks of an asset share one step: a check that raises (a bug, not a database
    error) hides none of the others' results; the step fails after them, and the summary
    `embedding-pipeline check` prints names the check and what it raised."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the latency measurement broke")

    monkeypatch.setattr(quality, "measure_latency", broken)
    run = runner.run_embedding_checks(
        settings,
        defs=build_definitions(settings, resources),
        instance=instance,
        tables=["messages"],
    )
    outcomes = {o.check: o for o in run.outcomes}
    assert set(outcomes) == set(checks.CHECK_NAMES)
    latency = outcomes.pop(checks.LATENCY)
    assert not latency.passed and latency.severity == "ERROR"
    assert latency.description == (
        "no result, the check raised: RuntimeError: the latency measurement broke"
    )
    assert [o.check for o in outcomes.values() if not o.passed] == []


# -- the measurements on a larger synthetic table -------------------------------------------

SYNTHETIC = TableSpec(
    entity="synthetic",
    table="synthetic_vectors",
    text_columns=("content",),
    partition_column="created_at",
)


@pytest.fixture(scope="module")
def synthetic(settings):
    """3,000 random unit vectors with a cosine HNSW index: large enough for the planner to
    choose the index by default, small enough to build in a few seconds."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(3000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute("DROP TABLE IF EXISTS synthetic_vectors")
        conn.execute(
            "CREATE TABLE synthetic_vectors (id bigserial PRIMARY KEY, content text, "
            "created_at timestamptz, embedding vector(384))"
        )
        with conn.cursor().copy(
            "COPY synthetic_vectors (content, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "vector"])
            for i, vector in enumerate(vectors):
                copy.write_row([f"row {i}", vector])
        conn.execute(
            "CREATE INDEX synthetic_hnsw ON synthetic_vectors "
            "USING hnsw (embedding vector_cosine_ops)"
        )
        conn.execute("ANALYZE synthetic_vectors")
    return SYNTHETIC


@pytest.fixture
def vconn(settings):
    with psycopg.connect(settings.effective_database_url) as connection:
        register_vector(connection)
        connection.commit()
        yield connection


def test_planner_chooses_the_index_by_default_on_thousands_of_rows(synthetic, vconn):
    report = quality.check_index_use(
        vconn, synthetic, "synthetic_hnsw", dimension=384, k=10, ef_search=40
    )
    assert report.rows == 3000
    assert report.can_serve and report.chosen_by_default
    assert report.default_outline == "Limit > Index Scan using synthetic_hnsw"


def test_recall_compares_an_index_scan_with_a_true_sequential_scan(synthetic, vconn):
    """At this size the planner would use the index for the "exact" query too; the planner
    switches must make it a sequential scan, or recall would compare the index with itself."""
    low = quality.measure_recall(
        vconn, synthetic, "synthetic_hnsw", k=10, sample_size=20, ef_search=10
    )
    high = quality.measure_recall(
        vconn, synthetic, "synthetic_hnsw", k=10, sample_size=20, ef_search=200
    )
    for report in (low, high):
        assert report.index_used
        assert report.exact_is_sequential
        assert report.exact_plan == "Limit > Sort > Seq Scan on synthetic_vectors"
        assert report.queries == 20
    assert low.recall is not None and high.recall is not None
    assert low.recall < high.recall
    assert high.recall >= 0.95
    assert "TABLESAMPLE SYSTEM" in high.sample_method


def test_measurements_refuse_a_connection_inside_a_transaction(synthetic, vconn):
    vconn.execute("SELECT 1")
    with pytest.raises(quality.QualityError):
        quality.measure_recall(
            vconn, synthetic, "synthetic_hnsw", k=10, sample_size=1, ef_search=40
        )
    vconn.rollback()


# -- pure parts -----------------------------------------------------------------------------

INDEX_PLAN = [
    {
        "Plan": {
            "Node Type": "Limit",
            "Plans": [
                {
                    "Node Type": "Index Scan",
                    "Index Name": "messages_embedding_hnsw_idx",
                    "Relation Name": "messages",
                }
            ],
        }
    }
]
SEQ_PLAN = [
    {
        "Plan": {
            "Node Type": "Limit",
            "Plans": [
                {
                    "Node Type": "Sort",
                    "Plans": [{"Node Type": "Seq Scan", "Relation Name": "messages"}],
                }
            ],
        }
    }
]
NESTED_PLAN = [
    {
        "Plan": {
            "Node Type": "Subquery Scan",
            "Plans": [
                {
                    "Node Type": "Limit",
                    "Plans": [
                        {"Node Type": "Index Only Scan", "Index Name": "other_idx"},
                        {"Node Type": "Index Scan", "Index Name": "deep_idx"},
                    ],
                }
            ],
        }
    }
]


@pytest.mark.parametrize(
    ("plan", "scans", "outline"),
    [
        (
            INDEX_PLAN,
            ["messages_embedding_hnsw_idx"],
            "Limit > Index Scan using messages_embedding_hnsw_idx",
        ),
        (SEQ_PLAN, [], "Limit > Sort > Seq Scan on messages"),
        (
            NESTED_PLAN,
            ["other_idx", "deep_idx"],
            "Subquery Scan > Limit > Index Only Scan using other_idx > Index Scan using deep_idx",
        ),
        ([], [], ""),
    ],
)
def test_plan_parsing_finds_index_scans_at_any_depth(plan, scans, outline):
    assert quality.index_scans(plan) == scans
    assert quality.describe_plan(plan) == outline


@pytest.mark.parametrize(
    ("reloptions", "expected"),
    [
        (None, {"m": 16, "ef_construction": 64}),
        (["m=32"], {"m": 32, "ef_construction": 64}),
        (["ef_construction=200", "m=8"], {"m": 8, "ef_construction": 200}),
    ],
)
def test_index_options_fall_back_to_pgvector_defaults(reloptions, expected):
    assert _index_options(reloptions) == expected


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0], 0.95, 1.0), ([1.0, 2.0], 0.5, 1.5), (list(map(float, range(1, 101))), 0.95, 95.05)],
)
def test_percentile_interpolates_like_numpy(values, q, expected):
    assert _percentile(values, q) == pytest.approx(expected)
    assert _percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))


def test_check_settings_come_from_the_environment():
    loaded = load_settings(
        {
            "EP_CHECK_RECALL_THRESHOLD": "0.9",
            "EP_CHECK_RECALL_SAMPLE_SIZE": "20",
            "EP_CHECK_K": "5",
            "EP_CHECK_LATENCY_SAMPLE_SIZE": "30",
            "EP_CHECK_LATENCY_WARN_MS": "12.5",
            "EP_CHECK_PLANNER_WARN_ROWS": "500",
            "EP_CHECK_SAMPLE_IDS": "3",
            "EP_CHECK_DIMENSION_SAMPLE_SIZE": "100",
        }
    )
    assert loaded.checks == CheckSettings(
        recall_threshold=0.9,
        recall_sample_size=20,
        k=5,
        latency_sample_size=30,
        latency_warn_ms=12.5,
        planner_warn_rows=500,
        sample_ids=3,
        dimension_sample_size=100,
    )
    assert load_settings({}).checks == CheckSettings()
    assert load_settings({}).hnsw == HnswSettings()
    with pytest.raises(ValueError, match="EP_CHECK_LATENCY_WARN_MS"):
        load_settings({"EP_CHECK_LATENCY_WARN_MS": "fast"})


def test_the_checks_schedule_runs_all_twenty_seven_checks_as_the_run_checks_job(
    embedded, defs, instance
):
    schedule = defs.resolve_schedule_def(checks.CHECKS_SCHEDULE)
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.cron_schedule == "0 * * * *"
    assert schedule.job_name == "run_checks"
    assert schedule.tags["embedding_pipeline/trigger"] == "schedule"
    job = defs.resolve_job_def(schedule.job_name)
    result = job.execute_in_process(instance=instance)
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 27
    assert {e.check_name for e in evaluations} == set(checks.CHECK_NAMES)
    assert all(e.passed for e in evaluations)
    assert not result.get_asset_materialization_events()


def test_embedding_runs_carry_all_nine_checks(defs):
    keys = checks.per_run_check_keys([dg.AssetKey(MESSAGES)])
    assert {k.name for k in keys} == set(checks.CHECK_NAMES)


def test_an_embedding_run_evaluates_every_check_on_small_samples(
    embedded, settings, resources, instance, conn
):
    """A run that repairs a row leaves no badge "not evaluated": all nine checks of the
    asset run in it and pass, recall and latency on the run's smaller samples."""
    variant = _variant(settings, resources, run_recall_sample_size=2, run_latency_sample_size=3)
    _sql(conn, "UPDATE messages SET embedding = NULL WHERE id = (SELECT min(id) FROM messages)")
    keys = checks.per_run_check_keys([dg.AssetKey(MESSAGES)])
    result = dg.materialize(
        [variant.get_assets_def(MESSAGES), *_check_defs(variant, keys)],
        selection=dg.AssetSelection.assets(MESSAGES).without_checks()
        | dg.AssetSelection.checks(*keys),
        resources=variant.resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": SEPTEMBER,
            "dagster/asset_partition_range_end": OCTOBER,
        },
    )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(checks.CHECK_NAMES)
    assert [n for n, e in evaluations.items() if not e.passed] == []
    # one step embeds, one step runs the nine checks (on one connection)
    steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert steps == {MESSAGES, checks.checks_step_name(settings.tables["messages"])}
    assert _meta(evaluations[checks.RECALL])["queries"] == 2
    assert _meta(evaluations[checks.LATENCY])["queries"] == 3
    alone = _check(variant, instance, MESSAGES, checks.RECALL)
    assert _meta(alone)["queries"] == 4  # every stored vector, up to the full sample
