"""Prometheus metrics for one app.

Each app owns its own `CollectorRegistry` (tests build many apps in one process; the global registry would
refuse duplicate names). Other parts record through small methods so they never touch prometheus_client:
`metrics.rating()`, `metrics.comparison()`, `metrics.train_step(loss)`, `metrics.set_weight_version(v)`.
`GET /metrics` serves `render()`; `RequestMetrics` (ASGI middleware) counts every request by route and status.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loop_requests_total", "HTTP requests handled, by route and status",
                                ["route", "status"], registry=r)
        self.proxy_latency = Histogram("loop_proxy_latency_seconds", "Whole proxied request, vLLM included",
                                       ["endpoint", "stream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loop_proxy_ttft_seconds", "Time to the first streamed chunk", ["endpoint"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("loop_prompt_tokens_total", "Prompt tokens of stored responses", registry=r)
        self.tokens_out = Counter("loop_completion_tokens_total", "Completion tokens of stored responses",
                                  registry=r)
        self.responses = Counter("loop_responses_stored_total", "Response rows stored", ["truncated"], registry=r)
        self.ratings = Counter("loop_ratings_total", "Ratings stored", registry=r)
        self.comparisons = Counter("loop_comparisons_total", "Comparisons stored", registry=r)
        self.train_steps = Counter("loop_training_steps_total", "Training steps applied", registry=r)
        self.train_loss = Gauge("loop_training_loss", "Loss of the last training step", registry=r)
        self.weight_version = Gauge("loop_weight_version", "Live weight version", registry=r)
        self.vllm_up = Gauge("loop_vllm_up", "1 when vLLM answers /health", registry=r)
        self.vllm_restarts = Gauge("loop_vllm_restarts", "Restarts of the vLLM child so far", registry=r)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def proxied(self, endpoint: str, *, stream: bool, latency_s: float, ttft_s: float | None = None) -> None:
        self.proxy_latency.labels(endpoint, "true" if stream else "false").observe(latency_s)
        if ttft_s is not None:
            self.ttft.labels(endpoint).observe(ttft_s)

    def stored(self, prompt_tokens: int, completion_tokens: int, *, truncated: bool = False) -> None:
        self.tokens_in.inc(prompt_tokens)
        self.tokens_out.inc(completion_tokens)
        self.responses.labels("true" if truncated else "false").inc()

    def rating(self, n: int = 1) -> None:
        self.ratings.inc(n)

    def comparison(self, n: int = 1) -> None:
        self.comparisons.inc(n)

    def train_step(self, loss: float | None = None) -> None:
        self.train_steps.inc()
        if loss is not None:
            self.train_loss.set(loss)

    def set_weight_version(self, version: int) -> None:
        self.weight_version.set(version)

    def set_vllm(self, up: bool, restarts: int = 0) -> None:
        self.vllm_up.set(1 if up else 0)
        self.vllm_restarts.set(restarts)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: count every HTTP request by route template (not raw path: bounded labels) and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on the shared scope
            self.metrics.request(getattr(route, "path", None) or "unmatched", status)
