"""A row's text, its hash and whether it needs embedding, as SQL expressions over a table,
and the Python twins of the text and hash (`compose_text`, `content_hash`) for tools and tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from psycopg import sql

from embedding_pipeline.lib.store.domain import TableSpec


def text_expr(spec: TableSpec, alias: str | None = None) -> sql.Composable:
    """The text a row is embedded from: its non-NULL text columns joined by newlines."""
    columns = [sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in spec.text_columns]
    return sql.SQL("concat_ws(E'\\n', {})").format(sql.SQL(", ").join(columns))


def hash_expr(spec: TableSpec, alias: str | None = None) -> sql.Composable:
    """SHA-256 (hex) of the row's text, computed in the database (matches `content_hash`)."""
    return sql.SQL("encode(sha256(convert_to({}, 'UTF8')), 'hex')").format(text_expr(spec, alias))


def needs_embedding_expr(
    spec: TableSpec, alias: str | None = None, *, model_id: str
) -> sql.Composable:
    """True where the row has no embedding, its text changed since (the stored source hash,
    kept by the tracking trigger, differs from the hash of the embedded text), or another
    model made it.

    Reads stored columns only, so no row's text is hashed. The model id is written as a
    literal, not a parameter: the planner then proves that a query filtering on this
    expression can use the partial "pending" index built on the very same expression
    (`tracking.ensure_pending_index`)."""

    def col(name: str) -> sql.Composable:
        return sql.Identifier(alias, name) if alias else sql.Identifier(name)

    return sql.SQL(
        "({emb} IS NULL OR {hash} IS DISTINCT FROM {source} OR {model} IS DISTINCT FROM {m})"
    ).format(
        emb=col(spec.embedding_column),
        hash=col(spec.hash_column),
        source=col(spec.source_hash_column),
        model=col(spec.model_column),
        m=sql.Literal(model_id),
    )


def compose_text(parts: Iterable[str | None]) -> str:
    """The text a row is embedded from: non-NULL parts joined by newlines (as SQL
    `concat_ws(E'\\n', ...)` does)."""
    return "\n".join(p for p in parts if p is not None)


def content_hash(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text; equal to the database's `hash_expr`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
