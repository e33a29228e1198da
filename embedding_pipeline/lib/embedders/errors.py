"""The three ways an embedder fails, shared by the interface, the providers and retries."""

from __future__ import annotations


class EmbeddingError(RuntimeError):
    """The provider cannot embed right now: unreachable past the retry deadline, the key
    or model refused, or vectors of the wrong shape. Fails the run (its committed batches
    stay; a retried run does only the rest)."""


class TransientEmbeddingError(EmbeddingError):
    """A failure worth retrying: 429, 5xx, timeout, connection refused or reset, an answer
    cut off. `retry_after` is the wait the provider asked for, if it said."""

    def __init__(self, message: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class InputRejectedError(EmbeddingError):
    """The provider refused the request's inputs (HTTP 400, 413 or 422): some text in it
    cannot be embedded. The engine splits the request to find the rows responsible, records
    them in the errors table, and writes the others."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
