"""Pure text helpers: how requests are split, and the Python twins of the text and hash
the database computes (`db.text_expr`, `db.hash_expr`) for tools and tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def compose_text(parts: Iterable[str | None]) -> str:
    """The text a row is embedded from: non-NULL parts joined by newlines (as SQL
    `concat_ws(E'\\n', ...)` does)."""
    return "\n".join(p for p in parts if p is not None)


def content_hash(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text; equal to the database's `hash_expr`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_requests(
    token_counts: list[int], max_items: int, max_tokens: int | None
) -> list[tuple[int, int]]:
    """Split consecutive items into requests of at most `max_items` items and (when set)
    `max_tokens` tokens; an item larger than the token budget travels alone."""
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    spans: list[tuple[int, int]] = []
    start, budget = 0, 0
    for i, tokens in enumerate(token_counts):
        over_tokens = max_tokens is not None and budget + tokens > max_tokens
        if i > start and (i - start >= max_items or over_tokens):
            spans.append((start, i))
            start, budget = i, 0
        budget += tokens
    if start < len(token_counts):
        spans.append((start, len(token_counts)))
    return spans
