"""Prometheus metrics of the server, kept with prometheus_client in a registry of the server's own.

HTTP requests are labelled by route template (one of the app's routes, or "other"), never by the
raw path: a client cannot grow the page or break its format by requesting made-up paths.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, gauges and histograms; `render` gives the Prometheus text format."""

    def __init__(self, routes: Iterable[str] = ()) -> None:
        self.routes = set(routes)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter("chatsmith_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.http_seconds = Histogram("chatsmith_http_request_duration_seconds",
                                      "time from receiving a request to the end of its response headers (streams: "
                                      "to the first byte)", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("chatsmith_prompt_tokens", "prompt tokens submitted to the engine", registry=r)
        self.prompt_tokens_cached = Counter("chatsmith_prompt_tokens_cached", "prompt tokens the prefix cache held "
                                            "(not prefilled again)", registry=r)
        self.generated_tokens = Counter("chatsmith_generation_tokens", "tokens generated", registry=r)
        self.generations = Counter("chatsmith_generations", "generation requests finished", registry=r)
        self.running = Gauge("chatsmith_requests_running", "sequences decoding now", registry=r)
        self.waiting = Gauge("chatsmith_queue_waiting", "requests waiting for a slot", registry=r)
        self.threads = Gauge("chatsmith_engine_threads", "threads the engine's steps use now (with the governor: "
                             "all of torch's, or 1 when that measured faster)", registry=r)
        self.thread_switches = Gauge("chatsmith_engine_thread_switches", "times the governor changed the engine's "
                                     "thread count", registry=r)
        self.request_seconds = Histogram("chatsmith_request_seconds", "time from request to last token",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chatsmith_time_to_first_token_seconds", "time from request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        # The response cache (chatsmith serve --cache): lookups by result, guard refusals by reason.
        self.cache_lookups = Counter("chatsmith_cache_lookups", "response cache lookups by result (exact, semantic, "
                                     "miss)", ["result"], registry=r)
        self.cache_refusals = Counter("chatsmith_cache_guard_refusals", "semantic matches the guard refused, by "
                                      "reason", ["reason"], registry=r)
        self.cache_stores = Counter("chatsmith_cache_stores", "responses stored in the cache", registry=r)
        self.cache_evictions = Counter("chatsmith_cache_evictions", "cache entries evicted (LRU or expired)",
                                       registry=r)
        self.moderation_checks = Counter("chatsmith_moderation_checks", "texts checked by the moderation gate, by "
                                         "where (request, answer, api)", ["where"], registry=r)
        self.moderation_flagged = Counter("chatsmith_moderation_flagged", "texts the moderation gate flagged, by where",
                                          ["where"], registry=r)

    def route(self, path: str) -> str:
        """The label of a request path: the route it belongs to, or "other"."""
        if path in self.routes:
            return path
        if path.startswith("/static/"):
            return "/static"
        return "other"

    def request(self, path: str, status: int, seconds: float) -> None:
        """Count one HTTP request and observe its latency."""
        route = self.route(path)
        self.http.labels(route=route, status=str(status)).inc()
        self.http_seconds.labels(route=route).observe(seconds)

    def submitted(self, prompt_tokens: int) -> None:
        """Prompt tokens sent to the engine."""
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, generated: int, seconds: float, ttft: float | None, cached: int = 0) -> None:
        """One generation finished: its tokens, its duration, its time to first token and the prompt
        tokens it took from the prefix cache."""
        self.generated_tokens.inc(generated)
        self.prompt_tokens_cached.inc(cached)
        self.generations.inc()
        self.request_seconds.observe(seconds)
        if ttft is not None:
            self.ttft.observe(ttft)

    def cache_lookup(self, result: str, refused: str | None = None) -> None:
        """One cache lookup: "exact", "semantic" or "miss" (with the guard's reason when it refused one)."""
        self.cache_lookups.labels(result=result).inc()
        if refused:
            self.cache_refusals.labels(reason=refused).inc()

    def cache_stored(self, evicted: int) -> None:
        """One response stored, `evicted` entries evicted to make room."""
        self.cache_stores.inc()
        if evicted:
            self.cache_evictions.inc(evicted)

    def moderated(self, where: str, checked: int, flagged: int) -> None:
        """Texts checked by the moderation gate at `where` and how many it flagged."""
        self.moderation_checks.labels(where=where).inc(checked)
        if flagged:
            self.moderation_flagged.labels(where=where).inc(flagged)

    def render(self, running: int, waiting: int, threads: int | None = None, switches: int = 0) -> bytes:
        """The Prometheus text exposition of every metric, with the engine's current occupancy and
        thread count (None: not known, e.g. vLLM)."""
        self.running.set(running)
        self.waiting.set(waiting)
        if threads is not None:
            self.threads.set(threads)
        self.thread_switches.set(switches)
        return generate_latest(self.registry)
