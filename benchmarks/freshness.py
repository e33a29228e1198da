"""Freshness: how soon a new or changed row is searchable, with `dagster dev` at its defaults.

What an operator does, timed: the embedded database is started (`embedding-pipeline db
start`) in a throwaway folder, the sample chat is ingested and embedded, then
`embedding-pipeline dev` (what `make dev` runs: `dagster dev` on the project's instance)
runs in its own process group with a throwaway DAGSTER_HOME holding the config `make dev`
uses and, with no other action:

1. the sample update is ingested (`embedding-pipeline ingest update_result.json
   --extraction update_extraction.json`: new messages, an edited one, a new topic, new and
   changed atoms: three tables, so three runs): the README's "ingest the sample update";
2. then `--rounds` small ingests, alternating the two ways rows arrive:
   - `ingest`: `embedding-pipeline ingest` of an export with one new and one edited
     message (an extraction: the extraction sensor's path);
   - `insert`: the application's own `INSERT` of one message in SQL, no extraction (the
     backlog sensor's path).

A row's time to searchable is measured on the database's clock, from the moment its
transaction wrote it (`embedding_pending_since`, set by the tracking trigger) to the
moment its vector was written (`embedded_at`, in the transaction that also puts it in the
HNSW index); a round's is its slowest row's. After each round the search API (vector
mode) is asked for the new message's text and must return it first. Reported: what
the idle `dagster dev` and PostgreSQL cost at these intervals (share of one core over
`--idle-seconds` before the rounds), each round, p50 and p95 over the small rounds (by
path too), the runs the sensors launched (from the webserver's GraphQL API: what the UI
lists), and the load average.

Run: ``.venv/bin/python benchmarks/freshness.py`` (about three minutes; ``--interval`` and
``--backlog-interval`` override the sensors' defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import harness
import psycopg

from embedding_pipeline.cli import write_local_instance_config
from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID
from embedding_pipeline.lib.quality.status import table_status
from embedding_pipeline.lib.store.pgserver import free_port
from embedding_pipeline.settings import Settings

SENSORS = ("extraction_sensor", "backlog_sensor")
RUNS_QUERY = """
query { runsOrError { ... on Runs { results { runId status tags { key value } } } } }
"""


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(harness.BIN / "embedding-pipeline"), *args],
        env=env,
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"embedding-pipeline {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def pending_rows(url: str) -> int:
    """Rows of the three tables still needing the local model's embedding."""
    with psycopg.connect(url) as conn:
        return sum(
            table_status(conn, spec, LOCAL_MODEL_ID).needs_embedding
            for spec in Settings().tables.values()
        )


def database_now(url: str) -> datetime:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        return row[0]


def written_since(url: str, since: datetime) -> list[tuple[datetime, datetime | None]]:
    """(written, embedded) of every row of the three tables written since `since`."""
    out = []
    with psycopg.connect(url) as conn:
        for spec in Settings().tables.values():
            out += conn.execute(
                f"SELECT {spec.pending_since_column}, {spec.embedded_at_column} "  # noqa: S608
                f"FROM {spec.table} WHERE {spec.pending_since_column} >= %s",
                (since,),
            ).fetchall()
    return out


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for_webserver(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("dagster dev did not come up")


def small_export(round_number: int, folder: Path) -> tuple[Path, str]:
    """The update export with one more message and one edited message; its new text."""
    data = json.loads((harness.SAMPLE_DIR / "update_result.json").read_text())
    messages = [m for m in data["messages"] if m.get("type") == "message" and m.get("text")]
    last = messages[-1]
    text = f"Round {round_number}: the staging certificate renews on Thursday."
    new = {
        **last,
        "id": 900_000 + round_number,
        "text": text,
        "text_entities": [],
        "date_unixtime": str(int(last["date_unixtime"]) + 60),
    }
    for key in ("date", "edited", "edited_unixtime"):
        new.pop(key, None)
    edited = messages[round_number % len(messages)]
    edited["text"] = (
        f"{edited['text'] if isinstance(edited['text'], str) else ''} (v{round_number})"
    )
    edited["text_entities"] = []
    data["messages"].append(new)
    path = folder / f"round_{round_number}.json"
    path.write_text(json.dumps(data))
    return path, text


def application_insert(url: str, round_number: int) -> str:
    """One message as the application writes it: an INSERT, no extraction."""
    text = f"Round {round_number}: the billing export moves to the new bucket tonight."
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO messages (chat_id, telegram_message_id, author, author_id, sent_at, "
            "content) SELECT chat_id, %s, author, author_id, max(sent_at) + interval '1 minute', "
            "%s FROM messages GROUP BY chat_id, author, author_id ORDER BY max(sent_at) DESC "
            "LIMIT 1",
            (800_000 + round_number, text),
        )
    return text


def found_first(url: str, text: str) -> bool:
    """The search API, vector mode, finds the message with `text` first."""
    from embedding_pipeline.search import Searcher, engine_for

    settings = Settings(database_url=url)
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            hits = Searcher(settings).search(conn, text, k=3)
    finally:
        engine.dispose()
    return bool(hits) and hits[0].text.startswith(text)


def _cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of `pids` so far (processes gone meanwhile count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _process_tree(roots: set[int]) -> set[int]:
    """`roots` and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def idle_cpu_share(roots: set[int], seconds: float) -> float:
    """The share of one core the process trees of `roots` used over `seconds` of doing
    nothing but their own ticks."""
    pids = _process_tree(roots)
    before = _cpu_seconds(pids)
    time.sleep(seconds)
    return (_cpu_seconds(pids) - before) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="small ingests after the update")
    parser.add_argument("--interval", type=int, help="EP_SENSOR_INTERVAL_SECONDS (default: its)")
    parser.add_argument(
        "--backlog-interval", type=int, help="EP_BACKLOG_SENSOR_INTERVAL_SECONDS (default: its)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds a round may take")
    parser.add_argument(
        "--idle-seconds", type=float, default=60, help="CPU of the idle daemon measured this long"
    )
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ep-freshness-"))
    home = work / "dagster_home"
    home.mkdir()
    write_local_instance_config(home / "dagster.yaml")  # what `make dev` runs with
    pg_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "EP_PGDATA": str(work / "pg"),
        "EP_PG_PORT": str(pg_port),
        "DAGSTER_HOME": str(home),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for variable in (
        "DATABASE_URL",
        "EP_SENSOR_INTERVAL_SECONDS",
        "EP_BACKLOG_SENSOR_INTERVAL_SECONDS",
    ):
        env.pop(variable, None)
    if args.interval:
        env["EP_SENSOR_INTERVAL_SECONDS"] = str(args.interval)
    if args.backlog_interval:
        env["EP_BACKLOG_SENSOR_INTERVAL_SECONDS"] = str(args.backlog_interval)
    defaults = Settings().sensor
    url = f"postgresql://postgres@127.0.0.1:{pg_port}/embedding_pipeline"
    cli(env, "db", "start")
    dev = None
    try:
        cli(
            env,
            "ingest",
            str(harness.SAMPLE_DIR / "result.json"),
            "--extraction",
            str(harness.SAMPLE_DIR / "extraction.json"),
        )
        cli(env, "materialize")
        assert pending_rows(url) == 0
        log = (work / "dagster_dev.log").open("w")
        dev = subprocess.Popen(  # what `make dev` runs
            [str(harness.BIN / "embedding-pipeline"), "dev", "--port", str(ui_port)],
            cwd=harness.ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_webserver(ui_port, time.monotonic() + 180)
        time.sleep(20)  # the sensors' first ticks (the extraction sensor's sets its cursor)
        intervals = (
            args.interval or defaults.interval_seconds,
            args.backlog_interval or defaults.backlog_interval_seconds,
        )
        print(
            f"dagster dev up (extraction sensor every {intervals[0]} s, backlog sensor every "
            f"{intervals[1]} s); logs in {work}"
        )
        if args.idle_seconds:
            postmaster = int((work / "pg" / "data" / "postmaster.pid").read_text().split()[0])
            share = idle_cpu_share({dev.pid, postmaster}, args.idle_seconds)
            print(
                f"idle for {args.idle_seconds:g} s: dagster dev (webserver, daemon, code "
                f"server) and PostgreSQL used {100 * share:.1f}% of one core"
            )
        print(f"{'round':>5} {'path':>7} {'rows':>5} {'to searchable':>14}  search finds it")
        rounds: list[tuple[str, float]] = []
        for number in range(0, args.rounds + 1):
            before = database_now(url)
            if number == 0:
                kind, text = "update", ""
                cli(
                    env,
                    "ingest",
                    str(harness.SAMPLE_DIR / "update_result.json"),
                    "--extraction",
                    str(harness.SAMPLE_DIR / "update_extraction.json"),
                )
            elif number % 2:
                kind = "ingest"
                export, text = small_export(number, work)
                cli(env, "ingest", str(export))
            else:
                kind, text = "insert", application_insert(url, number)
            deadline = time.monotonic() + args.timeout
            while True:
                rows = written_since(url, before)
                done = rows and all(e is not None and e >= w for w, e in rows)
                if done and pending_rows(url) == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"round {number}: rows were not embedded in time")
                time.sleep(0.2)
            embedded = [e for _, e in rows if e is not None]
            latency = (max(embedded) - min(w for w, _ in rows)).total_seconds()
            found = found_first(url, text) if text else None
            rounds.append((kind, latency))
            print(
                f"{number:>5} {kind:>7} {len(rows):>5} {latency:>13.1f}s  "
                + ("-" if found is None else "yes" if found else "NO")
            )
            if found is False:
                raise RuntimeError(f"round {number}: search did not return the new message")
            time.sleep(1)
        listed = graphql(ui_port, RUNS_QUERY)["data"]["runsOrError"]["results"]
        by_sensor = {
            name: [r for r in listed if {"key": "dagster/sensor_name", "value": name} in r["tags"]]
            for name in SENSORS
        }
        small = [seconds for kind, seconds in rounds[1:]]
        load_end = os.getloadavg()
        print()
        print(f"the sample update: all its rows searchable after {rounds[0][1]:.1f} s")
        if small:
            print(
                f"small ingests ({len(small)}): p50 {statistics.median(small):.1f} s, "
                f"p95 {harness.percentile(small, 0.95):.1f} s, max {max(small):.1f} s"
            )
        for kind in ("ingest", "insert"):
            values = [seconds for k, seconds in rounds[1:] if k == kind]
            if values:
                print(
                    f"  {kind:>6} ({len(values)}): p50 {statistics.median(values):.1f} s, "
                    f"max {max(values):.1f} s"
                )
        print(
            "runs the UI lists: "
            + ", ".join(
                f"{name} {len(runs)} ({sorted({r['status'] for r in runs})})"
                for name, runs in by_sensor.items()
            )
        )
        print(
            f"load average (1, 5, 15 min) at start {load_start[0]:.2f} {load_start[1]:.2f} "
            f"{load_start[2]:.2f}, at end {load_end[0]:.2f} {load_end[1]:.2f} "
            f"{load_end[2]:.2f}; {os.cpu_count()} cores"
        )
    finally:
        if dev is not None:
            os.killpg(dev.pid, signal.SIGTERM)
            try:
                dev.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
        cli(env, "db", "stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
