"""Query vectors for the search: a bounded cache of recent ones and a bounded pool of
workers that embed the others.

A search in vector or hybrid mode needs its query embedded by the configured model. Under
load, embedding one query at a time in each request's own thread makes every request
wait for every other (the local model runs one call at a time; a remote provider has a
quota). Here instead:

* the last `cache_size` vectors are kept, keyed by model id and text: a repeated query
  (people ask the same things; a page reloads) costs nothing;
* identical texts that are being embedded share that one embedding;
* `workers` threads embed the rest; a worker that finds several texts waiting embeds up
  to `max_batch` of them in one call, so a burst costs fewer, fuller model calls and
  slow embeddings queue instead of piling up in parallel.

The embedder cuts every text to the model's input limit as a pipeline run does
(`Embedder.prepare`, the local tokenizer's 256 tokens).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclass
class QueryVectorStats:
    """Counts since the pool was made: served from the cache, shared with an identical
    query in flight, embedded (texts), and model calls made for them."""

    cache_hits: int = 0
    shared: int = 0
    embedded: int = 0
    model_calls: int = 0


class QueryVectors:
    """Vectors of query texts from one model (`embed`, `model_id`); thread-safe. `get`
    blocks until the vector is there; `submit` returns a future (for async callers)."""

    def __init__(
        self,
        embed: Embed,
        model_id: str,
        *,
        workers: int = 1,
        cache_size: int = 1024,
        max_batch: int = 32,
    ) -> None:
        if workers < 1 or cache_size < 0 or max_batch < 1:
            raise ValueError("workers and max_batch must be at least 1, cache_size at least 0")
        self._embed = embed
        self.model_id = model_id
        self.workers = workers
        self.cache_size = cache_size
        self.max_batch = max_batch
        self.stats = QueryVectorStats()
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[str, str], Future[np.ndarray]] = {}
        self._queue: deque[tuple[tuple[str, str], Future[np.ndarray]]] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._closed = False

    def get(self, text: str) -> np.ndarray:
        return self.submit(text).result()

    def submit(self, text: str) -> Future[np.ndarray]:
        key = (self.model_id, text)
        with self._lock:
            if self._closed:
                raise RuntimeError("the query embedding pool is closed")
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                done: Future[np.ndarray] = Future()
                done.set_result(cached)
                return done
            pending = self._pending.get(key)
            if pending is not None:
                self.stats.shared += 1
                return pending
            future: Future[np.ndarray] = Future()
            self._pending[key] = future
            self._queue.append((key, future))
            if len(self._threads) < self.workers:
                self._start_worker()
            self._ready.notify()
            return future

    def close(self) -> None:
        """Stop the workers once the queue is empty; later `submit`s raise."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def snapshot(self) -> tuple[QueryVectorStats, int]:
        """A copy of the counts, and the number of vectors cached."""
        with self._lock:
            return replace(self.stats), len(self._cache)

    def _start_worker(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"query-embedding-{len(self._threads) + 1}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))
                ]
            self._embed_batch(batch)

    def _embed_batch(self, batch: list[tuple[tuple[str, str], Future[np.ndarray]]]) -> None:
        """Embed `batch` in one call; when that fails and it holds several texts, each on
        its own, so that one text the provider refuses fails only its own request."""
        texts = [text for (_, text), _ in batch]
        try:
            vectors = self._embed(texts)
            calls = 1
        except Exception as exc:
            if len(batch) == 1:
                self._finish(batch, [exc], calls=1)
                return
            outcomes: list[np.ndarray | BaseException] = []
            for text in texts:
                try:
                    outcomes.append(self._embed([text])[0])
                except Exception as single:
                    outcomes.append(single)
            self._finish(batch, outcomes, calls=1 + len(texts))
            return
        self._finish(batch, list(vectors), calls=calls)

    def _finish(
        self,
        batch: list[tuple[tuple[str, str], Future[np.ndarray]]],
        outcomes: Sequence[np.ndarray | BaseException],
        *,
        calls: int,
    ) -> None:
        with self._lock:
            self.stats.model_calls += calls
            for (key, future), outcome in zip(batch, outcomes, strict=True):
                self._pending.pop(key, None)
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                    continue
                vector = np.array(outcome, dtype=np.float32)
                vector.setflags(write=False)
                self.stats.embedded += 1
                if self.cache_size:
                    self._cache[key] = vector
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
                future.set_result(vector)
