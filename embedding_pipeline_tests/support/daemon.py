"""The real `dagster-daemon` for tests where automation is the subject: a project-local
instance (the config `embedding-pipeline` writes: its queue looks every second),
a workspace loading this project, and the daemon process in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import dagster as dg
import yaml

from embedding_pipeline.cli import LOCAL_INSTANCE_CONFIG
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline_tests.support.faults import SECRET
from embedding_pipeline_tests.support.paths import ROOT

BIN = Path(sys.executable).parent
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], seconds: float, log: Path) -> T:
    """`probe()` once it is not None, or an error with the end of the daemon's log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}; daemon log ends:\n{tail}")


def instance_home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME with the project-local instance config (its queue looks every second;
    the retry daemon is quickened by `project_env`)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(LOCAL_INSTANCE_CONFIG)
    # create the SQLite storages now: the daemon and the test opening a new instance at
    # the same moment would both try to create them
    dg.DagsterInstance.from_config(str(home)).dispose()
    return home


def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace.yaml"
    module = {"module_name": "embedding_pipeline.definitions", "working_directory": str(ROOT)}
    path.write_text(yaml.safe_dump({"load_from": [{"python_module": module}]}))
    return path


def project_env(
    home: Path, url: str, server: FaultServer, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every Dagster process of the test: its instance, the test
    database, the fault server as OpenAI (384 dimensions)."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DATABASE_URL": url,
        "EP_EMBEDDING_PROVIDER": "openai",
        "EP_EMBEDDING_DIMENSIONS": "384",
        "OPENAI_API_KEY": SECRET,
        "OPENAI_BASE_URL": server.openai_base_url,
        "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }


@contextmanager
def running_daemon(
    workspace_file: Path, env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`dagster-daemon run` in its own process group, stopped (TERM, then KILL) after."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(workspace_file)],
            cwd=log.parent,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
