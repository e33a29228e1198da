"""The one embedder interface: texts in, unit-agnostic float32 vectors out.

Assets and the CLI only ever see `Embedder`; provider SDKs stay inside the subclasses.
The base class owns what every provider shares: inputs cut to the model's limit, the
client-side rate limiter, retries of transient failures under a deadline, and the check
that the answer holds one finite vector of the right size per text. Subclasses only
translate one request and classify its failures into the three errors of `errors.py`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from embedding_pipeline.lib.embedders.catalog import Prompts, prompted_model_id
from embedding_pipeline.lib.embedders.errors import EmbeddingError, TransientEmbeddingError
from embedding_pipeline.lib.embedders.ratelimit import RateLimiter
from embedding_pipeline.lib.embedders.retry import RetryPolicy, RetryStats, call_with_retries


@dataclass
class EmbedderStats:
    """What an embedder did since it was built: surfaced as run metadata."""

    calls: int = 0
    texts: int = 0
    estimated_tokens: int = 0
    truncated: int = 0
    rate_limit_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, texts: int, tokens: int, truncated: int, waited: float) -> None:
        with self.lock:
            self.calls += 1
            self.texts += texts
            self.estimated_tokens += tokens
            self.truncated += truncated
            self.rate_limit_seconds += waited


class Embedder(abc.ABC):
    """Turns texts into vectors of a fixed dimension with one model."""

    #: A stable id stored next to every vector, e.g. ``local:all-MiniLM-L6-v2-int8``.
    model_id: str
    #: Length of every vector this embedder returns.
    dimension: int
    #: Most texts a single provider request may carry.
    max_batch_size: int = 2048
    #: Most tokens (by `token_bound`) a single provider request may carry; None: no limit.
    max_batch_tokens: int | None = None
    #: Most tokens one input may have; longer inputs are cut before they are sent. None:
    #: the embedder truncates itself (the local model's tokenizer does).
    max_input_tokens: int | None = None
    #: Requests in flight at once that suit this provider (a run's default concurrency).
    default_concurrency: int = 1
    #: True when `_embed` adds the exact tokens it sent to `stats` itself (a model with
    #: its tokenizer at hand); otherwise `embed` adds an estimate of the text it sent.
    counts_tokens: bool = False
    #: Rows a run claims at once, at least: the engine sorts a claim by length before it
    #: splits it into requests, so a model that pads to the longest text in a batch (the
    #: local one) wastes less the more rows it can sort.
    default_claim_rows: int = 512
    #: Put before every query (`embed(..., query=True)`) and every document (the rows a
    #: run embeds); part of `model_id` (`catalog.prompted_model_id`). Set by `set_prompts`.
    query_prefix: str = ""
    document_prefix: str = ""

    def __init__(
        self, *, retry: RetryPolicy | None = None, limiter: RateLimiter | None = None
    ) -> None:
        self.stats = EmbedderStats()
        self.retry_policy = retry or RetryPolicy()
        self.retry_stats = RetryStats()
        self.limiter = limiter

    @abc.abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Return one row per text; called with at most `max_batch_size` texts. Raises
        `TransientEmbeddingError`, `InputRejectedError` or `EmbeddingError`."""

    def _embed_queries(self, texts: list[str]) -> np.ndarray:
        """`_embed` for search queries; models that treat queries apart (their own
        prompts, an `input_type`) override it."""
        return self._embed(texts)

    def set_prompts(self, prompts: Prompts) -> None:
        """Put `prompts` before queries and documents from now on; the model id records
        them (`catalog.prompted_model_id`)."""
        base = self.__dict__.setdefault("base_model_id", self.model_id)
        self.query_prefix, self.document_prefix = prompts.query, prompts.document
        self.model_id = prompted_model_id(base, prompts)

    def request_tokens(self, text: str, *, query: bool = False) -> int:
        """What `text` costs in a request (`token_bound` of what is sent: prefixed, cut)."""
        prefix = self.query_prefix if query else self.document_prefix
        return self.token_bound(self.prepare(prefix + text)[0])

    def warm_up(self) -> None:
        """Load what the first request needs (a client, a model) now, once, rather than in
        the first requests racing in parallel. Providers with nothing to load do nothing."""
        return None

    def token_bound(self, text: str) -> int:
        """An upper bound of the tokens `text` costs: its UTF-8 bytes (no BPE token is
        shorter than one byte), so a text cut to N bytes never exceeds N tokens without a
        tokenizer file, which cannot be downloaded here."""
        return max(1, len(text.encode("utf-8", "surrogatepass")))

    def prepare(self, text: str) -> tuple[str, bool]:
        """`text` cut to `max_input_tokens` (by `token_bound`), and whether it was cut."""
        limit = self.max_input_tokens
        if limit is None or self.token_bound(text) <= limit:
            return text, False
        return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore"), True

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        """Embed `texts` (documents, or search queries with `query`) in one request, each
        after its prefix, retried while transient failures last; checks that the provider
        answered one vector per text of the right dimension with finite values."""
        prefix = self.query_prefix if query else self.document_prefix
        prepared = [self.prepare(prefix + t) for t in texts]
        batch = [text for text, _ in prepared]
        if not batch:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(batch) > self.max_batch_size:
            raise ValueError(
                f"{len(batch)} texts exceed the {self.model_id} batch limit of "
                f"{self.max_batch_size}"
            )
        budget = sum(self.token_bound(t) for t in batch)
        waited = 0.0

        def attempt() -> np.ndarray:
            nonlocal waited
            if self.limiter is not None:
                waited += self.limiter.acquire(budget)
            try:
                send = self._embed_queries if query else self._embed
                return np.asarray(send(batch), dtype=np.float32)
            except TransientEmbeddingError as exc:
                if exc.retry_after and self.limiter is not None:
                    self.limiter.pause(exc.retry_after)
                raise

        vectors = call_with_retries(attempt, self.retry_policy, self.retry_stats)
        self.stats.add(
            texts=len(batch),
            tokens=0 if self.counts_tokens else sum(estimate_tokens(t) for t in batch),
            truncated=sum(1 for _, cut in prepared if cut),
            waited=waited,
        )
        return check_vectors(
            vectors, expected_rows=len(batch), dimension=self.dimension, model_id=self.model_id
        )

    def describe(self) -> str:
        return f"{self.model_id} ({self.dimension} dimensions)"


def check_vectors(
    vectors: np.ndarray, *, expected_rows: int, dimension: int, model_id: str
) -> np.ndarray:
    if vectors.ndim != 2 or vectors.shape[0] != expected_rows:
        raise EmbeddingError(
            f"{model_id} returned {vectors.shape[0] if vectors.ndim else 0} vectors "
            f"for {expected_rows} texts"
        )
    if vectors.shape[1] != dimension:
        raise EmbeddingError(
            f"{model_id} returned vectors of dimension {vectors.shape[1]}, expected {dimension}"
        )
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise EmbeddingError(f"{model_id} returned a non-finite vector for text #{bad}")
    return vectors


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate (about 4 characters a token for English text)."""
    return max(1, (len(text) + 3) // 4)
