"""Sensor-to-embedded latency under a real `dagster dev`, on the embedded database.

What an operator does, timed: the embedded database is started (`embedding-pipeline db
start`) in a throwaway folder, the sample chat is ingested and embedded, then `dagster dev`
runs (its own process group, a throwaway DAGSTER_HOME) and, with no other action, each
round ingests a new export plus extraction (`embedding-pipeline ingest`) and waits until
every row is embedded. Reported per round: seconds from the ingest's commit until the
sensor's run was created, until every new row was embedded, and the run's own duration;
plus the sensor-triggered runs the webserver's GraphQL API (what the UI shows) lists.

Run: ``.venv/bin/python benchmarks/sensor_latency.py`` (about three minutes with the
default 30-second sensor interval; ``--interval 5`` for a quicker look).
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
from pathlib import Path

import psycopg

from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID
from embedding_pipeline.lib.quality.status import table_status
from embedding_pipeline.lib.store.pgserver import free_port
from embedding_pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "embedding_pipeline" / "sample_data"
RUNS_QUERY = """
query { runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "extraction_sensor"}]}) {
  ... on Runs { results { runId status tags { key value } } } } }
"""


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "embedding-pipeline"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"embedding-pipeline {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


def null_rows(url: str) -> int:
    """Rows of the three tables still needing the local model's embedding."""
    with psycopg.connect(url) as conn:
        return sum(
            table_status(conn, spec, LOCAL_MODEL_ID).needs_embedding
            for spec in Settings().tables.values()
        )


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


def edited_export(base: Path, round_number: int, folder: Path) -> Path:
    """The update export with one more message and one edited message per round."""
    data = json.loads((SAMPLE / "update_result.json").read_text())
    messages = [m for m in data["messages"] if m.get("type") == "message" and m.get("text")]
    last = messages[-1]
    new = {
        **last,
        "id": 900_000 + round_number,
        "text": f"Round {round_number}: a new note.",
        "text_entities": [],
        "date_unixtime": str(int(last["date_unixtime"]) + 60),
    }
    new.pop("date", None)
    new.pop("edited", None)
    new.pop("edited_unixtime", None)
    edited = messages[round_number % len(messages)]
    edited["text"] = (
        f"{edited['text'] if isinstance(edited['text'], str) else ''} (v{round_number})"
    )
    edited["text_entities"] = []
    data["messages"].append(new)
    path = folder / f"round_{round_number}.json"
    path.write_text(json.dumps(data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=int, default=30, help="EP_SENSOR_INTERVAL_SECONDS")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ep-latency-"))
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    pg_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "EP_PGDATA": str(work / "pg"),
        "EP_PG_PORT": str(pg_port),
        "DAGSTER_HOME": str(home),
        "EP_SENSOR_INTERVAL_SECONDS": str(args.interval),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("DATABASE_URL", None)
    url = f"postgresql://postgres@127.0.0.1:{pg_port}/embedding_pipeline"
    cli(env, "db", "start")
    dev = None
    try:
        cli(
            env,
            "ingest",
            str(SAMPLE / "result.json"),
            "--extraction",
            str(SAMPLE / "extraction.json"),
        )
        cli(env, "materialize")
        assert null_rows(url) == 0
        log = (work / "dagster_dev.log").open("w")
        dev = subprocess.Popen(
            [
                str(BIN / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(ui_port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_webserver(ui_port, time.monotonic() + 180)
        time.sleep(args.interval + 5)
        print(f"dagster dev up (sensor interval {args.interval}s); logs in {work}")
        print(
            f"{'round':>5} {'rows':>5} {'to run created':>15} {'to embedded':>12} "
            f"{'run duration':>13}"
        )
        totals = []
        for number in range(1, args.rounds + 1):
            if number == 1:
                export, extraction = (
                    SAMPLE / "update_result.json",
                    SAMPLE / "update_extraction.json",
                )
                extra = ["--extraction", str(extraction)]
            else:
                export, extra = edited_export(SAMPLE, number, work), []
            started = time.time()
            cli(env, "ingest", str(export), *extra)
            committed = time.time()
            pending = null_rows(url)
            while null_rows(url) > 0:
                if time.time() - committed > 4 * args.interval + 300:
                    raise RuntimeError("rows were not embedded in time")
                time.sleep(0.2)
            embedded = time.time()
            runs = _runs_since(home, committed)
            created = min(r["created"] for r in runs) - committed if runs else float("nan")
            duration = max(r["duration"] for r in runs) if runs else float("nan")
            totals.append(embedded - committed)
            print(
                f"{number:>5} {pending:>5} {created:>14.1f}s {embedded - committed:>11.1f}s "
                f"{duration:>12.1f}s   (ingest took {committed - started:.1f}s, "
                f"{len(runs)} run(s))"
            )
            time.sleep(2)
        listed = graphql(ui_port, RUNS_QUERY)["data"]["runsOrError"]["results"]
        print(
            f"sensor-to-embedded: median {statistics.median(totals):.1f}s, max "
            f"{max(totals):.1f}s; the UI lists {len(listed)} sensor-triggered runs, "
            f"statuses {sorted({r['status'] for r in listed})}"
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


def _runs_since(home: Path, since: float) -> list[dict[str, float]]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(
            filters=dg.RunsFilter(tags={"dagster/sensor_name": "extraction_sensor"})
        )
        out = []
        for record in records:
            created = record.create_timestamp.timestamp()
            if created < since - 1:
                continue
            end = record.end_time or time.time()
            out.append({"created": created, "duration": end - (record.start_time or created)})
        return out


if __name__ == "__main__":
    sys.exit(main())
