"""Engine for Hugging Face `transformers` causal LMs, one request at a time.

Decoding runs token by token with a KV cache in a worker thread, so the event loop
never blocks; deltas travel back through an asyncio queue. An asyncio lock keeps one
request on the model at a time (continuous batching comes later).

Spec options (strings): `dtype` (`float32`, `bfloat16`, `float16`; by default
float32 on CPU and bfloat16, or float16 where unsupported, on CUDA) and
`context_length` (lowers the model's own limit).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from maas.mesh.errors import EngineDead, FailedPrecondition, InvalidArgument, MaasError
from maas.services.worker.engines.base import Delta, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.sampling import request_seed, sample_next_token
from maas.services.worker.engines.text import DeltaAssembler, IncrementalDetokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class _Job:
    """Everything the decode thread needs for one request."""

    request_id: str
    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    resumed_ids: list[int]


class HFEngine:
    """A `transformers` causal LM loaded from `spec.source` with `from_pretrained`."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.context_length = 0
        self._model: PreTrainedModel | None = None
        self._tokenizer: Any = None
        self._device = self._parse_device(spec.device)
        self._eos_ids: frozenset[int] = frozenset()
        self._keep_last_logits = False
        self._load_lock = asyncio.Lock()
        self._run_lock = asyncio.Lock()

    @staticmethod
    def _parse_device(device: str) -> torch.device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise InvalidArgument(f"unknown device {device!r}", field="device") from None
        if parsed.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"unsupported device {device!r}: use cpu or cuda:N", field="device")
        return parsed

    def _dtype(self) -> torch.dtype:
        name = self.spec.options.get("dtype")
        if name is not None:
            if name not in _DTYPES:
                raise InvalidArgument(
                    f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}", field="dtype"
                )
            return _DTYPES[name]
        if self._device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    async def load(self) -> None:
        async with self._load_lock:
            if self._model is None:
                await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        spec, dtype = self.spec, self._dtype()
        source = spec.source
        log.info("loading %s v%d from %s on %s (%s)", spec.name, spec.version, source, self._device, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            model.to(self._device).eval()  # type: ignore[arg-type]
        except Exception as exc:
            raise EngineDead(f"cannot load model {self.spec.name} from {source}: {exc}") from exc

        context = getattr(model.config, "max_position_embeddings", None) or _DEFAULT_CONTEXT
        if (cap := self.spec.options.get("context_length")) is not None:
            if not cap.isdigit() or int(cap) < 2:
                raise InvalidArgument(
                    f"context_length must be an integer >= 2, got {cap!r}", field="context_length"
                )
            context = min(context, int(cap))
        eos: set[int] = set()
        generation_config = getattr(model, "generation_config", None)
        for ids in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            eos.update([ids] if isinstance(ids, int) else ids or ())
        self._eos_ids = frozenset(eos)
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._tokenizer, self._model, self.context_length = tokenizer, model, int(context)

    async def close(self) -> None:
        async with self._load_lock:
            if self._model is None:
                return
            self._model = self._tokenizer = None
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's deltas; the engine is held until the stream ends or closes."""
        async with self._run_lock:
            job = await asyncio.to_thread(self._prepare, request)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
            stop = threading.Event()

            def emit(item: Delta | BaseException) -> None:
                if not stop.is_set():
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            worker = asyncio.ensure_future(asyncio.to_thread(self._decode, job, emit, stop))
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        return
            finally:
                # Closed, cancelled or finished: stop the thread and let it end its step.
                stop.set()
                await worker

    def _prepare(self, request: GenerationRequest) -> _Job:
        """Tokenize and validate (in a thread: long prompts take a while)."""
        if self._model is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        prompt_ids = list(self._tokenizer(request.prompt)["input_ids"])
        resumed = list(request.resume_token_ids)
        vocab = int(self._model.get_input_embeddings().num_embeddings)  # type: ignore[arg-type]
        if any(not 0 <= t < vocab for t in resumed):
            raise InvalidArgument(
                "resume_token_ids holds ids outside the vocabulary", field="resume_token_ids"
            )
        total = len(prompt_ids) + len(resumed)
        if total >= self.context_length:
            raise InvalidArgument(
                f"prompt is {total} tokens but the context of {self.spec.name} is {self.context_length}",
                field="prompt",
            )
        return _Job(request.request_id, request.params, request_seed(request.params), prompt_ids, resumed)

    def _decode(
        self, job: _Job, emit: Callable[[Delta | BaseException], None], stop: threading.Event
    ) -> None:
        """Thread body: run the decode loop, reporting any failure as EngineDead."""
        try:
            with torch.inference_mode():
                self._decode_loop(job, emit, stop)
        except MaasError as exc:
            emit(exc)
        except Exception as exc:
            log.exception("generation failed for request %s", job.request_id)
            dead = EngineDead(f"model {self.spec.name} failed during generation: {exc}")
            dead.__cause__ = exc
            emit(dead)

    def _decode_loop(
        self, job: _Job, emit: Callable[[Delta | BaseException], None], stop: threading.Event
    ) -> None:
        model, params = self._model, job.params
        if model is None:
            raise EngineDead(f"model {self.spec.name} was closed")
        output = list(job.resumed_ids)
        detok = IncrementalDetokenizer(self._tokenizer, context_ids=job.prompt_ids + output)
        out = DeltaAssembler(params.stop, prompt_tokens=len(job.prompt_ids), completion_tokens=len(output))
        if len(output) >= params.max_tokens:
            emit(out.finish("length"))
            return
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        inputs = torch.tensor([job.prompt_ids + output], device=self._device)
        cache = None
        while not stop.is_set():
            result = model(input_ids=inputs, past_key_values=cache, use_cache=True, **extra)
            cache = result.past_key_values
            token = sample_next_token(
                result.logits[0, -1], params, seed=job.seed, prompt_ids=job.prompt_ids, output_ids=output
            )
            output.append(token)
            if token in self._eos_ids and not params.ignore_eos:
                out.add(token, "")
                emit(out.finish("stop", detok.flush()))
                return
            out.add(token, detok.push(token))
            if out.stopped:
                emit(out.finish("stop"))
                return
            if len(output) >= params.max_tokens or len(job.prompt_ids) + len(output) >= self.context_length:
                emit(out.finish("length", detok.flush()))
                return
            if (delta := out.take(text_complete=not detok.pending)) is not None:
                emit(delta)
            inputs = torch.tensor([[token]], device=self._device)
