"""`/metrics`: Prometheus metrics of one server, in a registry of its own (prometheus-client).

Counted as requests end: requests by status, prompt and generated tokens, time to first token and
inter-token latency. Read when scraped: queue depth, running requests, compute per stage and the
stages' KV use. Watched all along: how late the event loop runs a timer (`watch_loop`), which is
how long one request's work held it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...serving.generator import Generator

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_S = 10.0  # the window of "recent tokens/s"
LAG_TICK_S = 0.05  # the event loop's lag is sampled this often


class Metrics:
    def __init__(self, gen: Generator, stage_status):
        self.gen = gen
        self.stage_status = stage_status  # () -> the pipeline's status entries (cached by the caller)
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hetpipe_requests", "HTTP generation requests by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("hetpipe_prompt_tokens", "prompt tokens of requests run", registry=r)
        self.generated_tokens = Counter("hetpipe_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("hetpipe_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("hetpipe_inter_token_latency_seconds", "time between consecutive tokens of a stream",
                             registry=r, buckets=LATENCY_BUCKETS)
        engine = gen.engine
        Gauge("hetpipe_queue_depth", "requests waiting to be scheduled", registry=r).set_function(
            lambda: engine.load()[0])
        Gauge("hetpipe_running_requests", "requests being run", registry=r).set_function(
            lambda: engine.load()[1])
        Gauge("hetpipe_kv_tokens_reserved", "KV tokens the scheduler holds for running requests",
              registry=r).set_function(lambda: engine.load()[2])
        self.loop_lag = Histogram("hetpipe_event_loop_lag_seconds", "how late the event loop ran a timer due now",
                                  registry=r, buckets=LATENCY_BUCKETS)
        self.max_loop_lag_s = 0.0
        Gauge("hetpipe_event_loop_lag_max_seconds", "the longest the event loop was held, since start",
              registry=r).set_function(lambda: self.max_loop_lag_s)
        self._watching = False
        r.register(_StageCollector(self))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def watch_loop(self) -> None:
        """Sample, from now on, how late the running event loop runs a timer (idempotent)."""
        if self._watching:
            return
        self._watching = True
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            now = loop.time()
            lag = max(0.0, now - due)
            self.loop_lag.observe(lag)
            self.max_loop_lag_s = max(self.max_loop_lag_s, lag)
            loop.call_at(now + LAG_TICK_S, tick, now + LAG_TICK_S)

        loop.call_at(loop.time() + LAG_TICK_S, tick, loop.time() + LAG_TICK_S)

    def token(self, gap_s: float | None) -> None:
        """A token went out (`gap_s`: since the stream's previous one)."""
        self.generated_tokens.inc()
        if gap_s is not None:
            self.itl.observe(gap_s)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, 1))
            self._trim(now)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RECENT_S

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StageCollector:
    """Per stage, when scraped: compute time summed over the steps run, and KV tokens in use."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self):
        return []  # collected fresh on every scrape; nothing to declare up front

    def collect(self):
        profile = self.m.gen.engine.profile
        compute = CounterMetricFamily("hetpipe_stage_compute_ms", "compute milliseconds per stage, all steps",
                                      labels=["stage"])
        steps = CounterMetricFamily("hetpipe_pipeline_steps", "micro-batches run through the pipeline")
        used = GaugeMetricFamily("hetpipe_kv_tokens_used", "KV cache tokens held per stage", labels=["stage"])
        cap = GaugeMetricFamily("hetpipe_kv_tokens_capacity", "KV cache budget per stage, tokens", labels=["stage"])
        cached = GaugeMetricFamily("hetpipe_kv_tokens_cached", "KV tokens in cached prefix blocks no request holds "
                                   "(reclaimable)", labels=["stage"])
        prefix = self.m.gen.engine.prefix
        hits = CounterMetricFamily("hetpipe_prompt_tokens_cached", "prompt tokens served by the prefix cache")
        hits.add_metric([], prefix.hit_tokens if prefix else 0)
        evicted = CounterMetricFamily("hetpipe_prefix_cache_evicted_blocks", "cached blocks evicted for room")
        evicted.add_metric([], prefix.evictions if prefix else 0)
        engine = self.m.gen.engine
        drafted = CounterMetricFamily("hetpipe_spec_draft_tokens", "speculative decoding: draft tokens verified")
        drafted.add_metric([], engine.drafted)
        accepted = CounterMetricFamily("hetpipe_spec_accepted_tokens", "speculative decoding: draft tokens taken")
        accepted.add_metric([], engine.accepted)
        status = self.m.stage_status()
        for i, s in enumerate(status):
            compute.add_metric([s.name], profile.stage_ms[i] if i < len(profile.stage_ms) else 0.0)
            if s.report is not None:
                used.add_metric([s.name], s.report.kv_tokens_used)
                cached.add_metric([s.name], s.report.kv_tokens_cached)
            budget = s.report.kv_tokens if s.report is not None else s.expected.kv_tokens if s.expected else None
            if budget is not None:
                cap.add_metric([s.name], budget)
        steps.add_metric([], profile.steps)
        yield from (compute, steps, used, cap, cached, hits, evicted, drafted, accepted)

