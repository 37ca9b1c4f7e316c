"""Inference engines and the factory that picks one for a model spec."""

from __future__ import annotations

from maas.mesh.errors import InvalidArgument
from maas.services.worker.engines.base import Engine, ModelSpec

__all__ = ["create_engine", "engine_kind", "ENGINES"]

ENGINES = ("hf", "vllm")


def engine_kind(spec: ModelSpec) -> str:
    """Which engine serves an hf model version: its option `engine` (`maas worker --engine`
    fills it in for generative versions that name none), else the built-in one."""
    kind = spec.options.get("engine") or "hf"
    if kind not in ENGINES:
        raise InvalidArgument(f"option engine must be one of {', '.join(ENGINES)}, got {kind!r}", field="engine")
    return kind


def create_engine(spec: ModelSpec, *, own_process: bool = True) -> Engine:
    """The engine for `spec.format`: "hf" (transformers, or vLLM by `engine_kind`) or "sim"
    (simulator).

    A generative HF model runs in a process of its own (`process.ProcessEngine`) unless
    `own_process` is false. The HF engine is imported only when asked for, so sim-only
    workers never pay for importing torch and transformers.
    """
    if spec.format == "hf" and engine_kind(spec) == "vllm":
        # always a process of its own (own_process or not): vLLM sets process-wide state, and
        # its engine's loop must be free for seconds at a time while it closes
        from maas.services.worker.engines.process import ProcessEngine

        return ProcessEngine(spec)
    if spec.format == "hf" and spec.task == "embed":
        from maas.services.worker.engines.embed import EmbedEngine

        return EmbedEngine(spec)
    if spec.format == "hf" and own_process:
        from maas.services.worker.engines.process import ProcessEngine

        return ProcessEngine(spec)
    if spec.format == "hf":
        from maas.services.worker.engines.hf import HFEngine

        return HFEngine(spec)
    if spec.format == "sim":
        from maas.services.worker.engines.sim import SimEngine

        return SimEngine(spec)
    raise InvalidArgument(f"unknown model format {spec.format!r}: expected 'hf' or 'sim'", field="format")
