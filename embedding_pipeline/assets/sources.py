"""`messages`, `topics` and `atoms`: the application's tables, as external assets.

The application (or `embedding-pipeline ingest`) writes these tables, not Dagster, so each
is an `AssetSpec`: it stands in the lineage graph upstream of its `*_embeddings` asset,
with its table name and the columns the pipeline reads and writes, but has no
materialization of its own. The backlog sensor observes it (`AssetObservation`: rows
needing embedding and the backlog per month, reported when they change).

Schema setup is a step of its own, not a side effect of an asset: `embedding-pipeline
schema` (the demo and `ingest` call it), and every embedding run calls `ensure_schema`
before its first claim.
"""

import dagster as dg

from embedding_pipeline.assets.metadata import OWNERS, source_columns
from embedding_pipeline.settings import Settings, TableSpec

SOURCES_GROUP = "sources"


def build_source_spec(key: str, spec: TableSpec, settings: Settings) -> dg.AssetSpec:
    """The external asset of the application's table `spec.table`, keyed `key`."""
    return dg.AssetSpec(
        key=key,
        group_name=SOURCES_GROUP,
        kinds={"postgres"},
        owners=OWNERS,
        description=(
            f"The application's `{spec.table}` table ({spec.entity} rows and their text), "
            "written by the application or `embedding-pipeline ingest`; observed by the "
            "backlog sensor."
        ),
        # Dagster's table metadata keys (`TableMetadataSet`'s, a class Dagster 1.13 does not
        # export): the UI shows the table name and the columns on the asset's page
        metadata={
            "dagster/table_name": spec.table,
            "dagster/column_schema": source_columns(spec, settings),
        },
    )
