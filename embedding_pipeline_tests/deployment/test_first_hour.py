"""A newcomer's first hour, as the README has them do it: the help, `db psql` without a
PostgreSQL client, the README's serve example pasted as it stands, a second `make demo`
after an ingest, `make dev` stopped by SIGTERM when a script started it, and output cut
short by `| head`. Real processes, the real database and the real model throughout."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from embedding_pipeline import cli
from embedding_pipeline.cli import bench, runs
from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID
from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import free_port
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.paths import ROOT, SAMPLE
from embedding_pipeline_tests.support.search import sample_settings, serve_env

VENV_BIN = Path(sys.executable).parent
CLI = VENV_BIN / "embedding-pipeline"


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _all_commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for group in _subparsers(parser):
        for name, child in group.choices.items():
            found += _all_commands(child, f"{prefix} {name}".strip())
    return found


def test_every_command_and_option_is_described_with_its_default() -> None:
    parser = cli.build_parser()
    commands = _all_commands(parser)
    assert {"db start", "db stop", "db status", "db url", "db psql", "dev"} <= {
        name for name, _ in commands
    }
    for name, command in commands:
        for group in _subparsers(command):
            described = {a.dest for a in group._choices_actions if a.help}
            assert described == set(group.choices), f"{name}: undescribed {group.choices}"
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, f"`{name}` {action.option_strings or action.dest} has no help"
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = f"(default: {action.default})"
                assert shown in " ".join(text.split()), f"`{name} --help` lacks {shown}"


def test_help_describes_the_server_actions_and_the_repeatable_table_option() -> None:
    def helped(*args: str) -> str:
        result = subprocess.run(
            [str(CLI), *args, "--help"], capture_output=True, text=True, timeout=60, check=True
        )
        return " ".join(result.stdout.split())

    db_help = helped("db")
    for action in ("start", "stop", "status", "url", "psql"):
        assert re.search(rf"\b{action} [a-z(]", db_help), f"db {action} is not described"
    search = helped("search")
    assert "results per table (1 to 100) (default: 5)" in search
    assert "repeat it for several (default: every table)" in search
    assert "--port PORT port to listen on (default: 8000)" in helped("serve")


@pytest.mark.parametrize("command", [["status"], ["backlog", "--all"], ["--help"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(small_data: Settings, command):
    """`embedding-pipeline status | head -1`: the reader closes the pipe before the command
    writes (here: before it starts); no traceback, the exit code SIGPIPE would give."""
    env = {**os.environ, "DATABASE_URL": small_data.effective_database_url}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [str(CLI), *command],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == (0 if command == ["--help"] else 128 + signal.SIGPIPE)


def test_db_psql_runs_the_servers_psql_without_the_password_on_its_command_line(
    small_data: Settings,
) -> None:
    """With DATABASE_URL carrying a password: psql gets it from PGPASSWORD, and `ps` (the
    process's command line) never shows it."""
    url = small_data.effective_database_url.replace("postgres@", "postgres:s3cr3t-pw@")
    result = subprocess.run(
        [
            str(CLI),
            "db",
            "psql",
            "-tA",
            "-c",
            "SELECT count(*) FROM messages",
            "-c",
            r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo; echo $PGPASSWORD",
        ],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    count, command_line, password = result.stdout.splitlines()
    assert count == "4"
    assert command_line.split()[0].endswith("/bin/psql") and "dbname=" in command_line
    assert "s3cr3t" not in command_line
    assert password == "s3cr3t-pw"


def test_the_backlog_prints_dagster_asset_materialize_where_dg_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime-only install has no `dg` (it comes with the dev extra)."""
    monkeypatch.setenv("DAGSTER_HOME", "/srv/dagster home")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert runs.backfill_command("message_embeddings", "2025-01-01", "2025-03-01") == (
        f"DAGSTER_HOME='/srv/dagster home' {tmp_path}/dagster asset materialize -m "
        "embedding_pipeline.definitions --select message_embeddings --partition-range "
        "2025-01-01...2025-03-01"
    )
    (tmp_path / "dg").touch()
    assert runs.backfill_command("atom_embeddings", "2025-01-01", "2025-03-01") == (
        f"DAGSTER_HOME='/srv/dagster home' {tmp_path}/dg launch --assets atom_embeddings "
        "--partition-range 2025-01-01...2025-03-01"
    )


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_bench_lists_the_benchmarks_and_refuses_an_unknown_name() -> None:
    listed = _bench()
    assert listed.returncode == 0, listed.stderr
    lines = dict(line.split(maxsplit=1) for line in listed.stdout.splitlines())
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "harness")
    assert sorted(lines) == scripts
    assert lines["throughput"] == (
        "Throughput, side by side in one run: the pipeline against the provider called directly."
    )
    # the benchmarks bring their own databases and providers: a setting the pipeline
    # refuses (here an unknown provider) does not stop the listing
    refused = {"EP_EMBEDDING_PROVIDER": "no-such-provider"}
    assert _bench(env=refused).stdout == listed.stdout

    unknown = _bench("no_such_benchmark")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("error: no benchmark 'no_such_benchmark'; one of ")
    assert all(name in unknown.stderr for name in scripts)


def test_bench_runs_a_benchmark_with_its_arguments_and_returns_its_exit_code() -> None:
    run = _bench("ingest_memory", "--megabytes", "0.05")
    assert run.returncode == 0, run.stderr
    # the command's rows: the floor, the first ingest and the same file again
    rows = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
    assert {"floor", "first", "again"} <= rows, run.stdout

    usage = _bench("halfvec", "--help")
    assert usage.returncode == 0
    assert usage.stdout.startswith("usage: halfvec.py")
    refused = _bench("halfvec", "--rows", "many")
    assert refused.returncode == 2
    assert "--rows: invalid int value: 'many'" in refused.stderr


def test_bench_outside_a_checkout_says_there_are_no_benchmarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(bench, "BENCHMARKS_DIR", tmp_path / "site-packages" / "benchmarks")
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: no benchmarks folder at {tmp_path}/site-packages/benchmarks")


def _contents(conn: psycopg.Connection) -> dict[int, str]:
    rows = conn.execute("SELECT telegram_message_id, content FROM messages").fetchall()
    return {int(telegram_id): str(content) for telegram_id, content in rows}


def test_a_second_demo_keeps_what_was_ingested_since(
    fresh_database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's sample, then the update (3 edited messages, 25 new): the demo run again
    says it leaves the data alone, and every message keeps its updated text."""
    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, LOCAL_MODEL_ID)
    with db.connection(fresh_database_url) as conn:
        for export, extraction in (
            ("result.json", "extraction.json"),
            ("update_result.json", "update_extraction.json"),
        ):
            ingest(
                conn, settings, load_export(SAMPLE / export), load_extraction(SAMPLE / extraction)
            )
        before = _contents(conn)
        extractions = conn.execute("SELECT count(*) FROM extractions").fetchone()
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    capsys.readouterr()
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"the sample chat is already loaded ({len(before)} messages): not loading it again" in (
        out
    )
    assert "embedding-pipeline ingest " in out and "demo finished in" in out
    with db.connection(fresh_database_url) as conn:
        assert _contents(conn) == before
        assert conn.execute("SELECT count(*) FROM extractions").fetchone() == extractions
        assert conn.execute("SELECT count(*) FROM messages WHERE embedding IS NULL").fetchone() == (
            0,
        )


def _readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n", text.index(after)) + len("```bash\n")
    return text[start : text.index("```", start)]


def test_the_readme_commands_after_the_demo_work_as_pasted(pg_server, tmp_path: Path) -> None:
    """The README's block after `make demo`, run by bash as written (`make dev` left out;
    the port moved off 8000 and `.venv/bin` made absolute, the folder being another)."""
    port = free_port()
    block = _readme_block("Afterwards:")
    pasted = [line for line in block.splitlines() if not line.startswith("make dev")]
    assert len(pasted) >= 7, block
    script = (
        "\n".join(pasted)
        .replace(".venv/bin/", f"{VENV_BIN}/")
        .replace(" serve ", f" serve --port {port} ")
        .replace("localhost:8000", f"localhost:{port}")
    )
    settings = sample_settings(pg_server)
    env = serve_env({"DATABASE_URL": settings.effective_database_url}, tmp_path)
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    log = (tmp_path / "serve.log").read_text()
    assert result.returncode == 0, result.stderr + log
    assert "search API ready on" in log
    lines = result.stdout.splitlines()
    assert lines[:3] == [" count ", "-------", "     0"], result.stdout
    hits = json.loads(next(line for line in lines if line.startswith("{")))
    assert len(hits["results"]) == 3, hits
    assert any(line.startswith("# HELP ") for line in lines)
    deadline = time.monotonic() + 20
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening(port), "the README's `kill %1` left the search API running"


def _listening(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


def _ignored_signals(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_dev_stops_on_sigterm_when_a_script_started_it(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """`make dev &` in a script (no job control): the job starts with SIGINT ignored, which
    `dagster dev` would carry over to SIGTERM. SIGTERM to make must stop make, `dagster dev`,
    its webserver and daemon within seconds."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database_url,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    log_path = tmp_path / "make-dev.log"
    with log_path.open("w") as log:
        # -o: the venv counts as installed (make test installed it); the recipe is make's own
        make = subprocess.Popen(
            ["make", "-C", str(ROOT), "-o", ".venv/.installed", "dev", f"DEV_PORT={port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        assert _ignored_signals(make.pid) & (1 << (signal.SIGINT - 1)), "SIGINT not ignored"
        deadline = time.monotonic() + 180
        while not _server_info(port):
            assert make.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not answer within 180 s"
            time.sleep(0.5)
        started = time.monotonic()
        make.send_signal(signal.SIGTERM)
        make.wait(timeout=30)
        while _session_alive(make.pid) and time.monotonic() - started < 30:
            time.sleep(0.2)
        stopped = time.monotonic() - started
        assert not _session_alive(make.pid), "a process of `make dev` outlived it"
        assert stopped < 30
        assert "Shutting down Dagster services" in log_path.read_text()
    finally:
        if _session_alive(make.pid):
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=10)


def _server_info(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
