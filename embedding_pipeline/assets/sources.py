"""`messages`, `topics` and `atoms`: the application's tables, as assets.

The application (or `embedding-pipeline ingest`) writes these tables; materializing the
asset makes sure the pipeline's columns and indexes exist and records what the table
holds, what changed since the previous materialization, and the embedding backlog per
month partition (the dry run of a backfill, see `lib/backlog.py`). Between
materializations the backlog sensor reports the table's current backlog as
materializations without a run (the application changed the table), so the asset page
never shows an old backlog.
"""

import dagster as dg
from psycopg import sql

from embedding_pipeline.lib.quality.backlog import render_markdown, table_pending
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.partitions import monthly_partitions, partition_mapper
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings, TableSpec


def _previous_value(context: dg.AssetExecutionContext, key: str) -> int | None:
    """`key` of the latest materialization that has it: the backlog sensor reports the
    table's backlog as materializations of its own, without these figures."""
    cursor = None
    for _ in range(20):
        page = context.instance.fetch_materializations(context.asset_key, limit=50, cursor=cursor)
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is not None and key in materialization.metadata:
                value = materialization.metadata[key].value
                return int(value) if isinstance(value, int | float) else None
        if not page.has_more:
            return None
        cursor = page.cursor
    return None


def build_source_asset(name: str, spec: TableSpec, settings: Settings) -> dg.AssetsDefinition:
    partitions_def = monthly_partitions(settings.partition_start)

    @dg.asset(
        name=name,
        group_name="sources",
        kinds={"postgres"},
        description=f"The application's `{spec.table}` table ({spec.entity} rows and their text).",
    )
    def _source(
        context: dg.AssetExecutionContext, postgres: PostgresResource, embedder: EmbedderResource
    ) -> dg.MaterializeResult:
        previous_max_id = _previous_value(context, "max_id")
        previous_extraction = _previous_value(context, "latest_extraction_id")
        with postgres.connection(vector=False) as conn:
            report = ensure_schema(conn, settings, embedder.dimension, embedder.model_id)
            table = sql.Identifier(spec.table)
            id_col = sql.Identifier(spec.id_column)
            extraction_col = sql.Identifier(spec.extraction_column)
            row = conn.execute(
                sql.SQL("SELECT count(*), max({id}), max({ext}) FROM {t}").format(
                    id=id_col, ext=extraction_col, t=table
                )
            ).fetchone()
            assert row is not None
            count, max_id, latest_extraction = int(row[0]), row[1], row[2]
            changed = conn.execute(
                sql.SQL(
                    "SELECT count(*) FILTER (WHERE {id} > %(max_id)s), "
                    "count(*) FILTER (WHERE {id} <= %(max_id)s) FROM {t} "
                    "WHERE {id} > %(max_id)s OR {ext} > %(ext)s"
                ).format(id=id_col, ext=extraction_col, t=table),
                {
                    "max_id": previous_max_id if previous_max_id is not None else -1,
                    "ext": previous_extraction if previous_extraction is not None else -1,
                },
            ).fetchone()
            assert changed is not None
            # the pending rows alone, as the backlog sensor reports them: an index read
            backlog = table_pending(conn, spec, embedder.model_id, partition_mapper(partitions_def))
        context.log.info(f"{spec.table}: {count} rows, {changed[0]} new, {changed[1]} changed")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": count,
                "new_rows": int(changed[0]),
                "changed_rows": int(changed[1]),
                "max_id": int(max_id) if max_id is not None else 0,
                "latest_extraction_id": int(latest_extraction)
                if latest_extraction is not None
                else 0,
                "table": spec.table,
                "rows_needing_embedding": sum(r.needs_embedding for r in backlog),
                "backlog": dg.MetadataValue.md(render_markdown(backlog)),
                "backlog_by_partition": dg.MetadataValue.json(
                    [r.as_dict() for r in backlog if r.needs_embedding]
                ),
                "schema_changes": ", ".join(report.changes) or "none",
            }
        )

    return _source
