"""SQLAlchemy Core views of the tables search reads, built from the configured `TableSpec`s.

Only the columns search needs are declared (nothing here creates or alters a table: that
is `lib/store/schema.py`'s job). The embedding column has no declared size, so one definition
serves any model's vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import TSVECTOR

from embedding_pipeline.lib.store.schema import MODEL_REGISTRY_TABLE
from embedding_pipeline.settings import TableSpec

#: The tables search serves, by the key used in the API, the CLI and HTTP paths.
TABLE_KEYS = ("messages", "topics", "atoms")

#: Row fields a hit carries besides its text, per table: hit field -> column. These are
#: columns of the pipeline's own schema (`lib/store/schema.py`).
FIELD_COLUMNS: dict[str, dict[str, str]] = {
    "messages": {"author": "author", "author_id": "author_id", "topic_id": "topic_id"},
    "topics": {"title": "name", "key": "key"},
    "atoms": {"kind": "kind", "title": "title", "key": "key", "topic_id": "topic_id"},
}


def _column_types(key: str, spec: TableSpec) -> dict[str, sa.types.TypeEngine[Any]]:
    types: dict[str, sa.types.TypeEngine[Any]] = {spec.id_column: sa.BigInteger()}
    for name in (*spec.text_columns, *FIELD_COLUMNS[key].values()):
        types.setdefault(name, sa.Text())
    if "topic_id" in types:
        types["topic_id"] = sa.BigInteger()
    types[spec.partition_column] = sa.DateTime(timezone=True)
    types[spec.embedding_column] = Vector()
    types[spec.model_column] = sa.Text()
    types[spec.extraction_column] = sa.BigInteger()
    types[spec.tsv_column] = TSVECTOR()
    return types


@dataclass(frozen=True)
class SearchTables:
    """One `sa.Table` per searchable table, the atom-message links and the model registry."""

    specs: Mapping[str, TableSpec]
    tables: Mapping[str, sa.Table]
    links: sa.Table
    registry: sa.Table

    @classmethod
    def from_specs(cls, specs: Mapping[str, TableSpec]) -> SearchTables:
        metadata = sa.MetaData()
        tables = {
            key: sa.Table(
                specs[key].table,
                metadata,
                *(sa.Column(name, type_) for name, type_ in _column_types(key, specs[key]).items()),
            )
            for key in TABLE_KEYS
        }
        links = sa.Table(
            f"{specs['atoms'].table}_messages",  # named as lib/store/schema.py creates it
            metadata,
            sa.Column("atom_id", sa.BigInteger()),
            sa.Column("message_id", sa.BigInteger()),
        )
        registry = sa.Table(
            MODEL_REGISTRY_TABLE,
            metadata,
            sa.Column("table_name", sa.Text()),
            sa.Column("column_name", sa.Text()),
            sa.Column("model_id", sa.Text()),
        )
        return cls(specs=dict(specs), tables=tables, links=links, registry=registry)

    def __getitem__(self, key: str) -> sa.Table:
        return self.tables[key]

    def id(self, key: str) -> sa.Column[int]:
        return self.tables[key].c[self.specs[key].id_column]

    def column(self, key: str, attribute: str) -> sa.Column[object]:
        """The column a `TableSpec` attribute names, e.g. ("messages", "partition_column")."""
        return self.tables[key].c[getattr(self.specs[key], attribute)]
