"""What a search takes and gives back: the modes, the most results one call returns, a
checked request (`SearchQuery`), one result (`Hit`), and the checks that turn a caller's
table, count, id and mode into a request or an `InvalidQuery` naming the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from embedding_pipeline.search.errors import InvalidQuery
from embedding_pipeline.search.filters import Filters
from embedding_pipeline.search.inputs import id_or_key, id_problem
from embedding_pipeline.search.tables import TABLE_KEYS

Mode = Literal["vector", "text", "hybrid"]
MODES: tuple[str, ...] = get_args(Mode)
#: The most results one call returns.
MAX_LIMIT = 100


@dataclass(frozen=True)
class Hit:
    """One result. `score` is the mode's (cosine similarity, text rank or fused score;
    None for plain lookups); `vector_rank` / `text_rank` say where the row stood in each
    ranking (1 = first); fields a table does not have are None."""

    table: str
    id: int
    score: float | None
    text: str
    time: datetime | None = None
    author: str | None = None
    author_id: str | None = None
    topic_id: int | None = None
    topic: str | None = None
    kind: str | None = None
    title: str | None = None
    key: str | None = None
    vector_rank: int | None = None
    text_rank: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the time as ISO 8601."""
        out = asdict(self)
        out["time"] = self.time.isoformat() if self.time else None
        return out


@dataclass(frozen=True)
class SearchQuery:
    """A checked search request (`Searcher.prepare`): the table, the query text (stripped),
    the result count, the filters and the mode."""

    key: str
    text: str
    k: int
    filters: Filters
    mode: str

    @property
    def needs_vector(self) -> bool:
        return self.mode != "text"


def check_table(table: str) -> str:
    if table not in TABLE_KEYS:
        raise InvalidQuery("table", f"unknown table {table!r}; one of {', '.join(TABLE_KEYS)}")
    return table


def check_limit(k: object, field: str = "k") -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_LIMIT:
        raise InvalidQuery(field, f"must be a whole number from 1 to {MAX_LIMIT}, got {k!r}")
    return k


def check_id(value: object, field: str = "id") -> int:
    problem = id_problem(value)
    if problem:
        raise InvalidQuery(field, problem)
    assert isinstance(value, int)
    return value


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidQuery("mode", f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    return mode


def check_topic(topic: object) -> int | str:
    """A topic as its id or its key."""
    try:
        return id_or_key(topic)
    except ValueError as exc:
        raise InvalidQuery("topic", str(exc)) from None
