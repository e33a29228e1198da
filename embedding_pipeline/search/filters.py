"""Search filters: what a caller may ask for, and the SQL conditions it becomes.

In JSON (HTTP, `--json`) they are `{"since", "until", "author", "topic", "extraction",
"kind"}`, each optional: `since` inclusive and `until` exclusive (ISO 8601; a date means
its midnight, a time without an offset means UTC), `author` a Telegram `from_id`, `topic`
a topic id (integer, or a string of ASCII digits) or key (string), `extraction` an
extraction id, `kind` an atom kind. Ids are bigints; strings hold at most
`MAX_KEY_CHARS` characters and no NUL or lone surrogate (`inputs.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from embedding_pipeline.search.errors import InvalidQuery, describe_errors
from embedding_pipeline.search.inputs import MAX_ID, MAX_KEY_CHARS, id_or_key, text_problem
from embedding_pipeline.search.tables import SearchTables

FILTER_NAMES = ("since", "until", "author", "topic", "extraction", "kind")

#: The filters each table can apply. `author` on atoms means "extracted from a message of
#: that author", on topics "discussed by that author"; `kind` exists only for atoms.
APPLICABLE: dict[str, frozenset[str]] = {
    "messages": frozenset({"since", "until", "author", "topic", "extraction"}),
    "topics": frozenset({"since", "until", "author", "extraction"}),
    "atoms": frozenset(FILTER_NAMES),
}


def _iso_time(value: object) -> object:
    """Strings (ISO 8601), datetimes and dates pass; numbers are refused rather than read
    as Unix timestamps."""
    if isinstance(value, datetime | str) or value is None:
        return value
    if isinstance(value, date):
        return datetime.combine(value, time())
    raise ValueError("expected an ISO 8601 date or date-time string")


def _id_or_key(value: object) -> object:
    return None if value is None else id_or_key(value)


IsoTime = Annotated[datetime | None, BeforeValidator(_iso_time)]
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS)]
RowId = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]


class Filters(BaseModel):
    """Optional restrictions of a search; unknown names are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: IsoTime = Field(default=None, description="inclusive lower bound of the row's time")
    until: IsoTime = Field(default=None, description="exclusive upper bound of the row's time")
    author: Key | None = Field(default=None, description="Telegram from_id")
    topic: Annotated[int | str | None, BeforeValidator(_id_or_key)] = Field(
        default=None, description="topic id (integer, or a string of digits) or key (string)"
    )
    extraction: RowId | None = Field(default=None, description="extraction id")
    kind: Key | None = Field(default=None, description="atom kind (atoms only)")

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("author", "kind")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        problem = None if value is None else text_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("until")
    @classmethod
    def _after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if value is not None and since is not None and value <= since:
            raise ValueError("must be later than since")
        return value

    @property
    def used(self) -> list[str]:
        return [name for name in FILTER_NAMES if getattr(self, name) is not None]


def parse_filters(filters: Filters | Mapping[str, Any] | None) -> Filters:
    """`filters` as `Filters`; bad input raises `InvalidQuery` naming `filters.<name>`."""
    if filters is None:
        return Filters()
    if isinstance(filters, Filters):
        return filters
    try:
        return Filters.model_validate(dict(filters))
    except ValidationError as exc:
        raise _prefixed(exc) from None
    except TypeError:
        raise InvalidQuery("filters", "expected an object of filters") from None


def _prefixed(exc: ValidationError) -> InvalidQuery:
    errors = [{**e, "loc": ("filters", *e["loc"])} for e in exc.errors()]
    return describe_errors(errors, known_fields={("filters",): FILTER_NAMES})


def check_applicable(key: str, filters: Filters) -> None:
    for name in filters.used:
        if name not in APPLICABLE[key]:
            where = ", ".join(k for k, names in APPLICABLE.items() if name in names)
            raise InvalidQuery(f"filters.{name}", f"does not apply to {key} (only {where})")


def filter_shape(filters: Filters) -> tuple[str, ...]:
    """What the SQL of `filters` depends on: the filters used, `topic` told apart as an
    id or a key. Statements are built (and cached) per shape; values are parameters."""
    return tuple(
        "topic_key" if name == "topic" and isinstance(filters.topic, str) else name
        for name in filters.used
    )


def filter_params(filters: Filters) -> dict[str, Any]:
    """The values of the filters used, as statement parameters (`filter_<name>`)."""
    return {f"filter_{name}": getattr(filters, name) for name in filters.used}


def filter_clauses(
    tables: SearchTables, key: str, shape: tuple[str, ...]
) -> list[sa.ColumnElement[bool]]:
    """The WHERE conditions of a filter shape on table `key` (already checked as
    applicable), each comparing a column with its `filter_<name>` parameter."""
    t = tables[key]
    when = tables.column(key, "partition_column")
    clauses: list[sa.ColumnElement[bool]] = []
    for name in shape:
        if name == "since":
            clauses.append(when >= sa.bindparam("filter_since", type_=when.type))
        elif name == "until":
            clauses.append(when < sa.bindparam("filter_until", type_=when.type))
        elif name == "extraction":
            column = tables.column(key, "extraction_column")
            clauses.append(column == sa.bindparam("filter_extraction", type_=column.type))
        elif name == "kind":
            clauses.append(t.c.kind == sa.bindparam("filter_kind", type_=sa.Text()))
        elif name in ("topic", "topic_key"):
            clauses.append(t.c.topic_id == topic_id(tables, "filter_topic", by_key=name != "topic"))
        elif name == "author":
            clauses.append(_by_author(tables, key, sa.bindparam("filter_author", type_=sa.Text())))
    return clauses


def topic_id(tables: SearchTables, parameter: str, *, by_key: bool) -> sa.ColumnElement[Any]:
    """A topic's id from the parameter `parameter`: the id itself, or (`by_key`) the id of
    the topic with that key."""
    if not by_key:
        return sa.bindparam(parameter, type_=sa.BigInteger())
    topics = tables["topics"]
    key = sa.bindparam(parameter, type_=sa.Text())
    return sa.select(tables.id("topics")).where(topics.c.key == key).scalar_subquery()


def _by_author(
    tables: SearchTables, key: str, author: sa.BindParameter[Any]
) -> sa.ColumnElement[bool]:
    messages = tables["messages"]
    if key == "messages":
        return messages.c.author_id == author
    if key == "atoms":
        links = tables.links
        return sa.exists(
            sa.select(sa.literal(1))
            .select_from(links.join(messages, tables.id("messages") == links.c.message_id))
            .where(links.c.atom_id == tables.id("atoms"), messages.c.author_id == author)
        )
    return sa.exists(
        sa.select(sa.literal(1)).where(
            messages.c.topic_id == tables.id("topics"), messages.c.author_id == author
        )
    )
