"""Peak memory and id sequences of `embedding-pipeline ingest` on a large Telegram export.

A Telegram Desktop export of about ``--megabytes`` MB is generated (the sample chat's
shape: one-space indentation, `text_entities` beside every text, a fifth of the texts as
entity lists, a fifth in Cyrillic, replies, edits and a few service messages), then
ingested twice by the real command in a subprocess against a throwaway embedded server:

- ``first``: a new chat, every message created;
- ``again``: the identical file, nothing changes.

For each it prints the wall time, the peak resident memory of the command (``ru_maxrss``
of the process, from ``wait4``) and how many ids the ``messages`` and ``extractions``
sequences drew. ``floor`` is the same command on a 30-message export: what the process
costs before the file's size counts.

Run: ``.venv/bin/python benchmarks/ingest_memory.py --megabytes 200`` (the export is
written to a temporary folder and removed; ``--keep`` keeps it). ``--cli
OTHER/.venv/bin/embedding-pipeline`` measures another checkout's command on the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import psycopg

from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.store.pgserver import temporary_server

CLI = harness.BIN / "embedding-pipeline"
#: Sentences of the sample chat, and words to make a fifth of the messages Cyrillic.
SENTENCES = [
    sentence
    for message in load_export(harness.SAMPLE_DIR / "result.json").messages
    for sentence in re.split(r"(?<=[.!?]) ", message.text)
]
CYRILLIC = ["деплой", "откат", "очередь", "бэкап", "диск", "индекс", "поиск", "релиз"]
AUTHORS = [("Priya Raman", "user602947118"), ("Oleg Kuznetsov", "user118274650")] + [
    (f"Member {i}", f"user{700000000 + i}") for i in range(10)
]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.2:
        words = (rng.choice(CYRILLIC) for _ in range(rng.randint(6, 60)))
        return " ".join(words).capitalize() + "."
    return " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))


def _message(rng: random.Random, message_id: int, at: int) -> dict[str, object]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))
    if rng.random() < 0.02:
        return {
            "id": message_id,
            "type": "service",
            "date": stamp,
            "date_unixtime": str(at),
            "actor": AUTHORS[0][0],
            "actor_id": AUTHORS[0][1],
            "action": "pin_message",
            "message_id": message_id - 1,
            "text": "",
            "text_entities": [],
        }
    author, author_id = rng.choice(AUTHORS)
    text = _text(rng)
    message: dict[str, object] = {
        "id": message_id,
        "type": "message",
        "date": stamp,
        "date_unixtime": str(at),
        "from": author,
        "from_id": author_id,
    }
    if rng.random() < 0.05:
        edited = at + rng.randint(60, 3600)
        message["edited"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(edited))
        message["edited_unixtime"] = str(edited)
    if message_id > 1 and rng.random() < 0.3:
        message["reply_to_message_id"] = rng.randint(max(1, message_id - 50), message_id - 1)
    if rng.random() < 0.2:
        cut = len(text) // 2
        entities: list[object] = [text[:cut], {"type": "bold", "text": text[cut:]}]
        message["text"] = entities
        message["text_entities"] = [
            {"type": "plain", "text": text[:cut]},
            {"type": "bold", "text": text[cut:]},
        ]
    else:
        message["text"] = text
        message["text_entities"] = [{"type": "plain", "text": text}]
    return message


def write_export(path: Path, megabytes: float, seed: int = 7) -> int:
    """A Telegram Desktop export of about `megabytes` MB at `path`; returns its messages."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    at = 1_735_689_600  # 2025-01-01
    count = 0
    with path.open("w", encoding="utf-8") as out:
        out.write('{\n "name": "Benchmark Chat",\n "type": "private_supergroup",\n')
        out.write(' "id": 4242424242,\n "messages": [\n')
        while out.tell() < target or count == 0:
            if count:
                out.write(",\n")
            at += rng.randint(5, 900)
            count += 1
            item = json.dumps(_message(rng, count, at), ensure_ascii=False, indent=1)
            out.write("  " + item.replace("\n", "\n  "))
        out.write("\n ]\n}\n")
    return count


@dataclass
class Measure:
    seconds: float
    peak_mb: float
    message_ids: int
    extraction_ids: int
    output: str


def _sequences(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT sequencename, coalesce(last_value, 0) FROM pg_sequences "
            "WHERE sequencename IN ('messages_id_seq', 'extractions_id_seq')"
        ).fetchall()
    return {str(name): int(value) for name, value in rows}


def ingest(cli: Path, url: str, export: Path, home: Path) -> Measure:
    """`embedding-pipeline ingest EXPORT` in a subprocess: its time, peak RSS and ids."""
    before = _sequences(url) if _has_tables(url) else {}
    env = {**os.environ, "DATABASE_URL": url, "DAGSTER_HOME": str(home)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(cli), "ingest", str(export)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}): {output}")
    after = _sequences(url)
    return Measure(
        seconds=seconds,
        peak_mb=usage.ru_maxrss / 1024,  # kilobytes on Linux
        message_ids=after["messages_id_seq"] - before.get("messages_id_seq", 0),
        extraction_ids=after["extractions_id_seq"] - before.get("extractions_id_seq", 0),
        output=output.strip(),
    )


def _has_tables(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass('messages') IS NOT NULL").fetchone() == (True,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=200, help="export size (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the generated export")
    parser.add_argument(
        "--cli",
        type=Path,
        default=CLI,
        help="the embedding-pipeline command to measure (another checkout's, to compare)",
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ep-bench-ingest-"))
    try:
        big, small = work / "result.json", work / "small.json"
        messages = write_export(big, args.megabytes)
        write_export(small, 0.01, seed=8)
        size_mb = big.stat().st_size / 1_000_000
        print(f"export: {big} ({size_mb:.0f} MB, {messages} messages)")
        with temporary_server("ep-bench-ingest-pg-") as server:
            server.ensure_database("floor")
            server.ensure_database("bench")
            floor = ingest(args.cli, server.url("floor"), small, work / "home")
            first = ingest(args.cli, server.url("bench"), big, work / "home")
            again = ingest(args.cli, server.url("bench"), big, work / "home")
        print(
            f"{'run':<6} {'seconds':>8} {'peak RSS MB':>12} {'message ids':>12} {'extr. ids':>10}"
        )
        for name, m in (("floor", floor), ("first", first), ("again", again)):
            print(
                f"{name:<6} {m.seconds:>8.1f} {m.peak_mb:>12.0f} {m.message_ids:>12} "
                f"{m.extraction_ids:>10}"
            )
        print(f"peak RSS / file size: {first.peak_mb / size_mb:.2f} (first ingest)")
        for name, m in (("first", first), ("again", again)):
            said = [line for line in m.output.splitlines() if not line.startswith("schema")]
            print(f"\n{name} ingest said:\n" + "\n".join(said))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
