"""The assets, materialized through Dagster against the real database and local model."""

from datetime import UTC, datetime

import dagster as dg
import numpy as np
import pytest
from psycopg import sql

from embedding_pipeline.lib.embedders import Embedder, EmbeddingError, LocalEmbedder
from embedding_pipeline.lib.embedders.local import LOCAL_MODEL_ID
from embedding_pipeline.lib.quality.backlog import window_backlog
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.expressions import (
    compose_text,
    content_hash,
    hash_expr,
    text_expr,
)
from embedding_pipeline.partitions import monthly_partitions, partition_mapper
from embedding_pipeline.resources import EmbedderResource
from embedding_pipeline_tests.support.incremental import figures

SEPTEMBER = "2025-09-01"
OCTOBER = "2025-10-01"


def _materialize(defs, names, instance, resources=None, **kwargs):
    assets = [defs.get_assets_def(name) for name in names]
    return dg.materialize(
        assets, resources=resources or defs.resources, instance=instance, **kwargs
    )


def _metadata(result, name):
    events = [
        e
        for e in result.get_asset_materialization_events()
        if e.step_materialization_data.materialization.asset_key.to_user_string() == name
    ]
    assert events, f"no materialization of {name}"
    return figures(events[0].step_materialization_data.materialization.metadata)


def test_partition_run_embeds_only_its_month(small_data, defs, instance, conn):
    result = _materialize(defs, ["message_embeddings"], instance, partition_key=SEPTEMBER)
    assert result.success
    meta = _metadata(result, "message_embeddings")
    assert meta["rows_embedded"] == 2
    assert meta["model"] == "local:all-MiniLM-L6-v2-int8"
    assert meta["dimension"] == 384
    rows = conn.execute(
        "SELECT telegram_message_id, embedding IS NOT NULL FROM messages ORDER BY 1"
    ).fetchall()
    assert rows == [(2, True), (3, True), (5, False), (6, False)]


def test_a_materialization_lists_the_months_figures_first_with_one_type_per_key(
    small_data, defs, instance, conn
):
    """About a dozen keys, the month's own first; counts are ints in every run (embedding
    or not), the start a timestamp, the engine's details one JSON value."""
    conn.execute("UPDATE messages SET embedding = NULL WHERE telegram_message_id = 2")
    conn.commit()
    types = []
    for _ in range(2):  # the first run embeds a row, the second finds nothing to do
        result = _materialize(defs, ["message_embeddings"], instance, partition_key=SEPTEMBER)
        [event] = result.get_asset_materialization_events()
        metadata = event.step_materialization_data.materialization.metadata
        keys = list(metadata)
        assert keys[:7] == [
            "rows_in_partition",
            "rows_embedded",
            "rows_skipped_up_to_date",
            "rows_missing",
            "rows_stale",
            "rows_failed",
            "model",
        ]
        assert len(keys) <= 14, keys
        assert isinstance(metadata["run_started_at"], dg.TimestampMetadataValue)
        assert isinstance(metadata["run_details"], dg.JsonMetadataValue)
        types.append({k: type(v) for k, v in metadata.items()})
        details = metadata["run_details"].value
        assert isinstance(details, dict)
        types.append({f"run_details.{k}": type(v) for k, v in details.items()})
    assert types[0] == types[2] and types[1] == types[3]
    assert _metadata(result, "message_embeddings")["rows_embedded"] == 0


def test_a_range_run_records_each_months_own_figures(small_data, defs, conn):
    """A run over August..November records per month what that month holds and got, and
    an observation of the backlog of each month whose latest observation it changed; the
    run's totals carry a `run_` prefix."""
    # an instance of its own: observations other tests recorded would change the answer
    with dg.instance_for_test() as instance:
        conn.execute("UPDATE messages SET embedding = NULL")
        conn.commit()
        # what the backlog sensor would have reported for September meanwhile
        instance.report_runless_asset_event(
            dg.AssetObservation(
                asset_key=dg.AssetKey("message_embeddings"),
                partition=SEPTEMBER,
                metadata={"backlog_missing": 2, "backlog_stale": 0, "backlog_failed": 0},
            )
        )
        tags = {
            "dagster/asset_partition_range_start": "2025-08-01",
            "dagster/asset_partition_range_end": "2025-11-01",
        }
        result = _materialize(defs, ["message_embeddings"], instance, tags=tags)
        assert result.success
        by_month = {
            m.partition: figures(m.metadata)
            for m in (
                e.step_materialization_data.materialization
                for e in result.get_asset_materialization_events()
            )
        }
        assert set(by_month) == {"2025-08-01", SEPTEMBER, OCTOBER, "2025-11-01"}
        for month, rows in (("2025-08-01", 0), (SEPTEMBER, 2), (OCTOBER, 2), ("2025-11-01", 0)):
            assert by_month[month]["rows_in_partition"] == rows, month
            assert by_month[month]["run_rows_embedded"] == 4
            assert by_month[month]["run_partitions"] == "2025-08-01..2025-11-01"
            if rows:
                assert by_month[month]["rows_embedded"] == rows, month
                assert by_month[month]["rows_missing"] == 0
            else:  # an empty month: its row count, then straight to the run's figures
                assert "rows_embedded" not in by_month[month]
                keys = list(result.get_asset_materialization_events()[0].materialization.metadata)
                assert keys[:2] == ["rows_in_partition", "run_partitions"]
        observations = {
            e.asset_observation_data.asset_observation.partition: {
                k: v.value for k, v in e.asset_observation_data.asset_observation.metadata.items()
            }
            for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        }
        # September was last seen with 2 missing: now 0; October was never observed (as empty)
        assert set(observations) == {SEPTEMBER}
        assert observations[SEPTEMBER]["backlog_missing"] == 0
        assert observations[SEPTEMBER]["backlog_needs_embedding"] == 0
        again = _materialize(defs, ["message_embeddings"], instance, tags=tags)
        assert again.success and again.get_asset_materialization_events()
        assert not [e for e in again.all_events if e.event_type_value == "ASSET_OBSERVATION"]


def test_a_run_that_wrote_nothing_reads_the_same_month_figures(
    small_data, settings, defs, instance, conn
):
    """The cheap reading of a run's months (index counts and the pending index, for a run
    that wrote nothing) gives the figures of the full scan, backlog included, and leaves
    out what is pending in other months."""
    keys = monthly_partitions(settings.partition_start).get_partition_keys()
    everything = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }
    assert _materialize(defs, ["message_embeddings"], instance, tags=everything).success
    spec = settings.tables["messages"]
    mapper = partition_mapper(monthly_partitions(settings.partition_start))
    september = Window(
        start=datetime(2025, 9, 1, tzinfo=UTC), end=datetime(2025, 10, 1, tzinfo=UTC)
    )
    # one transaction, rolled back at the end: in September a row missing and a row
    # edited (stale), in October a row missing
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    now = row[0]
    conn.execute("UPDATE messages SET embedding = NULL WHERE telegram_message_id IN (2, 5)")
    conn.execute(
        "UPDATE messages SET content = content || ' (edited)' WHERE telegram_message_id = 3"
    )
    try:
        for window, missing in ((Window(), 2), (september, 1)):
            full = window_backlog(conn, spec, LOCAL_MODEL_ID, mapper, window, now)
            cheap = window_backlog(conn, spec, LOCAL_MODEL_ID, mapper, window, now, wrote=False)
            assert cheap == full
            assert sum(r.missing for r in full) == missing
            assert sum(r.stale for r in full) == 1
        assert {r.partition for r in cheap} == {SEPTEMBER}
    finally:
        conn.rollback()


def test_vectors_are_unit_length_and_belong_to_their_rows(small_data, defs, instance, conn):
    for name in ("message_embeddings", "topic_embeddings", "atom_embeddings"):
        for key in (SEPTEMBER, OCTOBER):
            assert _materialize(defs, [name], instance, partition_key=key).success
    reference = LocalEmbedder()
    for table, columns in (
        ("messages", ["content"]),
        ("topics", ["name", "description"]),
        ("atoms", ["title", "content"]),
    ):
        rows = conn.execute(
            f"SELECT {', '.join(columns)}, embedding, embedding_model, embedding_hash, "  # noqa: S608
            f"embedded_at FROM {table} ORDER BY id"
        ).fetchall()
        assert rows
        texts = [compose_text(row[: len(columns)]) for row in rows]
        expected = reference.embed(texts)
        for row, text, vector in zip(rows, texts, expected, strict=True):
            stored = np.asarray(row[len(columns)].to_numpy(), dtype=np.float32)
            assert stored.shape == (384,)
            assert abs(float(np.linalg.norm(stored)) - 1.0) < 1e-3
            assert float(stored @ vector) > 0.999, f"{table}: vector of another text: {text!r}"
            assert row[len(columns) + 1] == "local:all-MiniLM-L6-v2-int8"
            assert row[len(columns) + 3] is not None


def test_rerun_of_an_up_to_date_partition_calls_no_provider(small_data, defs, instance):
    assert _materialize(defs, ["atom_embeddings"], instance, partition_key=OCTOBER).success
    result = _materialize(defs, ["atom_embeddings"], instance, partition_key=OCTOBER)
    meta = _metadata(result, "atom_embeddings")
    assert meta["rows_embedded"] == 0
    assert meta["provider_requests"] == 0
    assert meta["rows_skipped_up_to_date"] == 3


class _WrongCount(Embedder):
    model_id = "test:wrong-count"
    dimension = 384

    def _embed(self, texts):
        return np.ones((len(texts) - 1, 384), dtype=np.float32)


def _failed_run_error(defs, instance, embedder: Embedder, asset: str) -> str:
    """Materialize `asset`'s October partition with `embedder`; the run must fail: its error."""

    class _Resource(EmbedderResource):
        def build(self) -> Embedder:
            return embedder

    result = _materialize(
        defs,
        [asset],
        instance,
        resources={**defs.resources, "embedder": _Resource()},
        partition_key=OCTOBER,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(failure.step_failure_data.error)


def test_bad_embedder_answer_fails_the_run_and_writes_nothing(small_data, defs, instance, conn):
    before = conn.execute("SELECT id, embedding_model FROM atoms ORDER BY id").fetchall()
    error = _failed_run_error(defs, instance, _WrongCount(), "atom_embeddings")
    assert "returned 2 vectors for 3 texts" in error
    assert conn.execute("SELECT id, embedding_model FROM atoms ORDER BY id").fetchall() == before


def test_wrong_dimension_is_refused_before_anything_is_written(small_data, defs, instance, conn):
    class _Wide(Embedder):
        model_id = "test:wide"
        dimension = 768

        def _embed(self, texts):
            raise AssertionError("must not be called")

    before = conn.execute("SELECT id, embedding_model, embedded_at FROM topics").fetchall()
    error = _failed_run_error(defs, instance, _Wide(), "topic_embeddings")
    assert "holds vector(384)" in error
    assert "768" in error
    after = conn.execute("SELECT id, embedding_model, embedded_at FROM topics").fetchall()
    assert after == before


@pytest.mark.parametrize(
    ("name", "description"),
    [("backup", None), ("", "only a description"), ("a\nb", "ü ñ 🙂"), ("  ", "")],
)
def test_python_text_and_hash_equal_the_database_expressions(schema, conn, name, description):
    """What `compose_text`/`content_hash` compute is what the database compares against."""
    spec = schema.tables["topics"]
    conn.execute(
        "INSERT INTO topics (key, name, description) VALUES ('hash-probe', %s, %s)",
        (name, description),
    )
    row = conn.execute(
        sql.SQL("SELECT {}, {} FROM topics WHERE key = 'hash-probe'").format(
            text_expr(spec), hash_expr(spec)
        )
    ).fetchone()
    conn.rollback()
    text = compose_text([name, description])
    assert row == (text, content_hash(text))


def test_embedder_checks_shape_itself():
    with pytest.raises(EmbeddingError, match="returned 2 vectors for 3 texts"):
        _WrongCount().embed(["a", "b", "c"])


def test_materialize_all_records_only_the_months_with_work_and_checks_every_table(
    small_data, settings, resources, conn
):
    """`embedding-pipeline materialize` (one `materialize_all` run) materializes the months
    with rows due, runs every table's checks, and records no month of a table with
    nothing due: a run with nothing to do runs the checks only,
    recall and latency on the run's small samples all the same."""
    from dataclasses import replace

    from embedding_pipeline import runner
    from embedding_pipeline.checks import CHECK_NAMES, LATENCY, RECALL
    from embedding_pipeline.definitions import build_definitions

    samples = replace(settings.checks, run_recall_sample_size=2, run_latency_sample_size=3)
    defs = build_definitions(replace(settings, checks=samples), resources)
    conn.execute("UPDATE messages SET embedding = NULL")
    conn.commit()
    with dg.instance_for_test() as instance:
        first = runner.materialize_all(settings, instance=instance, defs=defs)
        assert "message_embeddings" not in first.current
        conn.execute("UPDATE messages SET embedding = NULL WHERE telegram_message_id = 2")
        conn.commit()
        repair = runner.materialize_all(settings, instance=instance, defs=defs)
        assert repair.current == ["topic_embeddings", "atom_embeddings"]
        assert repair.figures["message_embeddings"]["run_rows_embedded"] == 1
        noop = runner.materialize_all(settings, instance=instance, defs=defs)
        assert noop.figures == {}
        assert noop.current == ["message_embeddings", "topic_embeddings", "atom_embeddings"]
        runs = instance.get_runs(limit=3)  # newest first
        months = [
            {
                str(r.event_log_entry.dagster_event.partition)
                for r in instance.get_records_for_run(
                    run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
                ).records
                if r.event_log_entry.dagster_event
                and r.event_log_entry.dagster_event.asset_key == dg.AssetKey("message_embeddings")
            }
            for run in runs
        ]
        assert months == [set(), {SEPTEMBER}, {SEPTEMBER, OCTOBER}]
        assert "dagster/asset_partition_range_start" not in runs[0].tags
        checked = instance.get_records_for_run(
            runs[0].run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
        assert len(checked) == 3 * len(CHECK_NAMES)
        evaluations = [r.event_log_entry.dagster_event.asset_check_evaluation_data for r in checked]
        queries = {
            e.check_name: e.metadata["queries"].value
            for e in evaluations
            if e.asset_key == dg.AssetKey("message_embeddings")
            and e.check_name in (RECALL, LATENCY)
        }
        assert queries[RECALL] == 2 and queries[LATENCY] == 3
