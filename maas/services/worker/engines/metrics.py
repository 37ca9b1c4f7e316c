"""Prometheus metrics of the inference engines (label: model).

They live in a registry of their own, `ENGINE`, exposed on the process-wide one through
`EngineMetrics`, which also merges in the latest snapshot of every engine running in a
process of its own (`maas.services.worker.engines.process`): the worker's /metrics shows
each engine's series the same way wherever the engine runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

ENGINE = CollectorRegistry(auto_describe=True)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TTFT = Histogram("maas_engine_time_to_first_token_seconds", "Time from arrival to the first token.",
                 ["model"], buckets=_LATENCY, registry=ENGINE)
ITL = Histogram("maas_engine_inter_token_latency_seconds", "Time between two tokens of one sequence.",
                ["model"], buckets=_LATENCY, registry=ENGINE)
E2E = Histogram("maas_engine_request_duration_seconds", "Time from arrival to the last token.",
                ["model"], buckets=_LATENCY, registry=ENGINE)
QUEUE = Histogram("maas_engine_queue_time_seconds", "Time a request waited for admission.",
                  ["model"], buckets=_LATENCY, registry=ENGINE)
BATCH = Histogram("maas_engine_batch_size", "Sequences decoded together in one step.", ["model"],
                  buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256), registry=ENGINE)
RUNNING = Gauge("maas_engine_running_sequences", "Sequences in the running batch.", ["model"], registry=ENGINE)
WAITING = Gauge("maas_engine_waiting_sequences", "Requests queued for admission.", ["model"], registry=ENGINE)
KV_USAGE = Gauge("maas_engine_kv_cache_usage_ratio", "Reserved share of the KV-cache budget.", ["model"],
                 registry=ENGINE)
TOKENS = Counter("maas_engine_generated_tokens_total", "Tokens generated.", ["model"], registry=ENGINE)
PROMPT_TOKENS = Counter("maas_engine_prompt_tokens_total", "Prompt tokens of admitted requests.", ["model"],
                        registry=ENGINE)
CACHED_TOKENS = Counter("maas_engine_prefix_cache_hit_tokens_total",
                        "Prompt tokens whose KV came from the prefix cache instead of being computed.", ["model"],
                        registry=ENGINE)
FINISHED = Counter("maas_engine_requests_total", "Finished requests by finish reason.", ["model", "finish_reason"],
                   registry=ENGINE)
REJECTED = Counter("maas_engine_rejected_requests_total", "Requests refused because the queue was full.",
                   ["model"], registry=ENGINE)
PREEMPTIONS = Counter("maas_engine_preemptions_total",
                      "Running sequences pre-empted so that another tenant gets its fair share of the batch "
                      "(they resume where they were).", ["model"], registry=ENGINE)
TENANT_QUEUE = Histogram("maas_engine_tenant_queue_time_seconds", "Time a request waited for admission, by tenant.",
                         ["model", "tenant"], buckets=_LATENCY, registry=ENGINE)
TENANT_TOKENS = Counter("maas_engine_tenant_generated_tokens_total", "Tokens generated, by tenant (its share).",
                        ["model", "tenant"], registry=ENGINE)


def snapshot() -> list[Metric]:
    """This process's engine series (what an engine process sends its worker)."""
    return list(ENGINE.collect())


class EngineMetrics(Collector):
    """This process's engine metrics plus the latest snapshot of each engine process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._remote: dict[object, list[Metric]] = {}

    def update(self, owner: object, families: list[Metric]) -> None:
        with self._lock:
            self._remote[owner] = families

    def forget(self, owner: object) -> None:
        """An engine process ended: its series leave /metrics (as an unloaded engine's gauges
        stop changing in process; counters restart from zero with a new engine process)."""
        with self._lock:
            self._remote.pop(owner, None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            remote = [family for families in self._remote.values() for family in families]
        for family in ENGINE.collect():
            # samples of one series from several sources (two replicas of a model@version on
            # one worker) are summed, as the engines in one process share one series
            merged: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
            for sample in [*family.samples, *(s for other in remote if other.name == family.name
                                               for s in other.samples)]:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = merged.get(key)
                if seen is None or sample.name.endswith("_created"):
                    merged[key] = sample if seen is None else seen
                else:
                    merged[key] = seen._replace(value=seen.value + sample.value)
            family.samples = list(merged.values())
            yield family
            if family.name in VLLM_NAMES:
                yield _as_vllm(family)


# The same series under vLLM's names (its V1 engine's), for the dashboards, autoscalers
# (KEDA, llm-d, the production-stack's) and alerts operators already have: labelled
# `model_name` as vLLM's are. A counter's family name is without `_total`, as the client
# library collects it.
VLLM_NAMES = {
    "maas_engine_running_sequences": "vllm:num_requests_running",
    "maas_engine_waiting_sequences": "vllm:num_requests_waiting",
    "maas_engine_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
    "maas_engine_prompt_tokens": "vllm:prompt_tokens",
    "maas_engine_generated_tokens": "vllm:generation_tokens",
    "maas_engine_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "maas_engine_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "maas_engine_request_duration_seconds": "vllm:e2e_request_latency_seconds",
    "maas_engine_queue_time_seconds": "vllm:request_queue_time_seconds",
    "maas_engine_preemptions": "vllm:num_preemptions",
    "maas_engine_requests": "vllm:request_success",  # finished with stop or length
}


def _as_vllm(family: Metric) -> Metric:
    name = VLLM_NAMES[family.name]
    copy = Metric(name, f"{family.documentation} (vLLM's name)", family.type)
    for sample in family.samples:
        labels = {("model_name" if k == "model" else "finished_reason" if k == "finish_reason" else k): v
                  for k, v in sample.labels.items()}
        if name == "vllm:request_success" and labels.get("finished_reason") not in ("stop", "length"):
            continue
        copy.samples.append(sample._replace(name=name + sample.name[len(family.name):], labels=labels))
    return copy


MERGED = EngineMetrics()
REGISTRY.register(MERGED)
