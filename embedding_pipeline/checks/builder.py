"""The list of checks, the one step each embedding asset's checks run as, the checks an
embedding run carries, and the checks schedule."""

from collections.abc import Callable, Iterable, Iterator

import dagster as dg

from embedding_pipeline.checks.base import CheckRaised, CheckScope, CheckTarget, EmbeddingCheck
from embedding_pipeline.checks.completeness import (
    LAG,
    NO_FAILED,
    NO_MISSING,
    NO_STALE,
    embedding_lag_check,
    no_failed_check,
    no_missing_check,
    no_stale_check,
)
from embedding_pipeline.checks.index import (
    INDEX_PRESENT,
    INDEX_USED,
    index_present_check,
    index_used_check,
)
from embedding_pipeline.checks.search import (
    LATENCY,
    RECALL,
    latency_check,
    recall_check,
    search_eval_check,
)
from embedding_pipeline.checks.shape import DIMENSION, dimension_check
from embedding_pipeline.jobs import RUN_CHECKS, run_tags
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings, TableSpec

CHECK_NAMES = (
    NO_MISSING,
    NO_STALE,
    NO_FAILED,
    LAG,
    DIMENSION,
    INDEX_PRESENT,
    INDEX_USED,
    RECALL,
    LATENCY,
)
#: The checks every embedding run carries: all nine, so that after any run every badge
#: describes the vectors it left (a check not run would show "not evaluated" against the
#: new materialization). Inside a run, recall and latency sample fewer queries
#: (`run_recall_sample_size`, `run_latency_sample_size`); the checks schedule and
#: `embedding-pipeline check` take the full samples.
PER_RUN_CHECKS = CHECK_NAMES
CHECKS_SCHEDULE = "embedding_checks_schedule"

#: One builder per check, in the order the CLI and the docs list them.
CHECK_BUILDERS: tuple[Callable[[CheckTarget], EmbeddingCheck], ...] = (
    no_missing_check,
    no_stale_check,
    no_failed_check,
    embedding_lag_check,
    dimension_check,
    index_present_check,
    index_used_check,
    recall_check,
    latency_check,
)


def checks_step_name(spec: TableSpec) -> str:
    """The one step (op) that runs the checks of `spec`'s embedding asset."""
    return f"{spec.asset_name}_checks"


def build_embedding_checks(spec: TableSpec, settings: Settings) -> dg.AssetChecksDefinition:
    """The checks of one embedding asset, configured by `settings.checks` (with
    EP_EVAL_QUESTIONS, a tenth: `search_eval`), as one step: the checks a run selects run
    one after another on one connection, so a run pays for one step, not one per check.
    A failed blocking check fails the step once every selected check has its result."""
    target = CheckTarget(spec, settings)
    checks = [build(target) for build in CHECK_BUILDERS]
    if settings.checks.eval_questions is not None:
        checks.append(search_eval_check(target))

    @dg.multi_asset_check(
        name=checks_step_name(spec),
        specs=[check.spec for check in checks],
        can_subset=True,
        description=f"The asset checks of `{spec.asset_name}` (those the run selected), on "
        "one connection.",
    )
    def embedding_checks(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
    ) -> Iterator[dg.AssetCheckResult]:
        selected = {key.name for key in context.selected_asset_check_keys}
        scope = CheckScope(context, postgres, embedder, target.partitions_def)
        raised: list[tuple[str, Exception]] = []
        try:
            for check in checks:
                if check.name not in selected:
                    continue
                try:
                    result = check.run(scope)
                except Exception as exc:  # a bug in one check must not hide the others
                    raised.append((check.name, exc))
                    continue
                yield result
        finally:
            scope.close()
        if raised:
            reasons = "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in raised)
            raise CheckRaised(f"no result, the check raised: {reasons}") from raised[0][1]

    return embedding_checks


def build_checks(settings: Settings) -> list[dg.AssetChecksDefinition]:
    """Every embedding asset's checks, for `build_definitions`."""
    return [build_embedding_checks(spec, settings) for spec in settings.tables.values()]


def per_run_check_keys(asset_keys: Iterable[dg.AssetKey]) -> list[dg.AssetCheckKey]:
    """The checks an embedding run of `asset_keys` carries (`PER_RUN_CHECKS`)."""
    return [dg.AssetCheckKey(key, name) for key in asset_keys for name in PER_RUN_CHECKS]


def build_checks_schedule(settings: Settings) -> dg.ScheduleDefinition:
    """Every check of every embedding asset, on `settings.checks.schedule_cron` (UTC)."""
    return dg.ScheduleDefinition(
        name=CHECKS_SCHEDULE,
        cron_schedule=settings.checks.schedule_cron,
        execution_timezone="UTC",
        job_name=RUN_CHECKS,
        tags=run_tags("schedule", settings.tables),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"All {len(CHECK_NAMES)} checks of each embedding asset, recall and "
        "latency on their full samples (embedding runs take smaller ones).",
    )
