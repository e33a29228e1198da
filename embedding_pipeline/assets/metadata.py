"""What the asset definitions declare about themselves: owners, tags, code versions and the
column schema of the application's tables (shown on each asset's page in the UI)."""

from __future__ import annotations

import dagster as dg

from embedding_pipeline.settings import Settings, TableSpec

#: Who answers for the pipeline's assets (Dagster's `team:` form).
OWNERS = ["team:embedding-pipeline"]
#: Bumped when the embedding step changes what it writes for the same rows and model (the
#: text composed, the vector stored), so the UI marks materializations of older code.
EMBEDDINGS_CODE_VERSION = "1"


def embedding_tags(key: str, settings: Settings) -> dict[str, str]:
    """Tags of `key`'s embedding asset: the table and the configured provider."""
    return {
        "embedding_pipeline/table": key,
        "embedding_pipeline/provider": settings.embedder.provider,
    }


def source_columns(spec: TableSpec, settings: Settings) -> dg.TableSchema:
    """The columns of `spec`'s table that the pipeline reads and writes (the application
    may keep more), with their configured names."""
    vector = settings.embedder.vector_type
    read = [
        dg.TableColumn(spec.id_column, "bigint", description="primary key"),
        *(
            dg.TableColumn(column, "text", description="embedded (joined by newlines)")
            for column in spec.text_columns
        ),
        dg.TableColumn(spec.partition_column, "timestamptz", description="month partition"),
        dg.TableColumn(
            spec.extraction_column, "bigint", description="the extraction that wrote the row"
        ),
    ]
    written = [
        (spec.embedding_column, vector, "the vector (HNSW-indexed, cosine)"),
        (spec.model_column, "text", "the model id that made the vector"),
        (spec.hash_column, "text", "SHA-256 of the text that was embedded"),
        (spec.embedded_at_column, "timestamptz", "when the vector was written"),
        (spec.source_hash_column, "text", "SHA-256 of the current text (trigger)"),
        (spec.pending_since_column, "timestamptz", "since when the row needs embedding"),
        (spec.tsv_column, "tsvector", "full-text search vector (trigger)"),
    ]
    return dg.TableSchema(
        columns=[
            *read,
            *(dg.TableColumn(name, kind, description=why) for name, kind, why in written),
        ]
    )
