"""`GET /metrics`: the server's counters, gauges and latency histograms in Prometheus text format.

Each app has its own `CollectorRegistry` (not prometheus_client's global one), so several servers in
one process (tests, benchmarks) never share or collide on a metric. What is counted:

* `llmcli_requests_total{path, status}`: every HTTP response, by route and status code (refusals
  before any route, 4xx for malformed bodies, 499 for clients that went away, included);
* `llmcli_running_sequences`, `llmcli_waiting_sequences`: the engine's load at scrape time;
* `llmcli_kv_cache_slots_used` / `_total` and `llmcli_kv_cache_tokens` (token positions the running
  sequences hold), `llmcli_kv_cache_usage_ratio` (blocks held / blocks for a paged cache, else
  tokens / (slots x context));
* a paged cache's `llmcli_kv_cache_blocks_used` / `_total`, the prefix cache's
  `llmcli_prefix_cache_hit_ratio` (prompt tokens found cached / looked up, since the start; the two
  counts as `llmcli_prefix_cache_hit_tokens` and `_queried_tokens`) and `llmcli_preemptions`
  (sequences preempted for blocks, since the start);
* `llmcli_time_to_first_token_seconds` (from the request's arrival to its first token) and
  `llmcli_inter_token_latency_seconds` (between a sequence's consecutive tokens) histograms;
* `llmcli_generation_tokens_total` and `llmcli_prompt_tokens_total`: tokens/s is
  `rate(llmcli_generation_tokens_total[1m])`;
* with speculative decoding, `llmcli_speculative_proposed_tokens_total` and
  `llmcli_speculative_accepted_tokens_total` (guesses made and kept) and
  `llmcli_speculative_acceptance_ratio` (kept / made since the start).

Histograms are observed on the engine thread, counters on the event loop: prometheus_client's
metrics are thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
CONTENT_TYPE = CONTENT_TYPE_LATEST
GAUGES = (  # (metric, what it reads off the engine loop's published stats (engine_loop.LoopStats), help)
    ("llmcli_running_sequences", lambda s: s.running, "Sequences decoding now"),
    ("llmcli_waiting_sequences", lambda s: s.waiting, "Sequences queued for a slot"),
    ("llmcli_kv_cache_slots_used", lambda s: s.cache.slots_used, "KV cache slots held by running sequences"),
    ("llmcli_kv_cache_slots_total", lambda s: s.cache.slots_total, "KV cache slots"),
    ("llmcli_kv_cache_tokens", lambda s: s.cache.tokens, "Token positions the running sequences hold in the KV cache"),
    ("llmcli_kv_cache_usage_ratio", lambda s: s.cache.usage,
     "KV cache blocks held / blocks (slot cache: tokens / capacity)"),
    ("llmcli_kv_cache_blocks_used", lambda s: s.cache.blocks_used, "Paged KV cache blocks held by running sequences"),
    ("llmcli_kv_cache_blocks_total", lambda s: s.cache.blocks_total, "Paged KV cache blocks"),
    ("llmcli_prefix_cache_hit_ratio", lambda s: s.cache.prefix_hit_rate,
     "Prompt tokens found in the prefix cache / looked up"),
    ("llmcli_prefix_cache_hit_tokens", lambda s: s.cache.prefix_hit_tokens,
     "Prompt tokens found in the prefix cache, since start"),
    ("llmcli_prefix_cache_queried_tokens", lambda s: s.cache.prefix_queried_tokens,
     "Prompt tokens looked up, since start"),
    ("llmcli_preemptions", lambda s: s.cache.preemptions, "Sequences preempted for lack of KV blocks, since start"),
)


class ServerMetrics:
    """One server's Prometheus metrics, in a registry of its own."""

    def __init__(self, speculative: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._watching = False
        if speculative:
            self._speculative_counters()
        self.requests = Counter("llmcli_requests", "HTTP responses by route and status code",
                                ("path", "status"), registry=r)
        self.generated = Counter("llmcli_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("llmcli_prompt_tokens", "Prompt tokens submitted to the engine", registry=r)
        self.ttft = Histogram("llmcli_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmcli_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)

    def _speculative_counters(self) -> None:
        r, self._made, self._kept = self.registry, 0, 0
        self.proposed = Counter("llmcli_speculative_proposed_tokens", "Tokens proposed by speculative decoding",
                                registry=r)
        self.accepted = Counter("llmcli_speculative_accepted_tokens", "Proposed tokens the model accepted",
                                registry=r)
        Gauge("llmcli_speculative_acceptance_ratio", "Accepted / proposed tokens since the start",
              registry=r).set_function(lambda: self._kept / self._made if self._made else 0.0)

    def speculated(self, proposed: int, accepted: int) -> None:
        """One engine step's speculative guesses made and kept (engine thread)."""
        self._made, self._kept = self._made + proposed, self._kept + accepted
        self.proposed.inc(proposed)
        self.accepted.inc(accepted)

    def watch(self, load: Callable[[], Any]) -> None:
        """Gauges read from `load()` (the engine loop's published LoopStats) at every scrape; once per registry."""
        if self._watching:
            return
        self._watching = True
        for name, read, help in GAUGES:  # a slot cache has no blocks: those read 0
            Gauge(name, help, registry=self.registry).set_function(lambda read=read: float(read(load()) or 0))

    def response(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TokenClock:
    """Per-sequence token times on the engine thread: TTFT at the first token, ITL after it."""

    def __init__(self, metrics: ServerMetrics | None):
        self.metrics = metrics
        self._last: dict[int, float] = {}

    def token(self, rid: int, arrived: float, finished: bool) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        last = self._last.pop(rid, None)
        if last is None:
            self.metrics.ttft.observe(now - arrived)
        else:
            self.metrics.itl.observe(now - last)
        if not finished:
            self._last[rid] = now
        self.metrics.generated.inc()

    def forget(self, rid: int) -> None:
        self._last.pop(rid, None)
