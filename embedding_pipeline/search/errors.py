"""What a search can refuse with. Database and provider failures are not wrapped: they
arrive as SQLAlchemy's `DBAPIError`s and the pipeline's `EmbeddingError`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class SearchError(RuntimeError):
    """Base class of the refusals below."""


class InvalidQuery(SearchError, ValueError):
    """Bad input: `field` names it (`filters.since`, `limit`, `table`, ...)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ModelMismatch(SearchError):
    """The column holds another model's vectors than the one configured to embed queries:
    comparing vectors of two models would return confident nonsense."""


class NotFound(SearchError):
    """The row a similarity or lookup asked for does not exist (or has no embedding yet)."""


def describe_errors(
    errors: Sequence[Mapping[str, Any]],
    *,
    known_fields: Mapping[tuple[str, ...], Iterable[str]] | None = None,
) -> InvalidQuery:
    """Pydantic's validation errors as one `InvalidQuery`: every error on one line,
    `field: reason; field: reason`, with dotted field names (`filters.since`). FastAPI's
    location prefix (`body`, `path`, `query`) is dropped from the name; `known_fields`
    lists the expected names by parent location (prefix included) for unknown-field
    errors."""
    parts: list[tuple[str, str]] = []
    for error in errors:
        loc = tuple(str(p) for p in error.get("loc", ()))
        reason = str(error.get("msg", "invalid"))
        kind = error.get("type")
        if kind == "extra_forbidden" and known_fields and loc[:-1] in known_fields:
            reason = f"unknown field; expected one of {', '.join(known_fields[loc[:-1]])}"
        elif kind == "json_invalid":
            loc, reason = ("body",), f"invalid JSON ({error.get('ctx', {}).get('error', reason)})"
        reason = reason.removeprefix("Value error, ")
        if len(loc) > 1 and loc[0] in _REQUEST_PARTS:
            loc = loc[1:]
        parts.append((".".join(loc) or "body", reason))
    if not parts:
        return InvalidQuery("body", "invalid request")
    first = InvalidQuery(*parts[0])
    if len(parts) > 1:
        first.args = ("; ".join(f"{field}: {reason}" for field, reason in parts),)
    return first


_REQUEST_PARTS = ("body", "path", "query")
