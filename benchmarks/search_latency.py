"""Search latency and recall at 100,000 rows: the search API (vector unfiltered, filtered at
10% and 1% selectivity, hybrid), HTTP end to end through `embedding-pipeline serve`, and
the local model's query embedding on its own.

Starts a throw-away PostgreSQL+pgvector server (the project's embedded one) in a temporary
folder and fills `messages` with N rows of 384-dimension unit vectors scattered around
N / 100 random centres (nearest neighbours at cosine similarity 0.5 to 0.6, as sentence
embeddings of related texts have; the same data as `check_cost.py --data clustered`),
every tenth row by author `author-0` (the 10% filter) and every hundredth in topic 1 (the
1% filter), each with a text of 12 words drawn from 1,000 made-up words. Then it builds
the HNSW index (m 16, ef_construction 64) and runs `VACUUM ANALYZE`.

Queries are drawn like the rows (a random centre plus noise), each scenario asks the same
queries through `Searcher.search` with the vector given (so embedding is not counted) on
one pooled connection, and the first `--warmup` answers are not timed. recall@10 compares
the ids with the same statement run again with index scans disabled (a sequential scan:
the exact answer). Hybrid queries carry three of the made-up words.

HTTP: `embedding-pipeline serve` on the same database with an API key (EP_API_KEYS),
`POST /api/v1/semantic_search/messages` (vector mode, embedding included) with the first
ten words of each sample chat message as the query, one client, one request at a time.
Embedding: `LocalEmbedder().embed([text])` for the same texts.

Concurrent clients (`--clients 1,4,16`): for each level a fresh `serve` (empty query
cache) answers `--http-requests` requests from that many clients at once (each client an
asyncio task of one process, sending its next request when its answer came, on its own
keep-alive connection), after `--warmup` untimed requests of other texts. The mix is the
same for every level: questions picked by a Zipf law (`--zipf`, exponent 1.1; web search
logs follow about 1) over 200 sample chat questions (a few asked often, most rarely), 60%
vector, 30% hybrid, 10% text. The query cache's hits and the model calls come from the
server's /metrics.

    .venv/bin/python benchmarks/search_latency.py                 # 100,000 rows
    .venv/bin/python benchmarks/search_latency.py --rows 20000 --queries 100
    .venv/bin/python benchmarks/search_latency.py --http-only     # HTTP lines only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import harness
import httpx
import numpy as np
import psycopg
import sqlalchemy as sa
from pgvector.psycopg import register_vector
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.quality.index import describe_plan
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.store.hnsw import build_hnsw_index_concurrently, hnsw_index_name
from embedding_pipeline.lib.store.pgserver import temporary_server
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.search import Hit, Searcher, engine_for
from embedding_pipeline.search.evaluation import SAMPLE_DIR
from embedding_pipeline.settings import SearchSettings, Settings

ENDINGS = ("ran", "mel", "tok", "vis", "dur", "pel", "zin", "ko", "sa", "lu", "nor", "qua")
#: 1,000 made-up words ("baran", "bemel", ...): no stop words, no stemming surprises.
VOCABULARY = [f"{a}{b}{c}" for a in "bdgklmnprst" for b in "aeiou" for c in ENDINGS][:1000]
WORDS_PER_ROW = 12
#: HTTP queries: the first words of the sample chat's messages (the length of a question).
QUERY_WORDS = 10
SEARCH_PATH = "/api/v1/semantic_search/messages"


def unit_rows(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    picked = centres[rng.integers(0, len(centres), size=n)]
    vectors = picked + rng.normal(scale=0.045, size=(n, LOCAL_DIMENSION))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def load(url: str, settings: Settings, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Schema, 100 topics, `rows` embedded messages (no HNSW index yet); the centres."""
    spec = settings.tables["messages"]
    centres = rng.normal(size=(max(1, rows // 100), LOCAL_DIMENSION))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with psycopg.connect(url) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION)
        register_vector(conn)
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(hnsw_index_name(spec))))
        conn.execute(
            "INSERT INTO topics (key, name) SELECT 'topic-' || i, 'Topic ' || i "
            "FROM generate_series(1, 100) i"
        )
        columns = sql.SQL(", ").join(
            sql.Identifier(c)
            for c in (
                "chat_id",
                "telegram_message_id",
                "author_id",
                "topic_id",
                spec.partition_column,
                spec.text_columns[0],
                spec.embedding_column,
                spec.model_column,
            )
        )
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
            sql.Identifier(spec.table), columns
        )
        base = datetime(2024, 1, 1, tzinfo=UTC)
        with conn.cursor().copy(copy_sql) as copy:
            copy.set_types(
                ["int8", "int8", "text", "int8", "timestamptz", "text", "vector", "text"]
            )
            for start in range(0, rows, 10_000):
                n = min(10_000, rows - start)
                vectors = unit_rows(rng, centres, n)
                words = rng.integers(0, len(VOCABULARY), size=(n, WORDS_PER_ROW))
                for j in range(n):
                    i = start + j
                    copy.write_row(
                        [
                            1,
                            i,
                            f"author-{i % 10}",
                            i % 100 + 1,
                            base + timedelta(minutes=i),
                            " ".join(VOCABULARY[w] for w in words[j]),
                            vectors[j],
                            LOCAL_MODEL_ID,
                        ]
                    )
        conn.commit()
    return centres


def build_index(url: str, settings: Settings) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        build_hnsw_index_concurrently(conn, settings.tables["messages"], settings.hnsw)
        conn.execute("VACUUM ANALYZE messages")


@dataclass
class Scenario:
    name: str
    options: dict[str, Any]
    #: Searcher settings of this scenario, if not the defaults.
    search: SearchSettings | None = None
    timings_ms: list[float] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    plan: str = ""


def percentile(values: list[float], q: float) -> float:
    return harness.percentile(values, q, method="nearest")


def run_scenario(
    engine: sa.Engine,
    searcher: Searcher,
    scenario: Scenario,
    queries: list[tuple[np.ndarray, str]],
    warmup: int,
) -> None:
    if scenario.search is not None:
        settings = replace(searcher.settings, search=scenario.search)
        searcher = Searcher(settings, embedder=searcher.embedder)
    answers: list[list[Hit]] = []
    with engine.connect() as conn:
        vector, text = queries[0]
        plan = searcher.explain(conn, text, vector=vector, **scenario.options)
        scenario.plan = describe_plan(plan)
        for i, (vector, text) in enumerate(queries[:warmup] + queries):
            ms, hits = harness.timed_ms(
                lambda: searcher.search(conn, text, vector=vector, **scenario.options)  # noqa: B023
            )
            if i >= warmup:
                scenario.timings_ms.append(ms)
                answers.append(hits)
        with conn.begin():  # the exact answers: no index scans, so a sequential scan and sort
            conn.exec_driver_sql("SET LOCAL enable_indexscan = off")
            for (vector, text), hits in zip(queries, answers, strict=True):
                exact = {
                    h.id for h in searcher.search(conn, text, vector=vector, **scenario.options)
                }
                scenario.returned.append(len(hits))
                scenario.recalls.append(len(exact & {h.id for h in hits}) / max(1, len(exact)))


#: The key every HTTP request of the benchmark carries (authentication on, as deployed).
API_KEY = "benchmark-key"
MIX_QUESTIONS = 200
MODE_SHARES = {"vector": 0.6, "hybrid": 0.3, "text": 0.1}


def serving(url: str, workdir: Path) -> AbstractContextManager[str]:
    """`embedding-pipeline serve` with an API key on a free port; its base URL once it
    printed its ready line."""
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DAGSTER_HOME": str(workdir / "dagster_home"),
        "EP_API_KEYS": API_KEY,
    }
    return harness.serve(env, workdir)


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})


def http_latency(url: str, texts: list[str], warmup: int, workdir: Path) -> list[float]:
    timings: list[float] = []
    with serving(url, workdir) as base, client(base) as http:
        for i, text in enumerate(texts[:warmup] + texts):
            body = {"query": text, "limit": 10}
            ms, answer = harness.timed_ms(
                lambda: http.post("/api/v1/semantic_search/messages", json=body)  # noqa: B023
            )
            answer.raise_for_status()
            if i >= warmup:
                timings.append(ms)
    return timings


def query_mix(
    questions: list[str], n: int, exponent: float, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """`n` search bodies: questions by a Zipf law of `exponent` (rank r asked in proportion
    to 1 / r ** exponent), modes by share."""
    ranks: list[int] = []
    while len(ranks) < n:
        ranks.extend(int(r) - 1 for r in rng.zipf(exponent, n) if r <= len(questions))
    modes = rng.choice(list(MODE_SHARES), size=n, p=list(MODE_SHARES.values()))
    return [
        {"query": questions[r], "mode": str(m), "limit": 10}
        for r, m in zip(ranks[:n], modes, strict=True)
    ]


@dataclass
class Level:
    clients: int
    timings_ms: list[float]
    seconds: float
    vectors: dict[str, float]
    model_calls: float

    @property
    def vector_queries(self) -> float:
        return sum(self.vectors.values())


def query_vector_counts(http: httpx.Client) -> tuple[dict[str, float], float]:
    families = text_string_to_metric_families(http.get("/metrics").text)
    samples = [s for family in families for s in family.samples]
    vectors = {
        s.labels["source"]: s.value for s in samples if s.name == "ep_search_query_vectors_total"
    }
    calls = sum(s.value for s in samples if s.name == "ep_search_query_model_calls_total")
    return vectors, calls


def concurrent_level(
    url: str, bodies: list[dict[str, Any]], warm: list[str], clients: int, workdir: Path
) -> Level:
    """`bodies` sent by `clients` clients at once (asyncio tasks of one process, each
    sending its next request when its answer came, each on its own connection)."""
    with serving(url, workdir) as base, client(base) as http:
        for text in warm:
            http.post(SEARCH_PATH, json={"query": text, "limit": 10}).raise_for_status()
        before, calls_before = query_vector_counts(http)
        started = time.perf_counter()
        timings = asyncio.run(send_concurrently(base, bodies, clients))
        seconds = time.perf_counter() - started
        after, calls_after = query_vector_counts(http)
    vectors = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("cache", "shared", "model")}
    return Level(clients, timings, seconds, vectors, calls_after - calls_before)


async def send_concurrently(base: str, bodies: list[dict[str, Any]], clients: int) -> list[float]:
    timings = [0.0] * len(bodies)
    pending = iter(enumerate(bodies))
    async with httpx.AsyncClient(
        base_url=base,
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},
        limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
    ) as http:

        async def one_client() -> None:
            for i, body in pending:
                started = time.perf_counter()
                answer = await http.post(SEARCH_PATH, json=body)
                timings[i] = (time.perf_counter() - started) * 1000.0
                answer.raise_for_status()

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return timings


def level_row(level: Level) -> str:
    share = level.vector_queries or 1.0
    return (
        f"| {level.clients} | {len(level.timings_ms)} | "
        f"{statistics.median(level.timings_ms):.1f} | {percentile(level.timings_ms, 0.95):.1f} | "
        f"{len(level.timings_ms) / level.seconds:.1f} | "
        f"{level.vectors['cache'] / share:.0%} | {level.vectors['shared'] / share:.0%} | "
        f"{level.vectors['model']:.0f} in {level.model_calls:.0f} calls |"
    )


def row(
    name: str, timings: list[float], recall: str = "", returned: str = "", plan: str = ""
) -> str:
    return (
        f"| {name} | {statistics.median(timings):.2f} | {percentile(timings, 0.95):.2f} | "
        f"{recall} | {returned} | {plan} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef-search", type=int, help="hnsw.ef_search (default: the setting)")
    parser.add_argument(
        "--clients", default="1,4,16", help="concurrent HTTP clients per level (default 1,4,16)"
    )
    parser.add_argument("--http-requests", type=int, default=400, help="requests per level")
    parser.add_argument(
        "--zipf", type=float, default=1.1, help="exponent of the question mix (above 1)"
    )
    parser.add_argument("--http-only", action="store_true", help="only the HTTP lines")
    parser.add_argument("--keep", action="store_true", help="leave the server and data")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    rng = np.random.default_rng(args.seed)
    harness.print_load_at_start()
    workdir = Path(tempfile.mkdtemp(prefix="ep-serve-"))
    with temporary_server("ep-search-latency-", keep=args.keep) as server:
        server.ensure_database("bench")
        url = server.url("bench")
        settings = Settings(database_url=url)
        if args.ef_search:
            settings = replace(settings, hnsw=replace(settings.hnsw, ef_search=args.ef_search))
        started = time.monotonic()
        centres = load(url, settings, args.rows, rng)
        loaded = time.monotonic()
        build_index(url, settings)
        print(
            f"{args.rows} rows loaded in {loaded - started:.0f}s, HNSW index built and "
            f"analyzed in {time.monotonic() - loaded:.0f}s"
        )
        embedder = LocalEmbedder()
        searcher = Searcher(settings, embedder=embedder)
        queries = [
            (unit_rows(rng, centres, 1)[0], " ".join(rng.choice(VOCABULARY, size=3)))
            for _ in range(args.queries)
        ]
        scenarios = [
            Scenario("vector, unfiltered", {"k": 10}),
            Scenario("vector, filter 10% (author)", {"k": 10, "filters": {"author": "author-0"}}),
            Scenario(
                "vector, filter 10% (author), iterative scans off",
                {"k": 10, "filters": {"author": "author-0"}},
                SearchSettings(iterative_scan="off"),
            ),
            Scenario("vector, filter 1% (topic)", {"k": 10, "filters": {"topic": 1}}),
            Scenario(
                "vector, filter 1% (topic), HNSW forced (EP_SEARCH_EXACT_BELOW_ROWS=0)",
                {"k": 10, "filters": {"topic": 1}},
                SearchSettings(exact_below_rows=0),
            ),
            Scenario(
                "vector, filter 1% (topic), HNSW forced, iterative scans off",
                {"k": 10, "filters": {"topic": 1}},
                SearchSettings(exact_below_rows=0, iterative_scan="off"),
            ),
            Scenario("hybrid, unfiltered", {"k": 10, "mode": "hybrid"}),
            Scenario("text, unfiltered", {"k": 10, "mode": "text"}),
        ]
        if args.http_only:
            scenarios = []
        engine = engine_for(url)
        for scenario in scenarios:
            run_scenario(engine, searcher, scenario, queries, args.warmup)
        engine.dispose()

        messages = load_export(SAMPLE_DIR / "result.json").messages
        texts = [" ".join(m.text.split()[:QUERY_WORDS]) for m in messages]
        http = http_latency(url, texts[: args.queries], args.warmup, workdir)
        embedding = (
            []
            if args.http_only
            else [harness.timed_ms(lambda: embedder.embed([t]))[0] for t in texts[: args.queries]]  # noqa: B023
        )
        questions = texts[-MIX_QUESTIONS:]
        warm = texts[: args.warmup]
        mix = query_mix(
            questions, args.http_requests, args.zipf, np.random.default_rng(args.seed + 1)
        )
        concurrent = [concurrent_level(url, mix, warm, n, workdir) for n in levels]

    print(
        f"\n{args.rows} rows, {args.queries} queries per line (after {args.warmup} untimed), "
        f"k 10, ef_search {settings.hnsw.ef_search}, iterative scan "
        f"{settings.search.iterative_scan} (max_scan_tuples {settings.search.max_scan_tuples})\n"
    )
    print("| what | p50 ms | p95 ms | recall@10 vs exact | rows returned (min / mean) | plan |")
    print("|---|---:|---:|---:|---:|---|")
    for s in scenarios:
        print(
            row(
                s.name,
                s.timings_ms,
                f"{statistics.mean(s.recalls):.3f}",
                f"{min(s.returned)} / {statistics.mean(s.returned):.1f}",
                s.plan,
            )
        )
    print(row("HTTP POST semantic_search (vector), embedding included, API key", http))
    if embedding:
        print(row("query embedding alone (local model)", embedding))
    distinct = len({b["query"] for b in mix})
    print(
        f"\nconcurrent clients over HTTP, API key on: {args.http_requests} requests a level, "
        f"{distinct} distinct questions (Zipf exponent {args.zipf}), modes {MODE_SHARES}\n"
    )
    print(
        "| clients | requests | p50 ms | p95 ms | requests/s | query vectors from the cache "
        "| shared with a query in flight | embedded (model calls) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level in concurrent:
        print(level_row(level))
    by_clients = {level.clients: level for level in concurrent}
    if 1 in by_clients and 16 in by_clients:
        ratio = percentile(by_clients[16].timings_ms, 0.95) / percentile(
            by_clients[1].timings_ms, 0.95
        )
        verdict = "met" if ratio <= 8 else "missed"
        print(f"\np95 at 16 clients / p95 at 1 client: {ratio:.2f} (target at most 8: {verdict})")
    print(f"\nload average at the end: {harness.load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
