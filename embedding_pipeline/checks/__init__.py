"""Asset checks on every embedding asset: complete, current, fresh, well-shaped, indexed,
searchable.

Nine checks per embedding asset (see docs/checks.md), one builder function each, listed in
`CHECK_BUILDERS`: no missing, no stale and no failed embeddings, the embedding lag (age of
the oldest row waiting), the column's dimension matches the model, an HNSW index that can
serve the search exists, the planner can (and at size does) use it, recall@k against an
exact scan, and search latency. The measuring is in `lib/quality/`; these modules decide
pass, severity and metadata, one module a family:

- `completeness.py`: no missing, stale or failed embeddings, and the lag;
- `shape.py`: the dimension and storage type;
- `index.py`: the HNSW index present, and used by the planner;
- `search.py`: recall, latency, and the labelled-question evaluation;
- `base.py`: what they share (the target, the step's scope, the declaration);
- `builder.py`: the list, the step, the checks a run carries, the schedule.

An asset's checks run as one step (a `multi_asset_check`) on one connection: a run pays
Dagster's step overhead once, not once per check, and each check keeps its own name,
blocking flag, description and result.

The embedding assets are partitioned by month but the checks are not: each looks at the
whole table, because that is what search reads. Dagster runs an asset's checks in every run
that materializes it (each sensor run and each backfill run too), so a run that
embedded its own months can meet rows of months another run has not reached yet. The
missing-embeddings check therefore fails with ERROR (and, being blocking, fails the run and
stops downstream steps) only when rows of the run's own partitions are missing, or when it
runs on its own; rows missing elsewhere in the table are reported with WARN.
"""

from embedding_pipeline.checks.base import (
    ERROR,
    WARN,
    CheckRaised,
    CheckScope,
    CheckTarget,
    EmbeddingCheck,
)
from embedding_pipeline.checks.builder import (
    CHECK_BUILDERS,
    CHECK_NAMES,
    CHECKS_SCHEDULE,
    PER_RUN_CHECKS,
    build_checks,
    build_checks_schedule,
    build_embedding_checks,
    checks_step_name,
    per_run_check_keys,
)
from embedding_pipeline.checks.completeness import (
    LAG,
    NO_FAILED,
    NO_MISSING,
    NO_STALE,
    LagOutcome,
    lag_outcome,
    missing_outcome,
)
from embedding_pipeline.checks.index import INDEX_PRESENT, INDEX_USED
from embedding_pipeline.checks.search import EVAL, EVAL_FLOOR_MODES, LATENCY, RECALL
from embedding_pipeline.checks.shape import DIMENSION

__all__ = [
    "CHECKS_SCHEDULE",
    "CHECK_BUILDERS",
    "CHECK_NAMES",
    "DIMENSION",
    "ERROR",
    "EVAL",
    "EVAL_FLOOR_MODES",
    "INDEX_PRESENT",
    "INDEX_USED",
    "LAG",
    "LATENCY",
    "NO_FAILED",
    "NO_MISSING",
    "NO_STALE",
    "PER_RUN_CHECKS",
    "RECALL",
    "WARN",
    "CheckRaised",
    "CheckScope",
    "CheckTarget",
    "EmbeddingCheck",
    "LagOutcome",
    "build_checks",
    "build_checks_schedule",
    "build_embedding_checks",
    "checks_step_name",
    "lag_outcome",
    "missing_outcome",
    "per_run_check_keys",
]
