"""The engine's series also appear under vLLM's names (engines/metrics.py), labelled as
vLLM labels them, for dashboards and autoscalers built for vLLM."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from maas.services.worker.engines import metrics


def _lines() -> dict[str, float]:
    out = {}
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("vllm:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_the_engines_series_have_vllms_names_and_labels() -> None:
    model = "vllm-names@1"
    metrics.RUNNING.labels(model).set(3)
    metrics.WAITING.labels(model).set(2)
    metrics.KV_USAGE.labels(model).set(0.25)
    metrics.TOKENS.labels(model).inc(10)
    metrics.PROMPT_TOKENS.labels(model).inc(7)
    metrics.TTFT.labels(model).observe(0.02)
    metrics.FINISHED.labels(model, "stop").inc()
    metrics.FINISHED.labels(model, "cancelled").inc()
    got = _lines()
    label = f'{{model_name="{model}"}}'
    assert got[f"vllm:num_requests_running{label}"] == 3
    assert got[f"vllm:num_requests_waiting{label}"] == 2
    assert got[f"vllm:kv_cache_usage_perc{label}"] == 0.25
    assert got[f"vllm:generation_tokens_total{label}"] == 10
    assert got[f"vllm:prompt_tokens_total{label}"] == 7
    assert got[f"vllm:time_to_first_token_seconds_count{label}"] == 1
    assert got[f'vllm:request_success_total{{finished_reason="stop",model_name="{model}"}}'] == 1
    assert not any("cancelled" in name for name in got)  # vLLM counts successes only
