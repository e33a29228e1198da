"""The search service's Prometheus metrics (`GET /metrics`), in a registry of its own per
app, so that several apps in one process (tests) never share or clash.

    ep_search_requests_total{route, method, status}       requests answered
    ep_search_request_duration_seconds{route}             latency histogram
    ep_search_requests_in_flight                          requests being answered
    ep_search_query_embedding_seconds                     time to a query's vector
    ep_search_database_seconds{route}                     time in the database per request
    ep_search_query_vectors_total{source}                 cache, shared or model
    ep_search_query_model_calls_total                     calls to the model for queries
    ep_search_query_cache_entries                         vectors in the cache

`route` is the route's template (`/api/v1/similar/{table}/{id}`), never the path a client
sent: paths carry topic keys, and a label per distinct path would grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from embedding_pipeline.search.query_vectors import QueryVectorStats

#: What `generate_latest` writes (the library's own HTTP handlers answer with it too).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Seconds: from a cached vector (microseconds) to a request near the statement timeout.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The metrics of one app; `render()` is the text `/metrics` answers."""

    def __init__(self, query_stats: Callable[[], tuple[QueryVectorStats, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ep_search_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ep_search_request_duration_seconds",
            "Time to answer a request, by route template",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ep_search_requests_in_flight", "Requests being answered", registry=self.registry
        )
        self.embedding = Histogram(
            "ep_search_query_embedding_seconds",
            "Time to a query's vector: cache, queue and model",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.database = Histogram(
            "ep_search_database_seconds",
            "Time in the database per request (connection, statements), by route template",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_QueryVectorCollector(query_stats))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueryVectorCollector(Collector):
    """The query vector pool's counts, read when scraped."""

    def __init__(self, query_stats: Callable[[], tuple[QueryVectorStats, int]]) -> None:
        self.query_stats = query_stats

    def collect(self) -> Iterator[Metric]:
        stats, cached = self.query_stats()
        vectors = CounterMetricFamily(
            "ep_search_query_vectors",
            "Query vectors served, by source: cache, shared (an identical query in flight), model",
            labels=["source"],
        )
        vectors.add_metric(["cache"], stats.cache_hits)
        vectors.add_metric(["shared"], stats.shared)
        vectors.add_metric(["model"], stats.embedded)
        yield vectors
        calls = CounterMetricFamily(
            "ep_search_query_model_calls", "Calls to the model that embedded queries"
        )
        calls.add_metric([], stats.model_calls)
        yield calls
        entries = GaugeMetricFamily("ep_search_query_cache_entries", "Query vectors cached")
        entries.add_metric([], cached)
        yield entries
