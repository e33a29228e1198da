"""The query vector pool (`search/query_vectors.py`): a bounded cache keyed by model and
text, identical queries in flight sharing one embedding, a bounded number of workers that
embed queued texts together, and one text the model refuses failing only its own query.
The model here is a function that records its calls; the real model is tested through the
search service."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from embedding_pipeline.lib.embedders import LocalEmbedder
from embedding_pipeline.search.query_vectors import QueryVectors


class RecordingModel:
    """Vectors [len(text), position of the call]; blocks while `gate` is closed; refuses
    the text "bad"."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.running = 0
        self.most_running = 0
        self.lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(list(texts))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.started.set()
        try:
            self.gate.wait(10)
            if "bad" in texts:
                raise ValueError("refused")
            return np.array([[len(t), len(self.calls)] for t in texts], dtype=np.float32)
        finally:
            with self.lock:
                self.running -= 1


def test_a_repeated_query_comes_from_the_cache_and_the_cache_is_bounded():
    model = RecordingModel()
    pool = QueryVectors(model, "m1", cache_size=2)
    first = pool.get("alpha")
    assert pool.get("alpha") is first
    assert not first.flags.writeable  # shared between requests: nobody may change it
    pool.get("beta")
    pool.get("gamma")  # evicts alpha, the least recently used
    pool.get("alpha")
    assert [c for call in model.calls for c in call] == ["alpha", "beta", "gamma", "alpha"]
    stats, cached = pool.snapshot()
    assert (stats.cache_hits, stats.embedded, stats.model_calls, cached) == (1, 4, 4, 2)
    pool.close()


def test_no_cache_when_its_size_is_zero():
    model = RecordingModel()
    pool = QueryVectors(model, "m1", cache_size=0)
    pool.get("alpha")
    pool.get("alpha")
    assert len(model.calls) == 2 and pool.snapshot()[1] == 0
    pool.close()


def test_queued_queries_are_embedded_together_by_a_bounded_pool():
    model = RecordingModel()
    model.gate.clear()
    pool = QueryVectors(model, "m1", workers=2, max_batch=4)
    futures = [pool.submit(f"text {i:02d}") for i in range(12)]
    twin = pool.submit("text 00")  # the same text while it is embedded: shared
    model.gate.set()
    vectors = [f.result(timeout=10) for f in futures]
    assert twin.result(timeout=10) is vectors[0]
    assert model.most_running <= 2
    assert sorted(t for call in model.calls for t in call) == [f"text {i:02d}" for i in range(12)]
    assert max(len(call) for call in model.calls) == 4
    assert len(model.calls) < 12
    stats, _ = pool.snapshot()
    assert (stats.shared, stats.embedded, stats.model_calls) == (1, 12, len(model.calls))
    pool.close()


def test_a_text_the_model_refuses_fails_only_its_own_query():
    model = RecordingModel()
    model.gate.clear()
    pool = QueryVectors(model, "m1", workers=1, max_batch=8)
    blocker = pool.submit("first")  # holds the worker while the next three queue up
    assert model.started.wait(10)
    queued = {text: pool.submit(text) for text in ("good", "bad", "fine")}
    model.gate.set()
    blocker.result(timeout=10)
    assert queued["good"].result(timeout=10)[0] == 4
    assert queued["fine"].result(timeout=10)[0] == 4
    with pytest.raises(ValueError, match="refused"):
        queued["bad"].result(timeout=10)
    # tried together first, then one by one
    assert model.calls == [["first"], ["good", "bad", "fine"], ["good"], ["bad"], ["fine"]]
    assert pool.snapshot()[1] == 3  # the refusal is not cached
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("after")


def test_the_cache_key_holds_the_model():
    """Two pools of two models over one text: each embeds it with its own model."""
    model = RecordingModel()
    QueryVectors(model, "m1").get("same")
    QueryVectors(model, "m2").get("same")
    assert model.calls == [["same"], ["same"]]


def test_the_real_model_gives_the_same_vector_alone_and_in_a_batch():
    """Batching queries changes nothing in their vectors (the local model pads each
    batch, and the attention mask keeps padding out of the mean)."""
    embedder = LocalEmbedder()
    pool = QueryVectors(embedder.embed, embedder.model_id, max_batch=8)
    texts = ["deploy failed", "why were customers charged twice on Friday evening?", "k8s"]
    together = [f.result(timeout=60) for f in [pool.submit(t) for t in texts]]
    for text, vector in zip(texts, together, strict=True):
        np.testing.assert_allclose(vector, embedder.embed([text])[0], atol=1e-5)
    pool.close()
