"""The domain types every layer shares: where an embedded entity lives (`TableSpec`), how
its HNSW index is built (`HnswSettings`), which rows a run covers (`Window`), and the few
names and limits derived from them.

The settings (`embedding_pipeline.settings`) build these from the environment and
re-export them; `lib/` takes them from here and never imports the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from psycopg import sql


@dataclass(frozen=True)
class TableSpec:
    """Where one embedded entity lives and which of its columns the pipeline reads and writes.

    Every name is a setting so the pipeline can be pointed at an existing application
    database: the text the model sees is the non-NULL `text_columns` joined by newlines.
    """

    entity: str
    table: str
    text_columns: tuple[str, ...]
    partition_column: str
    id_column: str = "id"
    embedding_column: str = "embedding"
    model_column: str = "embedding_model"
    hash_column: str = "embedding_hash"
    embedded_at_column: str = "embedded_at"
    extraction_column: str = "extraction_id"
    #: SHA-256 of the row's current text, kept by a trigger (`tracking.ensure_tracking`), so
    #: that finding rows whose text changed is an index lookup, not a hash of every row.
    source_hash_column: str = "embedding_source_hash"
    #: When the row last started to need an embedding (inserted, text changed, vector
    #: removed); kept by the same trigger, read by the freshness check.
    pending_since_column: str = "embedding_pending_since"
    #: tsvector of the text columns, kept by the tracking trigger (full-text and hybrid search).
    tsv_column: str = "search_tsv"

    @property
    def asset_name(self) -> str:
        return f"{self.entity}_embeddings"


def default_tables() -> dict[str, TableSpec]:
    return {
        "messages": TableSpec(
            entity="message",
            table="messages",
            text_columns=("content",),
            partition_column="sent_at",
        ),
        "topics": TableSpec(
            entity="topic",
            table="topics",
            text_columns=("name", "description"),
            partition_column="created_at",
        ),
        "atoms": TableSpec(
            entity="atom",
            table="atoms",
            text_columns=("title", "content"),
            partition_column="created_at",
        ),
    }


@dataclass(frozen=True)
class HnswSettings:
    """HNSW index parameters, how it is built, and when a run builds it after loading
    instead of inserting into it row by row.

    A run loads without the index and builds it at the end when it has at least
    `bulk_load_min_rows` pending rows, those are at least `rebuild_fraction` of the rows
    the index will hold, and the index holds fewer than `bulk_load_max_indexed_rows` (above
    that, search without an index for the length of a load costs more than the inserts
    save). The rule and the measurements behind it are in docs/operations.md.
    """

    m: int = 16
    ef_construction: int = 64
    ef_search: int = 40
    bulk_load_min_rows: int = 2_000
    rebuild_fraction: float = 0.3
    bulk_load_max_indexed_rows: int = 250_000
    #: Most memory an index build may take (`maintenance_work_mem`), in MB; a build takes
    #: what the graph needs up to this (a graph that does not fit builds several times
    #: slower). Parallel builds use shared memory: give a containerised server enough.
    build_memory_mb: int = 1024
    #: Parallel workers of an index build; None: the server's max_parallel_maintenance_workers.
    build_workers: int | None = None


#: pgvector's HNSW index takes columns of at most this many dimensions, per storage type.
MAX_INDEXED_DIMENSIONS = {"vector": 2000, "halfvec": 4000}


VECTOR_TYPES = tuple(MAX_INDEXED_DIMENSIONS)


#: Appended to the embedding columns while `model switch` fills their replacements.
SHADOW_SUFFIX = "_next"


#: Columns the search API filters on, B-tree indexed where a table has them (lib/store/schema.py),
#: so that a selective filter is answered by an exact scan of the few matching rows.
SEARCH_FILTER_COLUMNS = ("author_id", "topic_id", "kind")


@dataclass(frozen=True)
class Window:
    """Rows whose partition column lies in [start, end); None leaves that side open.

    An open start also takes rows whose partition column is NULL.
    """

    start: datetime | None = None
    end: datetime | None = None

    def clause(self, spec: TableSpec, alias: str = "t") -> tuple[sql.Composable, dict[str, object]]:
        column = sql.Identifier(alias, spec.partition_column)
        parts: list[sql.Composable] = []
        params: dict[str, object] = {}
        if self.start is not None:
            parts.append(sql.SQL("{} >= %(window_start)s").format(column))
            params["window_start"] = self.start
        if self.end is not None:
            upper = sql.SQL("{} < %(window_end)s").format(column)
            if self.start is None:
                upper = sql.SQL("({} OR {} IS NULL)").format(upper, column)
            parts.append(upper)
            params["window_end"] = self.end
        if not parts:
            return sql.SQL("TRUE"), params
        return sql.SQL(" AND ").join(parts), params


class _VectorStorage(Protocol):
    @property
    def vector_type(self) -> str: ...


class _TextSearch(Protocol):
    @property
    def text_language(self) -> str: ...


class StoreSettings(Protocol):
    """What the store needs of the configuration to lay out the schema and load rows:
    `embedding_pipeline.settings.Settings` is one (the protocol keeps `lib/` free of it)."""

    @property
    def tables(self) -> Mapping[str, TableSpec]: ...

    @property
    def extraction_table(self) -> str: ...

    @property
    def hnsw(self) -> HnswSettings: ...

    @property
    def embedder(self) -> _VectorStorage: ...

    @property
    def search(self) -> _TextSearch: ...
