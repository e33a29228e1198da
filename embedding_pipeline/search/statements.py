"""The SQL of every search, as SQLAlchemy Core statements built once per shape.

A statement depends on the table, the mode and which filters are used (`filter_shape`);
everything else is a parameter, so each shape is built once per process and SQLAlchemy's
compiled cache does the rest. Parameters: `query_vector`, `query_text`, `model_id`, `k`,
`candidates`, `row_id`, `message_id`, `topic` and `filter_<name>`. `k` and `candidates`
are rendered into the SQL text (a LIMIT the planner must see: a prepared statement's
generic plan would otherwise guess it and could give up the index).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import REGCONFIG, TSQUERY, TSVECTOR

from embedding_pipeline.search.filters import filter_clauses, topic_id
from embedding_pipeline.search.tables import FIELD_COLUMNS, SearchTables
from embedding_pipeline.settings import Settings

T = TypeVar("T")
Shape = tuple[str, ...]


def _rendered(name: str, value: object = None) -> sa.BindParameter[Any]:
    """An integer parameter rendered into the statement text at execution."""
    return sa.bindparam(name, value, type_=sa.Integer(), literal_execute=True)


class Statements:
    """The statements of one `Searcher` (its tables and settings), cached by shape."""

    def __init__(self, tables: SearchTables, settings: Settings) -> None:
        self.tables = tables
        self.settings = settings
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def _cached(self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    # -- before a vector search ------------------------------------------------------------

    def index_settings(self) -> list[sa.ColumnElement[Any]]:
        """`set_config(name, value, is_local => true)` for ef_search, iterative scans and
        their budget: they last until the transaction (or savepoint) ends."""
        s = self.settings
        values = {
            "hnsw.ef_search": str(s.hnsw.ef_search),
            "hnsw.iterative_scan": s.search.iterative_scan,
            "hnsw.max_scan_tuples": str(s.search.max_scan_tuples),
        }
        return [
            sa.func.set_config(name, value, sa.true()).label(name.replace(".", "_"))
            for name, value in values.items()
        ]

    def vector_prelude(self, key: str) -> sa.Select[Any]:
        """The index settings, whether the model registry exists, and the model of a
        stored vector (the column's model when no `model switch` registered one)."""

        def build() -> sa.Select[Any]:
            embedding = self.tables.column(key, "embedding_column")
            stored = (
                sa.select(self.tables.column(key, "model_column"))
                .where(embedding.is_not(None))
                .limit(1)
                .scalar_subquery()
            )
            registry = sa.func.to_regclass(f'"{self.tables.registry.name}"')
            return sa.select(
                *self.index_settings(),
                registry.is_not(None).label("has_registry"),
                stored.label("stored"),
            )

        return self._cached(("vector_prelude", key), build)

    def registered_model(self, key: str) -> sa.Select[Any]:
        registry = self.tables.registry
        spec = self.tables.specs[key]
        return sa.select(registry.c.model_id).where(
            registry.c.table_name == spec.table, registry.c.column_name == spec.embedding_column
        )

    def similar_prelude(self, key: str) -> sa.Select[Any]:
        """The index settings, whether row `row_id` exists, and its vector's model."""

        def build() -> sa.Select[Any]:
            row = self.tables.id(key) == sa.bindparam("row_id", type_=sa.BigInteger())
            embedding = self.tables.column(key, "embedding_column")
            model = self.tables.column(key, "model_column")
            return sa.select(
                *self.index_settings(),
                sa.exists().where(row).label("found"),
                sa.select(model)
                .where(row, embedding.is_not(None))
                .scalar_subquery()
                .label("model"),
            )

        return self._cached(("similar_prelude", key), build)

    # -- the searches -----------------------------------------------------------------------

    def filtered_rows(self, key: str, shape: Shape) -> sa.Select[Any]:
        """The rows a filter shape keeps: EXPLAINed for the planner's estimate of how many
        (an exact scan of them beats the HNSW index when they are few)."""

        def build() -> sa.Select[Any]:
            conditions = filter_clauses(self.tables, key, shape)
            return sa.select(sa.literal(1)).select_from(self.tables[key]).where(*conditions)

        return self._cached(("filtered_rows", key, shape), build)

    def search(self, key: str, mode: str, shape: Shape, *, exact: bool) -> sa.Select[Any]:
        """`k` hits of `key` by `mode`, filtered by `shape`; `exact`: the vector ranking by
        a scan of the filtered rows instead of the HNSW index."""

        def build() -> sa.Select[Any]:
            query = sa.bindparam("query_vector", type_=Vector())
            if mode == "text":
                matches = self._text_matches(key, shape, "k")
                return self._ranked(key, matches, matches.c.rank.desc(), matches.c.rank)
            if mode == "vector":
                nearest = self._nearest(key, query, shape, "k", exact=exact)
                return self._ranked(key, nearest, nearest.c.distance, 1 - nearest.c.distance)
            nearest = self._nearest(key, query, shape, "candidates", exact=exact)
            matches = self._text_matches(key, shape, "candidates", with_document=True)
            return self._fused(key, nearest, matches)

        return self._cached(("search", key, mode, shape, exact), build)

    def similar(self, key: str, shape: Shape, *, exact: bool) -> sa.Select[Any]:
        """`k` rows nearest to row `row_id` (itself excluded), among its model's vectors."""

        def build() -> sa.Select[Any]:
            row_id = self.tables.id(key)
            stored = sa.bindparam("row_id", type_=sa.BigInteger())
            embedding = self.tables.column(key, "embedding_column")
            query = sa.select(embedding).where(row_id == stored).scalar_subquery()
            exclude = row_id != stored
            nearest = self._nearest(key, query, shape, "k", exact=exact, exclude=exclude)
            return self._ranked(key, nearest, nearest.c.distance, 1 - nearest.c.distance)

        return self._cached(("similar", key, shape, exact), build)

    def atoms_for_message(self) -> sa.Select[Any]:
        def build() -> sa.Select[Any]:
            links = self.tables.links
            columns, source = self._fields("atoms", None)
            return (
                sa.select(*columns)
                .select_from(source.join(links, links.c.atom_id == self.tables.id("atoms")))
                .where(links.c.message_id == sa.bindparam("message_id", type_=sa.BigInteger()))
                .order_by(self.tables.column("atoms", "partition_column"), self.tables.id("atoms"))
            )

        return self._cached(("atoms_for_message",), build)

    def messages_for_topic(self, by_key: bool, shape: Shape) -> sa.Select[Any]:
        def build() -> sa.Select[Any]:
            messages = self.tables["messages"]
            columns, source = self._fields("messages", None)
            return (
                sa.select(*columns)
                .select_from(source)
                .where(
                    messages.c.topic_id == topic_id(self.tables, "topic", by_key=by_key),
                    *filter_clauses(self.tables, "messages", shape),
                )
                .order_by(
                    self.tables.column("messages", "partition_column"),
                    self.tables.id("messages"),
                )
                .limit(_rendered("k"))
            )

        return self._cached(("messages_for_topic", by_key, shape), build)

    def exists(self, key: str, by_key: bool = False) -> sa.Select[Any]:
        """Whether row `row_id` of `key` exists (`by_key`: the row whose `key` is `row_id`)."""
        t = self.tables[key]
        condition = (
            t.c.key == sa.bindparam("row_id", type_=sa.Text())
            if by_key
            else self.tables.id(key) == sa.bindparam("row_id", type_=sa.BigInteger())
        )
        return sa.select(sa.exists().where(condition).label("found"))

    # -- parts --------------------------------------------------------------------------------

    def _nearest(
        self,
        key: str,
        query: sa.ColumnElement[Any],
        shape: Shape,
        limit: str,
        *,
        exact: bool = False,
        exclude: sa.ColumnElement[bool] | None = None,
    ) -> sa.CTE:
        """The rows nearest to `query` through the HNSW index (`ORDER BY embedding <=> q
        LIMIT n`, the form the index serves), among vectors of `model_id`, filters applied
        inside so an iterative scan keeps going until enough rows pass. MATERIALIZED, as
        pgvector advises: with relaxed ordering rows may come slightly out of order, and
        the caller sorts them again. `exact` orders by `distance + 0`, which the index
        cannot serve: the planner then reads the filtered rows (through the filter
        columns' B-tree indexes) and sorts them, the exact answer."""
        row_id = self.tables.id(key)
        embedding = self.tables.column(key, "embedding_column")
        model = self.tables.column(key, "model_column")
        distance = embedding.cosine_distance(query).label("distance")
        conditions = [
            embedding.is_not(None),
            model == sa.bindparam("model_id", type_=sa.Text()),
            *filter_clauses(self.tables, key, shape),
        ]
        if exclude is not None:
            conditions.append(exclude)
        return (
            sa.select(row_id.label("id"), distance)
            .where(*conditions)
            .order_by(distance + 0 if exact else distance)
            .limit(_rendered(limit))
            .cte("nearest")
            .prefix_with("MATERIALIZED")
        )

    def _language(self) -> sa.ColumnElement[Any]:
        language: sa.BindParameter[str] = sa.bindparam(
            "text_language", self.settings.search.text_language, literal_execute=True
        )
        return sa.cast(language, REGCONFIG())

    def _text_query(self) -> sa.ColumnElement[Any]:
        """Any of the words of `query_text`: `plainto_tsquery` (stemmed, stop words dropped)
        with its ANDs turned into ORs, so a question matches rows holding some of its
        words; `ts_rank` then puts rows with more of them (a title's count more) first.
        Not `ts_rank_cd`: it ranked 5,374 matches in 42 ms where `ts_rank` took 17
        (docs/benchmarks.md), and it was no better on the labelled questions."""
        text = sa.bindparam("query_text", type_=sa.Text())
        strict = sa.cast(sa.func.plainto_tsquery(self._language(), text), sa.Text())
        return sa.cast(sa.func.replace(strict, " & ", " | "), TSQUERY())

    def _coverage(self, document: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """The share of the query's distinct words (lexemes, as `to_tsvector` makes them)
        that the row's text holds: the lexemes `document || query` has fewer than the two
        apart are the shared ones. 1.0 for a row holding every word of the query."""
        words = sa.func.to_tsvector(self._language(), sa.bindparam("query_text", type_=sa.Text()))
        shared = (
            sa.func.length(document)
            + sa.func.length(words)
            - sa.func.length(document.op("||", return_type=TSVECTOR())(words))
        )
        return sa.cast(shared, sa.Float()) / sa.func.greatest(sa.func.length(words), 1)

    def _text_matches(
        self, key: str, shape: Shape, limit: str, *, with_document: bool = False
    ) -> sa.CTE:
        row_id = self.tables.id(key)
        document = self.tables.column(key, "tsv_column")
        query = self._text_query()
        rank = sa.func.ts_rank(document, query).label("rank")
        columns: list[sa.ColumnElement[Any]] = [row_id.label("id"), rank]
        if with_document:  # for the hybrid's coverage, computed for the kept rows only
            columns.append(document.label("document"))
        return (
            sa.select(*columns)
            .where(document.bool_op("@@")(query), *filter_clauses(self.tables, key, shape))
            .order_by(rank.desc(), row_id)
            .limit(_rendered(limit))
            .cte("matches")
            .prefix_with("MATERIALIZED")
        )

    def _fields(
        self, key: str, ranked: sa.CTE | sa.Subquery | None
    ) -> tuple[list[sa.ColumnElement[Any]], sa.FromClause]:
        """A hit's columns (id, text, time, the table's fields, its topic's key) and the
        FROM clause joining `ranked` (if any) to the table, and the table to its topic."""
        t, spec = self.tables[key], self.tables.specs[key]
        row_id = self.tables.id(key)
        columns: list[sa.ColumnElement[Any]] = [
            row_id.label("id"),
            sa.func.concat_ws("\n", *(t.c[c] for c in spec.text_columns)).label("text"),
            self.tables.column(key, "partition_column").label("time"),
            *(t.c[column].label(field) for field, column in FIELD_COLUMNS[key].items()),
        ]
        source: sa.FromClause = t if ranked is None else ranked.join(t, row_id == ranked.c.id)
        if "topic_id" in FIELD_COLUMNS[key]:
            topic = self.tables["topics"].alias("topic")
            source = source.outerjoin(topic, topic.c[self.tables.id("topics").name] == t.c.topic_id)
            columns.append(topic.c.key.label("topic"))
        return columns, source

    def _ranked(
        self,
        key: str,
        ranked: sa.CTE,
        order: sa.ColumnElement[Any],
        score: sa.ColumnElement[Any],
    ) -> sa.Select[Any]:
        columns, source = self._fields(key, ranked)
        return (
            sa.select(*columns, score.label("score"))
            .select_from(source)
            .order_by(order, ranked.c.id)
        )

    def _fused(self, key: str, nearest: sa.CTE, matches: sa.CTE) -> sa.Select[Any]:
        """Reciprocal rank fusion, the text ranking weighted by how much of the query a row
        holds: a row scores 1 / (rrf_k + vector rank) in the vector ranking, and coverage² /
        (rrf_k + text rank) in the text ranking, where coverage is the share of the query's
        words the row's text holds (`_coverage`). A row holding one word of a five-word
        question adds a 25th of a text hit to its vector score, one holding all of them
        counts as much as a vector hit of the same rank (the measurements behind the
        square: docs/search.md, "Hybrid ranking"). Ties go to the row with the better
        single rank, then the lower id."""
        rrf = sa.literal(float(self.settings.search.rrf_k))
        by_vector = sa.select(
            nearest.c.id,
            sa.func.row_number().over(order_by=(nearest.c.distance, nearest.c.id)).label("rank"),
        ).subquery("by_vector")
        by_text = sa.select(
            matches.c.id,
            self._coverage(matches.c.document).label("coverage"),
            sa.func.row_number().over(order_by=(matches.c.rank.desc(), matches.c.id)).label("rank"),
        ).subquery("by_text")
        weight = by_text.c.coverage * by_text.c.coverage
        score = sa.func.coalesce(1.0 / (rrf + by_vector.c.rank), 0.0) + sa.func.coalesce(
            weight / (rrf + by_text.c.rank), 0.0
        )
        best_rank = sa.func.least(by_vector.c.rank, by_text.c.rank)
        row_id = sa.func.coalesce(by_vector.c.id, by_text.c.id)
        fused = (
            sa.select(
                row_id.label("id"),
                score.label("score"),
                best_rank.label("best_rank"),
                by_vector.c.rank.label("vector_rank"),
                by_text.c.rank.label("text_rank"),
            )
            .select_from(by_vector.outerjoin(by_text, by_vector.c.id == by_text.c.id, full=True))
            .order_by(score.desc(), best_rank, row_id)
            .limit(_rendered("k"))
            .subquery("fused")
        )
        columns, source = self._fields(key, fused)
        return (
            sa.select(*columns, fused.c.score, fused.c.vector_rank, fused.c.text_rank)
            .select_from(source)
            .order_by(fused.c.score.desc(), fused.c.best_rank, fused.c.id)
        )
