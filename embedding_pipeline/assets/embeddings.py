"""`message_embeddings`, `topic_embeddings`, `atom_embeddings`: vectors for every row.

Each run owns the rows of its month partition(s), embeds those whose embedding is missing,
made from other text, or made by another model, and writes them back in committed
batches (see `lib/sync.py`). Re-running an up-to-date partition calls no provider.
"""

import dagster as dg

from embedding_pipeline.lib.embedders import EmbeddingError
from embedding_pipeline.lib.schema import SchemaError, ensure_schema
from embedding_pipeline.lib.sync import BatchProgress, sync_embeddings
from embedding_pipeline.partitions import window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings, TableSpec

#: A backfill is one run over its whole partition range: one process start, one model
#: load, one pass in id order. Fault isolation comes from the committed batches (a failed
#: run keeps its finished work and a re-run does only the rest), not from splitting the
#: range into runs; and `dg launch --partition-range` (which runs in-process) accepts only
#: single-run assets. The reasoning and the alternatives are in docs/operations.md.
BACKFILL_POLICY = dg.BackfillPolicy.single_run()


def build_embedding_asset(
    source: str,
    spec: TableSpec,
    settings: Settings,
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> dg.AssetsDefinition:
    @dg.asset(
        name=spec.asset_name,
        deps=[dg.AssetKey(source)],
        partitions_def=partitions_def,
        backfill_policy=BACKFILL_POLICY,
        group_name="embeddings",
        kinds={"postgres", "pgvector"},
        description=f"Embedding vectors of `{spec.table}`, kept current per month partition.",
    )
    def _embeddings(
        context: dg.AssetExecutionContext, postgres: PostgresResource, embedder: EmbedderResource
    ) -> dg.MaterializeResult:
        window = window_for(partitions_def, context.partition_time_window)
        model = embedder.build()
        partitions = context.partition_key_range
        label = (
            partitions.start
            if partitions.start == partitions.end
            else f"{partitions.start}..{partitions.end}"
        )

        def progress(p: BatchProgress) -> None:
            context.log.info(
                f"{spec.table} {label}: batch {p.batch}, {p.embedded}/{p.pending_at_start} "
                f"embedded, {p.seconds:.1f}s"
            )

        try:
            with postgres.connection(vector=False) as conn:
                ensure_schema(conn, settings, model.dimension)
            with postgres.connection() as conn:
                result = sync_embeddings(
                    conn,
                    spec,
                    model,
                    window,
                    batch_size=embedder.batch_size,
                    on_batch=progress,
                    index=settings.hnsw,
                )
        except (EmbeddingError, SchemaError) as exc:
            raise dg.Failure(
                description=str(exc),
                metadata={
                    "table": spec.table,
                    "model": model.model_id,
                    "partitions": label,
                },
            ) from None
        if result.stale_model_at_start:
            context.log.warning(
                f"{result.stale_model_at_start} {spec.table} rows had vectors of another model "
                f"and were re-embedded in place with {model.model_id}: while that happens the "
                "column mixes two models; `embedding-pipeline model switch` avoids it."
            )
        if result.empty_text_ids:
            context.log.warning(
                f"{len(result.empty_text_ids)} {spec.table} rows have empty text and were not "
                f"embedded: ids {result.empty_text_ids[:20]}"
            )
        context.log.info(
            f"{spec.table} {label}: embedded {result.embedded}, up to date "
            f"{result.skipped_up_to_date}, in {result.seconds:.2f}s"
        )
        return dg.MaterializeResult(
            metadata={
                "rows_in_partition": result.rows_in_window,
                "rows_embedded": result.embedded,
                "rows_skipped_up_to_date": result.skipped_up_to_date,
                "rows_failed_empty_text": len(result.empty_text_ids),
                "rows_changed_during_run": result.changed_during_run,
                "rows_skipped_locked": result.skipped_locked,
                "rows_stale_model_at_start": result.stale_model_at_start,
                "index_strategy": result.index_strategy,
                "index_build_seconds": round(result.index_seconds, 3),
                "model": result.model_id,
                "dimension": result.dimension,
                "batches": result.batches,
                "provider_requests": result.provider_requests,
                "estimated_tokens": result.estimated_tokens,
                "seconds": round(result.seconds, 3),
                "rows_per_second": round(result.embedded / result.seconds, 1)
                if result.seconds and result.embedded
                else 0.0,
            }
        )

    return _embeddings
