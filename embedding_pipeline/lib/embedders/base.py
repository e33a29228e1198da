"""The one embedder interface: texts in, unit-agnostic float32 vectors out.

Assets and the CLI only ever see `Embedder`; provider SDKs stay inside the subclasses.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class EmbeddingError(RuntimeError):
    """A provider failed, was unreachable, or answered with unusable vectors."""


@dataclass
class EmbedderStats:
    """What an embedder did since it was built: surfaced as run metadata."""

    calls: int = 0
    texts: int = 0
    estimated_tokens: int = 0


class Embedder(abc.ABC):
    """Turns texts into vectors of a fixed dimension with one model."""

    #: A stable id stored next to every vector, e.g. ``local:all-MiniLM-L6-v2-int8``.
    model_id: str
    #: Length of every vector this embedder returns.
    dimension: int
    #: Most texts a single provider request may carry.
    max_batch_size: int = 2048
    #: Most (estimated) tokens a single provider request may carry; None means no limit.
    max_batch_tokens: int | None = None

    def __init__(self) -> None:
        self.stats = EmbedderStats()

    @abc.abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Return one row per text; called with at most `max_batch_size` texts."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`, checking that the provider answered one vector per text of the
        right dimension with finite values; raises `EmbeddingError` otherwise."""
        batch = list(texts)
        if not batch:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if len(batch) > self.max_batch_size:
            raise ValueError(
                f"{len(batch)} texts exceed the {self.model_id} batch limit of "
                f"{self.max_batch_size}"
            )
        self.stats.calls += 1
        self.stats.texts += len(batch)
        self.stats.estimated_tokens += sum(estimate_tokens(t) for t in batch)
        vectors = np.asarray(self._embed(batch), dtype=np.float32)
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
