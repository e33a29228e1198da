"""Throughput, side by side in one run: the pipeline against the provider called directly.

Every case runs on a throw-away PostgreSQL+pgvector (the project's embedded server, in a
temporary folder, on a free port) and on the same texts: the sample chat's messages in
their order, repeated up to `--rows`, each pass marked with its number. Providers:

- **openai, instant**: `benchmarks/fake_openai.py` in its own process, answering at once
  with a distinct vector per distinct text (derived from its hash);
- **openai, 200 ms**: the same server sleeping 200 ms per request;
- **local**: all-MiniLM-L6-v2 (int8 ONNX) in this process.

Cases (one line each in the table, or more):

1. `fixed`: the fixed cost of a run on the demo database (the sample chat, the local
   model): `embedding-pipeline materialize --table messages` with nothing to do, and after
   three messages of one month were edited, each against the start of a process that
   imports what `materialize` imports (the definitions are built at import), interleaved,
   medians of `--fixed-rounds`; with `--baseline SRC` the code of another commit
   (`git archive <commit> | tar -x -C SRC`) in the same rounds, on the same database.
2. `openai`: the provider alone (`raw`: the `openai` SDK, batches of the pipeline's size,
   as many in flight as the pipeline, nothing written); the pipeline's embed-and-write
   (`sync_embeddings` as a run calls it: claims, requests in flight, writes; with two and
   with one write connection), the HNSW index build after the load against one plain
   `CREATE INDEX` on the final data; `embedding-pipeline materialize --table messages` as
   a new process over the `--rows` rows, split into process start, the run's fixed cost
   (Dagster and the checks), embed+write and index build; the same
   `materialize` again with nothing to do.
3. `latency`: the pipeline against a provider answering in 200 ms, 1, 4 and 8 requests
   in flight; `local`: the local model raw and through the pipeline.
4. `first-run`: the pipeline right after 20,000 rows arrive by COPY (no ANALYZE yet),
   against the same after `ANALYZE`.
5. `noop`: `materialize --table messages` with nothing to do over 100,000 up-to-date rows
   of distinct vectors, against process start, and the provider requests it made (0).
6. `write`: writing precomputed vectors through the pipeline's path (claims, COPY, one
   UPDATE by primary key) against a loop of single-row UPDATEs committed every 64 rows,
   at 5,000 and 20,000 rows (index builds not counted).
7. `rss`: peak RSS of a process running the pipeline over 20,000 and 100,000 rows.

    .venv/bin/python benchmarks/throughput.py                     # everything, ~20 min
    .venv/bin/python benchmarks/throughput.py --cases fixed,openai --dimensions 384
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import harness
import httpx
import numpy as np
import psycopg
from psycopg import sql

from embedding_pipeline.lib.embedders import Embedder, LocalEmbedder, build_embedder
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.lib.engine.options import EngineOptions, SyncResult
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import hnsw_index_definition, hnsw_index_name
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, temporary_server
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.settings import Settings

SAMPLE = harness.SAMPLE_DIR / "result.json"
CASES = ("fixed", "openai", "latency", "local", "first-run", "noop", "write", "rss")
START = datetime(2024, 1, 1, tzinfo=UTC)
TWO_YEARS_MINUTES = 2 * 365 * 24 * 60
MESSAGES_INDEX = "messages_embedding_hnsw_idx"


@dataclass
class Line:
    case: str
    what: str
    figure: str
    note: str = ""


def texts(count: int) -> list[str]:
    """Chat-like texts of mixed length: the sample chat's messages in their order, again
    and again, each pass marked (so no two texts are equal)."""
    base = [m.text for m in load_export(SAMPLE).messages if m.text.strip()]
    return [f"{base[i % len(base)]} (#{i // len(base)})" for i in range(count)]


# -- the database ----------------------------------------------------------------------------


def fresh_database(pg: EmbeddedPostgres, name: str, dimension: int, model_id: str) -> str:
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg.url(name)
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, Settings(database_url=url), dimension, model_id)
    return url


def load_messages(url: str, contents: list[str], vectors: np.ndarray | None = None, model=""):
    """COPY `contents` in as messages over 24 months (with `vectors`: already embedded)."""
    with db.connection(url) as conn:
        columns = "chat_id, telegram_message_id, author, author_id, sent_at, content"
        if vectors is not None:
            columns += ", embedding, embedding_model, embedding_hash, embedded_at"
        with conn.cursor().copy(f"COPY messages ({columns}) FROM STDIN") as copy:
            for i, content in enumerate(contents):
                row: tuple[object, ...] = (
                    1,
                    i,
                    f"user{i % 7}",
                    str(i % 7),
                    START + timedelta(minutes=i * TWO_YEARS_MINUTES // max(len(contents), 1)),
                    content,
                )
                if vectors is not None:
                    digest = hashlib.sha256(content.encode()).hexdigest()
                    row += (vectors[i % len(vectors)], model, digest, START)
                copy.write_row(row)
        conn.commit()


def reset(url: str) -> None:
    """Every message without a vector again (and no HNSW index)."""
    with db.connection(url, autocommit=True) as conn:
        conn.execute("UPDATE messages SET embedding = NULL, embedding_model = NULL")
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(MESSAGES_INDEX)))
        conn.execute("VACUUM ANALYZE messages")


def plain_index_seconds(url: str, settings: Settings) -> float:
    """One plain CREATE INDEX on the final data, server defaults, timed."""
    spec = settings.tables["messages"]
    with db.connection(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_index_name(spec)))
        )
        started = time.monotonic()
        conn.execute(
            sql.SQL("CREATE INDEX {} ON messages {}").format(
                sql.Identifier(hnsw_index_name(spec)), hnsw_index_definition(spec, settings.hnsw)
            )
        )
        return time.monotonic() - started


def run_pipeline(
    url: str, embedder: Embedder, options: EngineOptions, settings: Settings
) -> SyncResult:
    embedder.warm_up()  # the SDK imported or the model loaded before the clock, as for raw
    with db.connection(url) as conn:
        return sync_embeddings(
            conn,
            settings.tables["messages"],
            embedder,
            Window(),
            options=options,
            index=settings.hnsw,
            reconnect=lambda: db.connect(url),  # as a run's: writer connections open with it
        )


# -- providers -------------------------------------------------------------------------------


def provider_requests(base: str) -> int:
    return int(httpx.get(base + "/stats").json()["requests"])


def openai_embedder(base: str, dimensions: int) -> Embedder:
    return build_embedder(
        "openai",
        openai_api_key="benchmark",
        openai_base_url=base + "/v1",
        dimensions=dimensions if dimensions != 1536 else None,
        retry=RetryPolicy(deadline_seconds=0),
    )


def raw_openai(base: str, contents: list[str], batch: int, in_flight: int) -> float:
    """rows/s of the SDK alone: the same batches, as many in flight, answers decoded."""
    import base64

    import openai

    client = openai.OpenAI(api_key="benchmark", base_url=base + "/v1", max_retries=0)
    batches = [contents[i : i + batch] for i in range(0, len(contents), batch)]

    def call(chunk: list[str]) -> int:
        response = client.embeddings.create(
            model="text-embedding-3-small", input=chunk, encoding_format="base64"
        )
        vectors = [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in response.data]
        return len(vectors)

    started = time.monotonic()
    with ThreadPoolExecutor(in_flight) as pool:
        done = sum(pool.map(call, batches))
    return done / (time.monotonic() - started)


@dataclass
class Timed:
    """A process's wall clock, its CPU time (user + system) and its output."""

    wall: float
    cpu: float
    stdout: str = ""


def timed_process(
    command: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> Timed:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode:
        raise RuntimeError(process.stderr[-2000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(wall, cpu, process.stdout)


def cli_process(url: str, env: dict[str, str], home: Path, *args: str) -> Timed:
    """`embedding-pipeline <args>` as a new process."""
    return timed_process(
        [str(harness.BIN / "embedding-pipeline"), *args],
        {**os.environ, **env, "DATABASE_URL": url, "DAGSTER_HOME": str(home)},
    )


def materialize_process(url: str, env: dict[str, str], home: Path) -> Timed:
    return cli_process(url, env, home, "materialize", "--table", "messages")


#: What `materialize` imports (the definitions are built at import).
IMPORTS = "import embedding_pipeline.cli, embedding_pipeline.runner"


def process_start() -> Timed:
    """Process start: a process that only imports what `materialize` imports."""
    return timed_process([sys.executable, "-c", IMPORTS])


def latest_run_details(home: Path) -> dict:
    """The `run_*` figures and `run_details` of the newest `message_embeddings`
    materialization recorded in the Dagster instance at `home`."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        [record] = instance.fetch_materializations(
            dg.AssetKey("message_embeddings"), limit=1
        ).records
        assert record.asset_materialization is not None
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}


# -- the cases --------------------------------------------------------------------------------


def case_openai(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    contents = texts(args.rows)
    dim = args.dimensions
    with harness.fake_openai(dim) as base:
        embedder = openai_embedder(base, dim)
        settings = Settings()
        url = fresh_database(pg, "tp_openai", embedder.dimension, embedder.model_id)
        load_messages(url, contents)
        options = EngineOptions(
            batch_size=settings.embedder.__class__(provider="openai").effective_batch_size
        )
        workers = options.workers(embedder)
        raw = raw_openai(base, contents, options.batch_size, workers)
        result = run_pipeline(url, embedder, options, Settings(database_url=url))
        loop = result.seconds - result.index_seconds
        rate = result.embedded / loop
        out.append(
            Line("openai instant", f"raw SDK, {workers} in flight, batch 256", f"{raw:,.0f} rows/s")
        )
        out.append(
            Line(
                "openai instant",
                f"pipeline embed+write, {dim}-d",
                f"{rate:,.0f} rows/s",
                f"{rate / raw:.2f}x raw; {options.write_connections} write connections; "
                f"index {result.index_strategy}",
            )
        )
        plain = plain_index_seconds(url, Settings(database_url=url))
        out.append(
            Line(
                "openai instant",
                f"index build after load ({result.embedded:,} rows)",
                f"{result.index_seconds:.1f} s",
                f"{result.index_seconds / plain:.2f}x one plain CREATE INDEX ({plain:.1f} s)",
            )
        )
        reset(url)
        single = run_pipeline(
            url, embedder, replace(options, write_connections=1), Settings(database_url=url)
        )
        single_rate = single.embedded / (single.seconds - single.index_seconds)
        out.append(
            Line(
                "openai instant",
                f"pipeline embed+write, {dim}-d, 1 write connection",
                f"{single_rate:,.0f} rows/s",
                f"{single_rate / raw:.2f}x raw (the run's own connection writes)",
            )
        )
        reset(url)
        with tempfile.TemporaryDirectory() as home:
            env = {
                "EP_EMBEDDING_PROVIDER": "openai",
                "OPENAI_BASE_URL": base + "/v1",
                "OPENAI_API_KEY": "benchmark",
                **({"EP_EMBEDDING_DIMENSIONS": str(dim)} if dim != 1536 else {}),
            }
            wall = materialize_process(url, env, Path(home)).wall
            figures = latest_run_details(Path(home))
            noops = [materialize_process(url, env, Path(home)).wall for _ in range(3)]
        start = statistics.median(process_start().wall for _ in range(3))
        index = float(figures["run_details"]["index_build_seconds"])
        embed = float(figures["run_seconds"]) - index
        fixed = wall - start - embed - index
        out.append(
            Line(
                "openai instant",
                f"`materialize` end to end, new process, {len(contents):,} rows",
                f"{wall:.1f} s",
                f"{len(contents) / wall:,.0f} rows/s: process start {start:.1f} s, fixed run "
                f"cost {fixed:.1f} s, embed+write {embed:.1f} s, index build {index:.1f} s",
            )
        )
        noop = statistics.median(noops)
        out.append(
            Line(
                "openai instant",
                f"the same `materialize` again, nothing to do ({len(contents):,} rows)",
                f"{noop - start:.2f} s beyond process start",
                f"{noop:.2f} s wall (median of 3), process start {start:.2f} s",
            )
        )


def case_latency(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    contents = texts(args.latency_rows)
    with harness.fake_openai(args.dimensions, latency=0.2) as base:
        embedder = openai_embedder(base, args.dimensions)
        url = fresh_database(pg, "tp_latency", embedder.dimension, embedder.model_id)
        load_messages(url, contents)
        rates = {}
        default = embedder.default_concurrency
        for workers in (1, default, 2 * default):
            reset(url)
            result = run_pipeline(
                url,
                embedder,
                EngineOptions(batch_size=256, concurrency=workers),
                Settings(database_url=url),
            )
            rates[workers] = result.embedded / (result.seconds - result.index_seconds)
        out.append(
            Line("openai 200 ms", "pipeline, 1 request in flight", f"{rates[1]:,.0f} rows/s")
        )
        for workers, label in ((default, " (default)"), (2 * default, "")):
            out.append(
                Line(
                    "openai 200 ms",
                    f"pipeline, {workers} in flight{label}",
                    f"{rates[workers]:,.0f} rows/s",
                    f"{rates[workers] / rates[1]:.2f}x one in flight",
                )
            )


def case_local(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    contents = texts(args.local_rows)
    raw_embedder = LocalEmbedder()
    raw_embedder.embed(contents[:64])  # the model loads outside the clock, for both sides
    started = time.monotonic()
    for i in range(0, len(contents), 64):
        raw_embedder.embed(contents[i : i + 64])
    raw = len(contents) / (time.monotonic() - started)
    embedder = LocalEmbedder()
    url = fresh_database(pg, "tp_local", embedder.dimension, embedder.model_id)
    load_messages(url, contents)
    settings = Settings(database_url=url)
    result = run_pipeline(url, embedder, EngineOptions(batch_size=64), settings)
    whole = result.embedded / result.seconds
    out.append(Line("local", "raw embedder, id-order batches of 64", f"{raw:,.1f} rows/s"))
    out.append(
        Line(
            "local",
            "pipeline end to end (writes and index build included)",
            f"{whole:,.1f} rows/s",
            f"{whole / raw:.2f}x raw",
        )
    )


def case_first_run(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    contents = texts(args.rows)
    with harness.fake_openai(args.dimensions) as base:
        embedder = openai_embedder(base, args.dimensions)
        rates = []
        for analyzed in (False, True):
            url = fresh_database(pg, "tp_first", embedder.dimension, embedder.model_id)
            load_messages(url, contents)
            if analyzed:
                with db.connection(url, autocommit=True) as conn:
                    conn.execute("ANALYZE messages")
            result = run_pipeline(
                url, embedder, EngineOptions(batch_size=256), Settings(database_url=url)
            )
            rates.append(result.embedded / (result.seconds - result.index_seconds))
        out.append(
            Line(
                "first run after a load", "right after COPY, no ANALYZE", f"{rates[0]:,.0f} rows/s"
            )
        )
        out.append(
            Line(
                "first run after a load",
                "after ANALYZE",
                f"{rates[1]:,.0f} rows/s",
                f"unanalyzed / analyzed {rates[0] / rates[1]:.2f}",
            )
        )


def case_noop(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    """`materialize --table messages` with nothing to do over `--noop-rows` distinct
    vectors (two years of months): the run embeds nothing and runs the nine
    checks (recall's ten exact scans grow with the table), and calls no provider."""
    dim = 384
    with harness.fake_openai(dim) as base:
        embedder = openai_embedder(base, dim)
        url = fresh_database(pg, "tp_noop", dim, embedder.model_id)
        vectors = np.random.default_rng(1).standard_normal((args.noop_rows, dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with db.connection(url, autocommit=True) as conn:  # loaded without it, built once
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(MESSAGES_INDEX)))
        load_messages(url, texts(args.noop_rows), vectors.astype(np.float32), embedder.model_id)
        with db.connection(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE messages")
        env = {
            "EP_EMBEDDING_PROVIDER": "openai",
            "OPENAI_BASE_URL": base + "/v1",
            "OPENAI_API_KEY": "benchmark",
            "EP_EMBEDDING_DIMENSIONS": str(dim),
        }
        starts, walls = [], []
        with tempfile.TemporaryDirectory() as home:
            materialize_process(url, env, Path(home))  # builds the index, records the runs
            before = provider_requests(base)
            for _ in range(3):
                starts.append(process_start().wall)
                walls.append(materialize_process(url, env, Path(home)).wall)
            requests = provider_requests(base) - before
        start, wall = statistics.median(starts), statistics.median(walls)
        out.append(
            Line(
                "no-op",
                f"`materialize --table messages`, {args.noop_rows:,} rows up to date",
                f"{wall - start:.2f} s beyond process start",
                f"{wall:.2f} s wall, process start {start:.2f} s (medians of 3), "
                f"{requests} provider requests",
            )
        )


def _code_process(source: Path | None, env: dict[str, str], *args: str) -> Timed:
    """A process of this checkout's code, or of the source tree `source` (another commit,
    exported with `git archive`), both started the same way, from outside the checkout."""
    extra = {"PYTHONPATH": str(source)} if source else {}
    with tempfile.TemporaryDirectory() as cwd:
        return timed_process([sys.executable, *args], {**os.environ, **env, **extra}, cwd)


def case_fixed(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    """The fixed cost of a run on the demo database (the sample chat, the local model),
    against process start, interleaved so load hits both sides alike: `materialize
    --table messages` with nothing to do, and the same after the application edited the
    text of three messages of one month (a run of a few rows in one month). With
    `--baseline SRC`, the code of SRC (`git archive <commit> | tar -x -C SRC`) is measured
    the same way in the same rounds, on the same database."""
    url = pg.url("tp_demo")
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS tp_demo WITH (FORCE)")
        conn.execute("CREATE DATABASE tp_demo")
    sample = SAMPLE.parent
    codes: dict[str, Path | None] = {"this checkout": None}
    if args.baseline:
        codes[f"baseline {args.baseline}"] = Path(args.baseline).resolve()
    timed: dict[tuple[str, str], list[Timed]] = {}
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {"DATABASE_URL": url, "DAGSTER_HOME": str(home)}
        cli = ("-m", "embedding_pipeline.cli")
        _code_process(
            None,
            env,
            *cli,
            "ingest",
            str(sample / "result.json"),
            "--extraction",
            str(sample / "extraction.json"),
        )
        _code_process(None, env, *cli, "materialize")  # the demo's run: everything embedded
        for round_number in range(args.fixed_rounds):
            for name, source in codes.items():
                start = _code_process(source, env, "-c", IMPORTS)
                noop = _code_process(source, env, *cli, "materialize", "--table", "messages")
                with db.connection(url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE messages SET content = content || %s WHERE id IN (SELECT id "
                        "FROM messages WHERE sent_at >= '2025-10-01' AND sent_at < "
                        "'2025-11-01' ORDER BY id LIMIT 3)",
                        (f" (edit {round_number} {name})",),
                    )
                edit = _code_process(source, env, *cli, "materialize", "--table", "messages")
                if "embedded      3" not in edit.stdout:
                    raise RuntimeError(f"the edited rows were not embedded: {edit.stdout}")
                for what, measured in (("start", start), ("noop", noop), ("edit", edit)):
                    timed.setdefault((name, what), []).append(measured)
    for name in codes:
        starts = timed[(name, "start")]
        start = statistics.median(t.wall for t in starts)
        start_cpu = statistics.median(t.cpu for t in starts)
        spread = f"{min(t.wall for t in starts):.2f}-{max(t.wall for t in starts):.2f}"
        for what, key in (
            ("nothing to do", "noop"),
            ("3 edited rows in one month (local model loaded)", "edit"),
        ):
            walls = [t.wall for t in timed[(name, key)]]
            wall = statistics.median(walls)
            cpu = statistics.median(t.cpu for t in timed[(name, key)])
            out.append(
                Line(
                    f"fixed cost (demo database), {name}",
                    f"`materialize --table messages`, {what}",
                    f"{wall - start:.2f} s beyond process start",
                    f"{wall:.2f} s wall, median of {len(walls)} ({min(walls):.2f}-"
                    f"{max(walls):.2f}); process start {start:.2f} s (median, {spread}); "
                    f"CPU {cpu:.2f} s against {start_cpu:.2f} s",
                )
            )


class _Instant(Embedder):
    """Precomputed vectors, no provider: what is left is the pipeline's own work."""

    model_id = "benchmark:instant"
    dimension = 384
    max_batch_size = 2048

    def __init__(self) -> None:
        super().__init__()
        self._pool = np.random.default_rng(2).standard_normal((997, 384)).astype(np.float32)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self._pool[[hash(t) % 997 for t in texts]]


def case_write(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    embedder = _Instant()
    for rows in (5_000, 20_000):
        url = fresh_database(pg, f"tp_write_{rows}", 384, embedder.model_id)
        load_messages(url, texts(rows))
        reset(url)
        settings = Settings(database_url=url)
        result = run_pipeline(url, embedder, EngineOptions(batch_size=64), settings)
        pipeline = result.embedded / (result.seconds - result.index_seconds)
        reset(url)
        naive = naive_updates(url, embedder)
        out.append(
            Line(
                "write path",
                f"{rows:,} rows: pipeline (claim, COPY, UPDATE by key)",
                f"{pipeline:,.0f} rows/s",
                f"{pipeline / naive:.2f}x single-row UPDATEs ({naive:,.0f} rows/s)",
            )
        )


def naive_updates(url: str, embedder: Embedder) -> float:
    """One UPDATE per row, committed every 64 rows: the write a hand-rolled worker does."""
    with db.connection(url) as conn:
        rows = conn.execute("SELECT id, content FROM messages ORDER BY id").fetchall()
        conn.commit()
        vectors = embedder.embed([content for _, content in rows[:1]])
        started = time.monotonic()
        for i, (row_id, content) in enumerate(rows):
            conn.execute(
                "UPDATE messages SET embedding = %s, embedding_model = %s, embedding_hash = %s, "
                "embedded_at = now() WHERE id = %s",
                (
                    vectors[0],
                    embedder.model_id,
                    hashlib.sha256(content.encode()).hexdigest(),
                    row_id,
                ),
            )
            if i % 64 == 63:
                conn.commit()
        conn.commit()
        return len(rows) / (time.monotonic() - started)


def case_rss(pg: EmbeddedPostgres, args: argparse.Namespace, out: list[Line]) -> None:
    with harness.fake_openai(args.dimensions) as base:
        for rows in (20_000, args.rss_rows):
            embedder = openai_embedder(base, args.dimensions)
            url = fresh_database(pg, f"tp_rss_{rows}", embedder.dimension, embedder.model_id)
            load_messages(url, texts(rows))
            peak = _peak_rss_mb(url, base, args.dimensions)
            out.append(Line("peak RSS", f"pipeline process, {rows:,} rows", f"{peak:.0f} MB"))


def _peak_rss_mb(url: str, base: str, dimensions: int) -> float:
    """Peak RSS of a process that runs the pipeline over every row of `url`."""
    done = subprocess.run(
        [sys.executable, __file__, "--rss-worker", url, base, str(dimensions)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def rss_worker(url: str, base: str, dimensions: int) -> None:
    """The pipeline over `url` (without the index: the server's work, not this process's),
    then this process's peak RSS in kB (VmHWM: `ru_maxrss` would carry the parent's peak
    over from before the exec)."""
    reset(url)
    with db.connection(url) as conn:
        sync_embeddings(
            conn,
            Settings().tables["messages"],
            openai_embedder(base, dimensions),
            Window(),
            options=EngineOptions(batch_size=256),
        )
    status = Path("/proc/self/status").read_text().splitlines()
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


RUNNERS: dict[str, Callable[[EmbeddedPostgres, argparse.Namespace, list[Line]], None]] = {
    "fixed": case_fixed,
    "openai": case_openai,
    "latency": case_latency,
    "local": case_local,
    "first-run": case_first_run,
    "noop": case_noop,
    "write": case_write,
    "rss": case_rss,
}


def main() -> None:
    if sys.argv[1:2] == ["--rss-worker"]:
        rss_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated of {CASES}")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--fixed-rounds", type=int, default=3)
    parser.add_argument(
        "--baseline",
        help="fixed case: also measure the source tree in this folder (`git archive`)",
    )
    parser.add_argument("--latency-rows", type=int, default=20_000)
    parser.add_argument("--local-rows", type=int, default=20_000)
    parser.add_argument("--noop-rows", type=int, default=100_000)
    parser.add_argument("--rss-rows", type=int, default=100_000)
    parser.add_argument("--dimensions", type=int, default=1536)
    args = parser.parse_args()
    load = harness.load_average()
    out: list[Line] = []
    with temporary_server("ep-bench-throughput-") as pg:
        for case in args.cases.split(","):
            started = time.monotonic()
            RUNNERS[case](pg, args, out)
            print(
                f"[{case} done in {time.monotonic() - started:.0f}s]", file=sys.stderr, flush=True
            )
    end = harness.load_average()
    print(f"\nload average at start {load:.2f}, at end {end:.2f}; {os.cpu_count()} cores")
    print("| case | what | figure | note |\n|---|---|---:|---|")
    for line in out:
        print(f"| {line.case} | {line.what} | {line.figure} | {line.note} |")
    print(json.dumps([line.__dict__ for line in out]), file=sys.stderr)


if __name__ == "__main__":
    main()
