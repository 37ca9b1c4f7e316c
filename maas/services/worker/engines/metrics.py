"""Prometheus metrics of the inference engines (one process-wide registry; label: model)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TTFT = Histogram("maas_engine_time_to_first_token_seconds", "Time from arrival to the first token.",
                 ["model"], buckets=_LATENCY)
ITL = Histogram("maas_engine_inter_token_latency_seconds", "Time between two tokens of one sequence.",
                ["model"], buckets=_LATENCY)
E2E = Histogram("maas_engine_request_duration_seconds", "Time from arrival to the last token.",
                ["model"], buckets=_LATENCY)
QUEUE = Histogram("maas_engine_queue_time_seconds", "Time a request waited for admission.",
                  ["model"], buckets=_LATENCY)
BATCH = Histogram("maas_engine_batch_size", "Sequences decoded together in one step.", ["model"],
                  buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256))
RUNNING = Gauge("maas_engine_running_sequences", "Sequences in the running batch.", ["model"])
WAITING = Gauge("maas_engine_waiting_sequences", "Requests queued for admission.", ["model"])
KV_USAGE = Gauge("maas_engine_kv_cache_usage_ratio", "Reserved share of the KV-cache budget.", ["model"])
TOKENS = Counter("maas_engine_generated_tokens_total", "Tokens generated.", ["model"])
PROMPT_TOKENS = Counter("maas_engine_prompt_tokens_total", "Prompt tokens of admitted requests.", ["model"])
CACHED_TOKENS = Counter("maas_engine_prefix_cache_hit_tokens_total",
                        "Prompt tokens whose KV came from the prefix cache instead of being computed.", ["model"])
FINISHED = Counter("maas_engine_requests_total", "Finished requests by finish reason.", ["model", "finish_reason"])
REJECTED = Counter("maas_engine_rejected_requests_total", "Requests refused because the queue was full.",
                   ["model"])
