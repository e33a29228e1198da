"""How a claim's rows are split into provider requests: by item count and token budget."""

from __future__ import annotations


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
