"""A real local HTTP server speaking OpenAI's `/v1/embeddings` and Ollama's `/api/embed`,
answering a deterministic vector per text, that injects provider faults on demand and
counts every input it receives and every input it answered.

Faults (`Faults`, changeable while it runs with `configure`): a fraction of requests
answered 429 (with `Retry-After` / `retry-after-ms`), 500, a connection reset without an
answer, or a 200 whose body is cut off; latency; a whole-provider status (401, 404) for
every request; HTTP 400 for inputs containing a poisoned marker or longer than the
model's context; and "down" (503, or connection refused: the listener is closed) until a
moment or until `up()`. Successful OpenAI answers carry `usage` and `x-ratelimit-*`
headers (an optional per-window request budget makes them run low, then 429).

Used by the fault tests and by `benchmarks/provider_faults.py`; for trying the pipeline by
hand it also runs on its own:

    .venv/bin/python -m embedding_pipeline.testing.fault_server --port 8089 \\
        --rate-429 0.3 --rate-500 0.1 --poison POISON
    EP_EMBEDDING_PROVIDER=openai OPENAI_BASE_URL=http://127.0.0.1:8089/v1 ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import numpy as np

from embedding_pipeline.testing.vectors import b64, fake_vector

OPENAI_PATH = "/v1/embeddings"
OLLAMA_PATH = "/api/embed"
DownMode = Literal["503", "refuse"]


@dataclass(frozen=True)
class Faults:
    """What the server does wrong. Rates are fractions of requests, drawn in this order:
    429, 500, reset, cut off (their sum at most 1)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_reset: float = 0.0
    rate_cutoff: float = 0.0
    #: `Retry-After` (seconds) on 429s; None: no header.
    retry_after: float | None = None
    #: `retry-after-ms` on 429s (OpenAI sends it); None: no header.
    retry_after_ms: float | None = None
    #: Seconds every request waits before it is answered.
    latency: float = 0.0
    #: Every request answered with this status (401, 404, ...) and `status_message`.
    status: int | None = None
    status_message: str = "injected failure"
    #: Fates of the next requests, in order, before any random draw: "200", "429", "500",
    #: "503", "reset", "cutoff" or another status.
    script: tuple[str, ...] = ()
    #: Inputs containing any of these strings are refused with HTTP 400.
    poison: tuple[str, ...] = ()
    #: Inputs estimated longer than this many tokens (UTF-8 bytes / 4) are refused (400).
    max_input_tokens: int | None = None
    #: A request budget per `window_seconds` reported in `x-ratelimit-*`; past it, 429.
    requests_per_window: int | None = None
    window_seconds: float = 60.0

    def __post_init__(self) -> None:
        total = self.rate_429 + self.rate_500 + self.rate_reset + self.rate_cutoff
        if not 0 <= total <= 1:
            raise ValueError(f"fault rates add up to {total}, not a fraction")


@dataclass
class Counts:
    """What the server saw. `received` counts each input of each request that reached it
    (faulted ones included); `answered` each input of a complete 200 answer."""

    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)

    @property
    def faults(self) -> int:
        """Requests that reached the server and got no complete answer."""
        return self.requests - self.outcomes["200"]

    def sent_more_than_once(self) -> list[str]:
        return sorted(t for t, n in self.received.items() if n > 1)

    def answered_more_than_once(self) -> list[str]:
        return sorted(t for t, n in self.answered.items() if n > 1)

    def copy(self) -> Counts:
        return Counts(
            self.requests, Counter(self.outcomes), Counter(self.received), Counter(self.answered)
        )


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class FaultServer:
    """One server on a loopback port; `start()` / `stop()` or use it as a context manager."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        dimension: int = 384,
        seed: int = 0,
    ) -> None:
        self.faults = faults or Faults()
        self.host = host
        self.port = port
        self.dimension = dimension
        self.counts = Counts()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._down_until = 0.0
        self._down_mode: DownMode = "503"
        self._reopen: threading.Timer | None = None
        self._placeholder: socket.socket | None = None
        self._window_start = time.monotonic()
        self._window_used = 0
        #: Called with the request's number (from 1) before it is answered, in the
        #: request's own thread: a test's way to act at a precise moment of a run.
        self.before_answer: Callable[[int], None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultServer:
        self._listen()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._reopen is not None:
                self._reopen.cancel()
                self._reopen = None
        self._close_listener()
        self._release_port()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    def _listen(self) -> None:
        self._release_port()
        server = _Server(self)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="fault-server", daemon=True)
        thread.start()
        self._httpd, self._thread = server, thread

    def _close_listener(self, *, hold_port: bool = False) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        if hold_port:
            # bound but not listening: connections are refused, and no other server on
            # the machine can take the port and answer in our place meanwhile
            placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            placeholder.bind((self.host, self.port))
            self._placeholder = placeholder

    def _release_port(self) -> None:
        placeholder, self._placeholder = self._placeholder, None
        if placeholder is not None:
            placeholder.close()

    # --- control ---------------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change the faults (fields of `Faults`) while the server runs."""
        with self._lock:
            self.faults = replace(self.faults, **changes)

    def down(self, seconds: float | None = None, *, mode: DownMode = "503") -> None:
        """Be down for `seconds` (None: until `up()`): every request answered 503, or with
        `mode="refuse"` the port closed so that connections are refused."""
        until = float("inf") if seconds is None else time.time() + seconds
        with self._lock:
            self._down_until, self._down_mode = until, mode
        if mode == "refuse":
            self._close_listener(hold_port=True)
            if seconds is not None:
                timer = threading.Timer(seconds, self.up)
                timer.daemon = True
                with self._lock:
                    self._reopen = timer
                timer.start()

    def up(self) -> None:
        """Answer again (re-opening the same port if it was closed)."""
        with self._lock:
            self._down_until = 0.0
            if self._reopen is not None:
                self._reopen.cancel()
                self._reopen = None
        if self._httpd is None:
            self._listen()

    @property
    def is_down(self) -> bool:
        return time.time() < self._down_until

    def reset_counts(self) -> Counts:
        """The counts so far; counting starts again from zero."""
        with self._lock:
            counts, self.counts = self.counts, Counts()
        return counts

    def snapshot(self) -> Counts:
        with self._lock:
            return self.counts.copy()

    # --- answering -------------------------------------------------------------------

    def _decide(self, texts: list[str]) -> tuple[str, Faults, int]:
        """Count the request and pick its fate: a status to answer, or a way to fail;
        with the faults that applied and the request's number."""
        with self._lock:
            faults = self.faults
            self.counts.requests += 1
            self.counts.received.update(texts)
            number = self.counts.requests
            if time.time() < self._down_until:
                return "503", faults, number
            if faults.script:
                self.faults = replace(faults, script=faults.script[1:])
                return faults.script[0], faults, number
            if faults.status is not None:
                return str(faults.status), faults, number
            if faults.requests_per_window is not None:
                now = time.monotonic()
                if now - self._window_start >= faults.window_seconds:
                    self._window_start, self._window_used = now, 0
                if self._window_used >= faults.requests_per_window:
                    return "429-budget", faults, number
                self._window_used += 1
            draw = self._rng.random()
        for fate, rate in (
            ("429", faults.rate_429),
            ("500", faults.rate_500),
            ("reset", faults.rate_reset),
            ("cutoff", faults.rate_cutoff),
        ):
            if draw < rate:
                return fate, faults, number
            draw -= rate
        return "200", faults, number

    def _ratelimit_headers(self, faults: Faults) -> dict[str, str]:
        limit = faults.requests_per_window or 10_000
        with self._lock:
            used = self._window_used if faults.requests_per_window else 0
            left = max(0.0, faults.window_seconds - (time.monotonic() - self._window_start))
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - used)),
            "x-ratelimit-reset-requests": f"{left * 1000:.0f}ms",
            "x-ratelimit-limit-tokens": "10000000",
            "x-ratelimit-remaining-tokens": "9999999",
            "x-ratelimit-reset-tokens": "0s",
        }

    def _note(self, outcome: str, answered: list[str] | None = None) -> None:
        with self._lock:
            self.counts.outcomes[outcome] += 1
            if answered:
                self.counts.answered.update(answered)

    def handle(self, handler: _Handler) -> None:
        openai = handler.path.rstrip("/") == OPENAI_PATH
        if not openai and handler.path.rstrip("/") != OLLAMA_PATH:
            handler.send_json(404, {"error": f"no route {handler.path}"})
            return
        try:
            body = json.loads(handler.rfile.read(int(handler.headers.get("Content-Length", 0))))
            raw = body["input"]
            texts = [raw] if isinstance(raw, str) else [str(t) for t in raw]
        except (ValueError, KeyError, TypeError) as exc:
            handler.send_json(400, _error_body(openai, f"malformed request: {exc}"))
            return
        if self.is_down and self._down_mode == "refuse":
            handler.reset()  # a request on a connection opened before the port was closed
            return
        fate, faults, number = self._decide(texts)
        if self.before_answer is not None:
            self.before_answer(number)
        if faults.latency:
            time.sleep(faults.latency)
        if fate == "reset":
            self._note("reset")
            handler.reset()
            return
        try:
            self._refuse(fate, faults, texts)
        except _Refused as refused:
            self._note(str(refused.status))
            handler.send_json(refused.status, _error_body(openai, str(refused)), refused.headers)
            return
        dim = int(body.get("dimensions") or self.dimension)
        vectors = [fake_vector(t, dim) for t in texts]
        if openai:
            answer, headers = (
                self._openai_answer(body, texts, vectors),
                self._ratelimit_headers(faults),
            )
        else:
            answer, headers = _ollama_answer(body, vectors), {}
        if fate == "cutoff":
            self._note("cutoff")
            handler.send_json(200, answer, headers, cut=True)
            return
        # counted before it is sent, so a client that has read the answer always finds
        # it counted; taken back if the client had gone
        self._note("200", texts)
        if not handler.send_json(200, answer, headers):
            with self._lock:
                self.counts.outcomes["200"] -= 1
                self.counts.outcomes["client gone"] += 1
                self.counts.answered.subtract(texts)
                self.counts.answered += Counter()  # drop the counts that fell to zero
                self.counts.outcomes += Counter()

    def _refuse(self, fate: str, faults: Faults, texts: list[str]) -> None:
        """Raise the error answer `fate` means (nothing for "200" and "cutoff")."""
        if fate == "503":
            raise _Refused(503, "the service is temporarily unavailable")
        if fate in ("429", "429-budget"):
            headers = {}
            if fate == "429-budget":
                headers = self._ratelimit_headers(faults)
            if faults.retry_after is not None:
                headers["Retry-After"] = f"{faults.retry_after:g}"
            if faults.retry_after_ms is not None:
                headers["retry-after-ms"] = f"{faults.retry_after_ms:g}"
            raise _Refused(429, "Rate limit reached for requests", headers)
        if fate == "500":
            raise _Refused(500, "The server had an error while processing your request")
        if fate not in ("200", "cutoff"):
            raise _Refused(int(fate), faults.status_message)
        for i, text in enumerate(texts):
            marker = next((p for p in faults.poison if p in text), None)
            if marker is not None:
                raise _Refused(400, f"input[{i}] is not allowed (contains {marker!r})")
            tokens = -(-len(text.encode("utf-8", "surrogatepass")) // 4)
            if faults.max_input_tokens is not None and tokens > faults.max_input_tokens:
                raise _Refused(
                    400,
                    f"This model's maximum context length is {faults.max_input_tokens} tokens, "
                    f"however input[{i}] has about {tokens} tokens",
                )

    @staticmethod
    def _openai_answer(
        body: dict[str, Any], texts: list[str], vectors: list[np.ndarray]
    ) -> dict[str, Any]:
        base64_encoded = body.get("encoding_format", "float") == "base64"
        tokens = sum(max(1, len(t) // 4) for t in texts)
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": b64(v) if base64_encoded else [float(x) for x in v],
                }
                for i, v in enumerate(vectors)
            ],
            "model": body.get("model", ""),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _ollama_answer(body: dict[str, Any], vectors: list[np.ndarray]) -> dict[str, Any]:
    return {
        "model": body.get("model", ""),
        "embeddings": [[float(x) for x in v] for v in vectors],
        "prompt_eval_count": len(vectors),
    }


def _error_body(openai: bool, message: str) -> dict[str, Any]:
    if openai:
        return {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return {"error": message}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        self.server.owner.handle(self)

    def send_json(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        cut: bool = False,
    ) -> bool:
        """Write the answer (with `cut`, only half of its body, then drop the connection);
        False if the client had gone."""
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if cut else data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        if cut:
            self.reset()
        return True

    def reset(self) -> None:
        """Drop the connection with a TCP reset, answering nothing more."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: FaultServer) -> None:
        self.owner = owner
        super().__init__((owner.host, owner.port), _Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--rate-reset", type=float, default=0.0)
    parser.add_argument("--rate-cutoff", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float)
    parser.add_argument("--retry-after-ms", type=float)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--status", type=int, help="answer every request with this status")
    parser.add_argument("--poison", action="append", default=[], help="refuse inputs with it")
    parser.add_argument("--max-input-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    faults = Faults(
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_reset=args.rate_reset,
        rate_cutoff=args.rate_cutoff,
        retry_after=args.retry_after,
        retry_after_ms=args.retry_after_ms,
        latency=args.latency,
        status=args.status,
        poison=tuple(args.poison),
        max_input_tokens=args.max_input_tokens,
    )
    server = FaultServer(faults, host=args.host, port=args.port, dimension=args.dimension)
    server.start()
    print(f"fault server on {server.url} (OpenAI base URL {server.openai_base_url})", flush=True)
    try:
        while True:
            time.sleep(10)
            c = server.snapshot()
            print(
                f"requests {c.requests}, outcomes {dict(c.outcomes)}, inputs received "
                f"{sum(c.received.values())}, answered {sum(c.answered.values())}, sent more "
                f"than once {len(c.sent_more_than_once())}, answered more than once "
                f"{len(c.answered_more_than_once())}",
                flush=True,
            )
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
