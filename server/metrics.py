"""Prometheus metrics (DESIGN section 6). The label `exit_layer` is the request's fixed exit
layer as a string, "dynamic" for the confidence policy or "speculative"."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from engine.speculative import MAX_DRAFT_TOKENS

disable_created_metrics()  # the *_created series only add noise to dashboards

# A small model's tokens take milliseconds: start near 0.5 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                   1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    def __init__(self, num_layers: int, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.request_latency = Histogram(
            "bitskip_request_latency_seconds", "End-to-end latency of a request", ["exit_layer"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "bitskip_time_to_first_token_seconds", "Arrival to first generated token", ["exit_layer"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "bitskip_inter_token_latency_seconds", "Time between consecutive tokens of a request",
            ["exit_layer"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter(
            "bitskip_generated_tokens", "Generated tokens", ["exit_layer"], registry=r)
        self.token_exit_layer = Histogram(
            "bitskip_token_exit_layer", "Exit layer each generated token ran to",
            buckets=tuple(range(1, num_layers + 1)), registry=r)
        self.requests_running = Gauge("bitskip_requests_running", "Requests in the running batch", registry=r)
        self.requests_waiting = Gauge("bitskip_requests_waiting", "Requests waiting to start", registry=r)
        self.kv_cache_usage = Gauge("bitskip_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.requests = Counter("bitskip_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.rejected = Counter("bitskip_rejected_requests", "Requests refused before running", ["reason"],
                                registry=r)
        self.step_seconds = Histogram("bitskip_engine_step_seconds", "Duration of one engine step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.deferred_kv_fills = Counter(
            "bitskip_deferred_kv_fills", "Token-blocks computed late to fill the KV of tokens that exited early",
            registry=r)
        self.speculative_draft_tokens = Counter(
            "bitskip_speculative_draft_tokens", "Tokens drafted at the shallow exit and verified",
            ["draft_exit_layer"], registry=r)
        self.speculative_accepted_tokens = Counter(
            "bitskip_speculative_accepted_tokens", "Drafted tokens the full model agreed with",
            ["draft_exit_layer"], registry=r)
        self.speculative_acceptance_length = Histogram(
            "bitskip_speculative_acceptance_length", "Drafts accepted in one verified round",
            ["draft_exit_layer"], buckets=tuple(range(MAX_DRAFT_TOKENS + 1)), registry=r)
        self.preemptions = Counter("bitskip_preemptions", "Sequences preempted for lack of KV blocks",
                                   registry=r)

    def observe_round(self, draft_exit_layer: int, drafted: int, accepted: int) -> None:
        label = str(draft_exit_layer)
        self.speculative_draft_tokens.labels(label).inc(drafted)
        self.speculative_accepted_tokens.labels(label).inc(accepted)
        self.speculative_acceptance_length.labels(label).observe(accepted)

    def observe_tokens(self, exit_label: str, exit_layers: list[int]) -> None:
        self.generated_tokens.labels(exit_label).inc(len(exit_layers))
        for k in exit_layers:
            self.token_exit_layer.observe(k)
