"""Prometheus metrics of one fusion pipeline (one Serve replica), exposed at GET /metrics of the HTTP ingress.

prometheus-client writes the text format; nothing here formats it by hand. Each pipeline owns its own registry
(no process-global state), so two pipelines in one process (tests) never share counters. With several replicas
each scrape reaches one of them: label or aggregate by the `replica` label (the pipeline's name).

    metrics = ServiceMetrics(pipeline_name, coordinator)   # gauges read the coordinator and its runners at scrape
    coordinator.observer = metrics                          # steps, first tokens, tokens, expert weights
    metrics.request_done("dlf_capital", "ok", api="http")   # once per request, with its final status
    body = metrics.render()                                 # bytes in the Prometheus text format
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SOLVER_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
WEIGHT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 5.0, 10.0)


class ServiceMetrics:
    """The pipeline's counters, histograms and gauges; also the Coordinator's observer (on_step, on_first_token,
    on_token). Unknown preset names are recorded as "unknown" so clients cannot grow the label set."""

    def __init__(self, replica: str, coordinator: Any = None, presets: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.presets = frozenset(presets) | {"custom"}
        r = self.registry
        lbl = {"replica": replica}
        self.requests = Counter(
            "logitfusion_requests", "Requests by preset, API and final status (ok or the error kind)",
            ["replica", "preset", "api", "status"], registry=r,
        )
        self.tokens = Counter(
            "logitfusion_generated_tokens", "Tokens generated, by preset", ["replica", "preset"], registry=r
        )
        self.ttft = Histogram(
            "logitfusion_time_to_first_token_seconds", "From admission to the request's first token",
            ["replica", "preset"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.step = Histogram(
            "logitfusion_step_seconds", "One decoding step of the whole batch (every model, fuse, sample)",
            ["replica"], buckets=LATENCY_BUCKETS_S, registry=r,
        ).labels(**lbl)
        self.solver = Histogram(
            "logitfusion_fusion_solve_seconds", "Fusing the models' log-probs and solving the expert weights, per step",
            ["replica"], buckets=SOLVER_BUCKETS_S, registry=r,
        ).labels(**lbl)
        self.weights = Histogram(
            "logitfusion_expert_weight", "The fusion weight (alpha) of each expert, per generated token",
            ["replica", "expert"], buckets=WEIGHT_BUCKETS, registry=r,
        )
        self.replica = replica
        self._queue = Gauge(
            "logitfusion_queue_depth", "Admitted requests waiting for a place in the batch", ["replica"], registry=r
        )
        self._inflight = Gauge(
            "logitfusion_requests_in_flight", "Requests running or waiting", ["replica"], registry=r
        )
        self._live = Gauge(
            "logitfusion_live_sequences", "Sequences (KV caches) each model worker holds", ["replica", "model"],
            registry=r,
        )
        if coordinator is not None:
            self.watch(coordinator)

    def watch(self, coordinator: Any) -> None:
        """Read the queue, the requests in flight and each worker's live sequences from ``coordinator`` at scrape."""
        batch = coordinator.limits.max_batch_size
        self._inflight.labels(replica=self.replica).set_function(lambda: len(coordinator.active_requests()))
        # The Decoder admits first come first served up to max_batch_size; the rest wait.
        self._queue.labels(replica=self.replica).set_function(
            lambda: max(0, len(coordinator.active_requests()) - batch)
        )
        for name, runner in coordinator.runners.items():
            self._live.labels(replica=self.replica, model=name).set_function(_live_count(runner))

    # ------------------------------------------------------------------------------------ the coordinator's observer

    def on_step(self, step_s: float, solve_s: float) -> None:
        self.step.observe(step_s)
        self.solver.observe(solve_s)

    def on_first_token(self, preset: str, ttft_s: float) -> None:
        self.ttft.labels(replica=self.replica, preset=self._preset(preset)).observe(ttft_s)

    def on_token(self, preset: str, experts: Sequence[str], alphas: Sequence[float]) -> None:
        self.tokens.labels(replica=self.replica, preset=self._preset(preset)).inc()
        for expert, alpha in zip(experts, alphas):
            self.weights.labels(replica=self.replica, expert=expert).observe(alpha)

    # ------------------------------------------------------------------------------------ requests

    def request_done(self, preset: str | None, status: str, api: str) -> None:
        """One finished request: status "ok" or the error kind (e.g. "invalid_argument", "resource_exhausted")."""
        self.requests.labels(replica=self.replica, preset=self._preset(preset), api=api, status=status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _preset(self, name: str | None) -> str:
        return name if name in self.presets else "unknown"


def _live_count(runner: Any):
    def count() -> float:
        try:
            return float(len(runner.sequences()))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one worker is down
            logger.debug("live sequences of %s unavailable: %s", getattr(runner, "name", runner), exc)
            return float("nan")

    return count
