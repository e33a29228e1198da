"""Shared by the search tests: the sample chat embedded with the local model once per test
session (read-only for the tests that use it), and `embedding-pipeline serve` as a real
process on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LocalEmbedder
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, free_port
from embedding_pipeline.search.evaluation import load_sample
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.database import create_database

VENV_BIN = Path(sys.executable).parent
_SAMPLES: dict[str, Settings] = {}
#: Settings the serve processes must not inherit from the developer's shell.
_CLEARED = ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_HOST")


def sample_settings(server: EmbeddedPostgres) -> Settings:
    """The database `search_sample` holding the sample chat, every row embedded (built on
    first use in the session)."""
    key = server.url()
    if key not in _SAMPLES:
        settings = Settings(database_url=create_database(server, "search_sample"))
        load_sample(settings, LocalEmbedder(), dimension=LOCAL_DIMENSION)
        _SAMPLES[key] = settings
    return _SAMPLES[key]


@contextmanager
def serve(env: Mapping[str, str], workdir: Path, *args: str) -> Iterator[tuple[str, Path]]:
    """`embedding-pipeline serve` on a free port with `env` added (and `args`); yields its
    base URL and its log file (stdout and stderr) once it printed its ready line."""
    port = free_port()
    log_path = workdir / f"serve-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "embedding-pipeline"), "serve", "--port", str(port), *args],
            env=serve_env(env, workdir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while READY not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "serve printed no ready line within 60 s"
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}", log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


#: What `serve` prints once it listens.
READY = "search API ready on http://"


def serve_env(env: Mapping[str, str], workdir: Path) -> dict[str, str]:
    """The test process's environment without the pipeline's settings, plus `env`."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in _CLEARED and not k.startswith("EP_")
    }
    full_env.update(DAGSTER_HOME=str(workdir / "dagster_home"), **env)
    return full_env
