"""What every check of an embedding asset shares: its target (the asset, its table and
the settings), the scope of one step (the run's months, one connection), how a check is
declared and how its result is made."""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dagster as dg
import psycopg

from embedding_pipeline.assets.embeddings import START_SNAPSHOT_KEY
from embedding_pipeline.jobs import MATERIALIZE_ALL
from embedding_pipeline.lib import quality
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.partitions import monthly_partitions, window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import CheckSettings, Settings, TableSpec

ERROR = dg.AssetCheckSeverity.ERROR
WARN = dg.AssetCheckSeverity.WARN


def id_list(ids: Iterable[int]) -> dg.MetadataValue:
    return dg.MetadataValue.json(list(ids))


def _run_window(
    context: dg.AssetCheckExecutionContext, partitions_def: dg.TimeWindowPartitionsDefinition
) -> tuple[Window | None, str | None]:
    """The rows the surrounding run materialized, when the check runs in a partitioned run."""
    op_context = context.op_execution_context
    if not (op_context.has_partition_key or op_context.has_partition_key_range):
        return None, None
    keys = op_context.partition_key_range
    label = keys.start if keys.start == keys.end else f"{keys.start}..{keys.end}"
    return window_for(partitions_def, op_context.partition_time_window), label


@dataclass(frozen=True)
class CheckTarget:
    """What every check of one embedding asset needs to know."""

    spec: TableSpec
    settings: Settings

    @property
    def asset(self) -> dg.AssetKey:
        return dg.AssetKey(self.spec.asset_name)

    @property
    def partitions_def(self) -> dg.TimeWindowPartitionsDefinition:
        return monthly_partitions(self.settings.partition_start)

    @property
    def cfg(self) -> CheckSettings:
        return self.settings.checks

    @property
    def ef_search(self) -> int:
        return self.settings.hnsw.ef_search

    @property
    def expected_index(self) -> str:
        return hnsw_index_name(self.spec)

    @property
    def where(self) -> str:
        return f"`{self.spec.table}.{self.spec.embedding_column}`"

    def usable_index(self, conn: psycopg.Connection) -> str | None:
        """The name of the valid HNSW index search can use, if there is one."""
        usable = quality.find_hnsw_indexes(conn, self.spec, self.expected_index).usable
        return usable.name if usable else None


class CheckScope:
    """What the checks of one asset share in one step: the resources, the months of the
    surrounding run (when it materialized the asset), and one database connection,
    opened on first use and opened again when a check lost it."""

    def __init__(
        self,
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
        partitions_def: dg.TimeWindowPartitionsDefinition,
    ) -> None:
        self.context = context
        self.postgres = postgres
        self.embedder = embedder
        self.window, self.run_label = _run_window(context, partitions_def)
        self._conn: psycopg.Connection | None = None

    @property
    def run_samples(self) -> bool:
        """Recall and latency take the run's smaller samples: the checks run inside an
        embedding run (one that materialized months of the asset, or a `materialize_all`
        run, which runs every table's checks whether or not it had work for the table).
        The checks schedule, `embedding-pipeline check` and the UI's "Execute" take the
        full samples."""
        return self.window is not None or self.context.run.job_name == MATERIALIZE_ALL

    @property
    def conn(self) -> psycopg.Connection:
        """The shared connection (pgvector types registered), idle between checks."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self.postgres.connect()
        return self._conn

    def release(self) -> None:
        """End whatever transaction a check left open, so the next one starts idle."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start_snapshot(self, asset: dg.AssetKey) -> str | None:
        """The start snapshot the asset's embedding step recorded in this run, if it ran."""
        if self.window is None:
            return None
        context = self.context
        records = context.instance.get_records_for_run(
            context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1000
        ).records
        for record in records:
            event = record.event_log_entry.dagster_event
            materialization = event.step_materialization_data.materialization if event else None
            if materialization is None or materialization.asset_key != asset:
                continue
            details = materialization.metadata.get("run_details")
            value = getattr(details, "value", None)
            if isinstance(value, dict) and value.get(START_SNAPSHOT_KEY):
                return str(value[START_SNAPSHOT_KEY])
        return None


@dataclass(frozen=True)
class EmbeddingCheck:
    """One check of an embedding asset: its spec (name, blocking, description) and the
    function that measures it and decides pass, severity and metadata."""

    spec: dg.AssetCheckSpec
    evaluate: Callable[[CheckScope], dg.AssetCheckResult]

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, scope: CheckScope) -> dg.AssetCheckResult:
        """The result for the step to yield: the check's own run time in its metadata, and
        a database error as a failed ERROR result that names it (search would meet the
        same error). The connection is left idle for the next check."""
        started = time.perf_counter()
        try:
            result = self.evaluate(scope)
        except psycopg.Error as exc:
            message = str(exc).strip() or repr(exc)
            result = dg.AssetCheckResult(
                passed=False,
                severity=ERROR,
                description=f"database error: {message.splitlines()[0]}",
                metadata={"error": message, "error_type": type(exc).__name__},
            )
        finally:
            scope.release()
        return dg.AssetCheckResult(
            asset_key=self.spec.asset_key,
            check_name=self.name,
            passed=result.passed,
            severity=result.severity,
            description=result.description,
            metadata={**result.metadata, "check_seconds": round(time.perf_counter() - started, 3)},
        )


def declare_check(
    t: CheckTarget, name: str, *, description: str, blocking: bool = False
) -> Callable[[Callable[[CheckScope], dg.AssetCheckResult]], EmbeddingCheck]:
    """Declare the decorated function as the check `name` of `t`'s asset."""

    def declare(fn: Callable[[CheckScope], dg.AssetCheckResult]) -> EmbeddingCheck:
        spec = dg.AssetCheckSpec(name, asset=t.asset, blocking=blocking, description=description)
        return EmbeddingCheck(spec=spec, evaluate=fn)

    return declare


class CheckRaised(RuntimeError):
    """A check raised (not a database error, which is a failed result): the step fails
    after the other checks' results, naming it."""
