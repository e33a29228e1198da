"""What the benchmark scripts share: the checkout's paths, a throw-away database, the fake
providers and services as processes, timing and percentiles, the load average and
Markdown table rows.

The scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they
`import harness`. Like them it uses the installed package (`embedding_pipeline`, with its
stand-in services in `embedding_pipeline.testing`) and nothing of the tests.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import httpx

from embedding_pipeline.lib.store.pgserver import free_port, temporary_server

if TYPE_CHECKING:
    import dagster as dg

#: The checkout, the virtualenv's scripts and the sample chat.
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE_DIR = ROOT / "embedding_pipeline" / "sample_data"
#: What `embedding-pipeline serve` prints once it listens.
SERVE_READY = "search API ready"
T = TypeVar("T")


# -- the database ----------------------------------------------------------------------------


@contextmanager
def bench_database(
    prefix: str, *, url: str | None = None, name: str = "bench", keep: bool = False
) -> Iterator[str]:
    """`url` when given (an existing database), else database `name` on a throw-away
    embedded PostgreSQL+pgvector server in a temporary folder (removed after, unless
    `keep`: then its URL and folder are printed)."""
    if url is not None:
        yield url
        return
    with temporary_server(prefix, keep=keep) as server:
        if name != "postgres":
            server.ensure_database(name)
        yield server.url(name)
        if keep:
            print(f"server left running: {server.url(name)} (data in {server.data_dir})")


def dagster_instance(home: Path) -> dg.DagsterInstance:
    """A Dagster instance in `home` configured as the project-local one (`make dev`'s)."""
    import dagster as dg  # only the scripts that run Dagster pay for importing it

    from embedding_pipeline.cli import LOCAL_INSTANCE_CONFIG

    (home / "dagster.yaml").write_text(LOCAL_INSTANCE_CONFIG)
    return dg.DagsterInstance.from_config(str(home))


# -- services as processes -------------------------------------------------------------------


def _wait_until(ready: Callable[[], bool], seconds: float, failed: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(failed())
        time.sleep(0.1)


@contextmanager
def fake_openai(dimensions: int, latency: float = 0.0) -> Iterator[str]:
    """`benchmarks/fake_openai.py` in its own process on a free port, as a real provider
    would be; its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fake_openai.py"),
            "--port",
            str(port),
            "--dimensions",
            str(dimensions),
            "--latency",
            str(latency),
        ],
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            httpx.get(base + "/stats", timeout=1)
        except httpx.HTTPError:
            return False
        return True

    try:
        _wait_until(answers, 30, lambda: f"the fake OpenAI server on port {port} did not answer")
        yield base
    finally:
        process.terminate()
        process.wait()


@contextmanager
def serve(env: Mapping[str, str], workdir: Path) -> Iterator[str]:
    """`embedding-pipeline serve` on a free port with `env` (the whole environment); its
    base URL once it printed its ready line (its log in `workdir`)."""
    port = free_port()
    log_path = workdir / f"serve-{port}.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(BIN / "embedding-pipeline"), "serve", "--port", str(port)],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def ready() -> bool:
                if server.poll() is not None:
                    raise RuntimeError(f"serve did not start: {log_path.read_text()}")
                return SERVE_READY in log_path.read_text()

            _wait_until(ready, 60, lambda: f"serve did not start: {log_path.read_text()}")
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


# -- timing ----------------------------------------------------------------------------------


def timed_ms(call: Callable[[], T]) -> tuple[float, T]:
    """Milliseconds `call()` took, and what it returned."""
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000.0, result


def median_ms(call: Callable[[], object], repeat: int) -> float:
    """The median milliseconds of `repeat` calls, after one untimed call."""
    call()
    return statistics.median(timed_ms(call)[0] for _ in range(repeat))


def percentile(
    values: Iterable[float], q: float, method: Literal["linear", "nearest", "lower"] = "linear"
) -> float:
    """The `q` quantile, by numpy's method of that name: `linear` interpolates between the
    closest ranks, `nearest` takes the closest rank, `lower` the one below."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    if method == "nearest":
        return ordered[min(len(ordered) - 1, round(position))]
    low = int(position)
    if method == "lower":
        return ordered[low]
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- reporting -------------------------------------------------------------------------------


def load_average() -> float:
    """The one-minute load average: on a shared machine, part of every figure."""
    return os.getloadavg()[0]


def print_load_at_start() -> None:
    print(f"load average at start: {load_average():.2f} ({os.cpu_count()} cores)")


def table_row(*cells: object) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_rule(align: str) -> str:
    """A Markdown table's rule, a column a letter: `l` left, `r` right (`"lrr"`)."""
    return "|" + "".join("---:|" if a == "r" else "---|" for a in align)
