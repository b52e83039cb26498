"""Prometheus metrics of the server, kept by hand (no client library): counters and histograms."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    """Thread-safe counters; `render` gives the Prometheus text exposition format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.http: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generations = 0
        self.request_latency = _Histogram(LATENCY_BUCKETS)
        self.ttft = _Histogram(LATENCY_BUCKETS)

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ("/", "/health", "/metrics", "/tokenize", "/detokenize", "/apply-template") or \
            path.startswith("/v1/") else "other"
        with self.lock:
            self.http[(route, status)] += 1

    def submitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def finished(self, generated: int, seconds: float, ttft: float | None) -> None:
        with self.lock:
            self.generated_tokens += generated
            self.generations += 1
            self.request_latency.observe(seconds)
            if ttft is not None:
                self.ttft.observe(ttft)

    def render(self, running: int, waiting: int) -> str:
        with self.lock:
            lines = ["# HELP chatsmith_http_requests_total HTTP requests by route and status",
                     "# TYPE chatsmith_http_requests_total counter"]
            lines += [f'chatsmith_http_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.http.items())]
            lines += ["# HELP chatsmith_prompt_tokens_total prompt tokens submitted to the engine",
                      "# TYPE chatsmith_prompt_tokens_total counter", f"chatsmith_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP chatsmith_generation_tokens_total tokens generated",
                      "# TYPE chatsmith_generation_tokens_total counter",
                      f"chatsmith_generation_tokens_total {self.generated_tokens}",
                      "# HELP chatsmith_generations_total generation requests finished",
                      "# TYPE chatsmith_generations_total counter", f"chatsmith_generations_total {self.generations}",
                      "# HELP chatsmith_requests_running sequences decoding now",
                      "# TYPE chatsmith_requests_running gauge", f"chatsmith_requests_running {running}",
                      "# HELP chatsmith_queue_waiting requests waiting for a slot",
                      "# TYPE chatsmith_queue_waiting gauge", f"chatsmith_queue_waiting {waiting}"]
            lines += self.request_latency.render("chatsmith_request_seconds", "time from request to last token")
            lines += self.ttft.render("chatsmith_time_to_first_token_seconds", "time from request to first token")
        return "\n".join(lines) + "\n"
