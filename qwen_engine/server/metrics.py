"""Prometheus metrics for the server, each app on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, async_engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen_engine_requests", "Finished requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("qwen_engine_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwen_engine_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qwen_engine_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwen_engine_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        engine = async_engine.engine
        Gauge("qwen_engine_requests_running", "Sequences in the running batch",
              registry=r).set_function(lambda: async_engine.num_running)
        Gauge("qwen_engine_requests_waiting", "Sequences waiting to be scheduled",
              registry=r).set_function(lambda: async_engine.num_waiting)
        Gauge("qwen_engine_kv_blocks_used", "KV cache blocks in use",
              registry=r).set_function(lambda: engine.blocks.num_used)
        Gauge("qwen_engine_kv_blocks_total", "KV cache blocks in the pool",
              registry=r).set_function(lambda: engine.blocks.num_blocks)
        Gauge("qwen_engine_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens",
              registry=r).set_function(lambda: engine.blocks.hits / engine.blocks.queries if engine.blocks.queries else 0.0)
        Gauge("qwen_engine_preemptions", "Sequences preempted so far",
              registry=r).set_function(lambda: engine.scheduler.num_preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
