"""Pure helpers: hashing, text composition, request planning."""

import hashlib

import pytest

from embedding_pipeline.lib.embedders.base import estimate_tokens
from embedding_pipeline.lib.embedders.batching import plan_requests
from embedding_pipeline.lib.store.expressions import compose_text, content_hash


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (["title", "body"], "title\nbody"),
        (["title", None], "title"),
        ([None, "body"], "body"),
        (["", "body"], "\nbody"),
        ([], ""),
    ],
)
def test_compose_text_matches_concat_ws(parts, expected):
    assert compose_text(parts) == expected


def test_content_hash_is_sha256_of_utf8():
    assert content_hash("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert content_hash("a") != content_hash("a ")


@pytest.mark.parametrize(
    ("tokens", "max_items", "max_tokens", "expected"),
    [
        ([1, 1, 1, 1, 1], 2, None, [(0, 2), (2, 4), (4, 5)]),
        ([5, 5, 5], 10, 10, [(0, 2), (2, 3)]),
        ([50, 1, 1], 10, 10, [(0, 1), (1, 3)]),
        ([1, 50, 1], 10, 10, [(0, 1), (1, 2), (2, 3)]),
        ([], 3, None, []),
        ([3], 1, 1, [(0, 1)]),
    ],
)
def test_plan_requests_respects_item_and_token_limits(tokens, max_items, max_tokens, expected):
    spans = plan_requests(tokens, max_items, max_tokens)
    assert spans == expected
    covered = [i for start, end in spans for i in range(start, end)]
    assert covered == list(range(len(tokens)))


def test_plan_requests_rejects_zero_items():
    with pytest.raises(ValueError, match="at least 1"):
        plan_requests([1], 0, None)


def test_estimate_tokens_is_positive_and_grows():
    assert estimate_tokens("") == 1
    assert estimate_tokens("x" * 400) == 100
