"""Measurements behind the asset checks: completeness, freshness, shape, index and search.

Pure SQL over one embedded table, no Dagster: `checks/` turns these reports into
`dg.AssetCheckResult`s, and the benchmark and tests call them directly. Every measurement
that could grow with the table reads a bounded sample and says so in its report.

Functions that set transaction-scoped options (`hnsw.ef_search`, planner switches) or need
one snapshot run their own transaction and therefore want an idle connection, so that a
`SET LOCAL` can never leak into a caller's transaction.

One module a family: `completeness` (missing, stale), `shape` (dimension), `index` (the
HNSW index and the planner's use of it), `search` (recall, latency); `status` and
`backlog` count what is pending. This package exports what the checks measure with.
"""

from embedding_pipeline.lib.quality.completeness import (
    MissingReport,
    StaleReport,
    count_missing,
    count_stale,
)
from embedding_pipeline.lib.quality.index import (
    HnswIndex,
    IndexReport,
    IndexUseReport,
    check_index_use,
    describe_plan,
    find_hnsw_indexes,
    index_builds,
    index_scans,
)
from embedding_pipeline.lib.quality.queries import EXPECTED_OPCLASS, QualityError
from embedding_pipeline.lib.quality.search import (
    LatencyReport,
    RecallReport,
    measure_latency,
    measure_recall,
)
from embedding_pipeline.lib.quality.shape import DimensionReport, check_dimension

__all__ = [
    "EXPECTED_OPCLASS",
    "DimensionReport",
    "HnswIndex",
    "IndexReport",
    "IndexUseReport",
    "LatencyReport",
    "MissingReport",
    "QualityError",
    "RecallReport",
    "StaleReport",
    "check_dimension",
    "check_index_use",
    "count_missing",
    "count_stale",
    "describe_plan",
    "find_hnsw_indexes",
    "index_builds",
    "index_scans",
    "measure_latency",
    "measure_recall",
]
