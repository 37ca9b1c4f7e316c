"""Embedding engine for encoder models (`task: embed`): mean pooling over the attention
mask, optionally L2-normalised. Batches run in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from maas.mesh.errors import EngineDead, FailedPrecondition, InvalidArgument
from maas.services.worker.engines.base import (
    WEIGHTS_LOCK,
    ChatMessage,
    Delta,
    EngineStats,
    GenerationRequest,
    ModelSpec,
)

log = logging.getLogger(__name__)

MAX_INPUTS = 256


class EmbedEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.context_length = 0
        self._device = torch.device(spec.device)
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()  # one batch at a time; requests queue here
        self._running = 0

    async def load(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        try:
            with WEIGHTS_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(self.spec.source)
                model = AutoModel.from_pretrained(self.spec.source).to(self._device).eval()
        except Exception as exc:
            raise EngineDead(f"cannot load model {self.spec.name} from {self.spec.source}: {exc}") from exc
        self.context_length = int(min(getattr(model.config, "max_position_embeddings", 512),
                                      getattr(tokenizer, "model_max_length", 512) or 512))
        self._tokenizer, self._model = tokenizer, model

    async def close(self) -> None:
        self._model = self._tokenizer = None

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        raise InvalidArgument(f"model {self.spec.name} is an embedding model: use Embed, not Generate",
                              field="model")

    async def generate(self, request: GenerationRequest) -> Any:
        raise InvalidArgument(f"model {self.spec.name} is an embedding model: use Embed, not Generate",
                              field="model")
        yield Delta("")  # pragma: no cover - makes this an async generator

    async def embed(self, inputs: list[str], *, normalize: bool = True) -> tuple[list[list[float]], int]:
        """Embeddings of `inputs` and the number of tokens they took."""
        if self._model is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        if not inputs:
            raise InvalidArgument("inputs must not be empty", field="inputs")
        if len(inputs) > MAX_INPUTS:
            raise InvalidArgument(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", field="inputs")
        if any(not text for text in inputs):
            raise InvalidArgument("inputs must not contain empty strings", field="inputs")
        async with self._lock:
            self._running += 1
            try:
                return await asyncio.to_thread(self._embed_sync, inputs, normalize)
            finally:
                self._running -= 1

    def _embed_sync(self, inputs: list[str], normalize: bool) -> tuple[list[list[float]], int]:
        batch = self._tokenizer(inputs, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self._device)
        try:
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
        except Exception as exc:
            raise EngineDead(f"model {self.spec.name} failed: {exc}") from exc
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu().tolist(), int(batch["attention_mask"].sum())
