"""protobuf <-> engine domain types, with validation that names the bad field."""

from __future__ import annotations

from maas.mesh.errors import InvalidArgument
from maas.mesh.logs import new_request_id
from maas.mesh.service_classes import priority
from maas.services.worker.engines.base import (
    AdapterRef,
    Delta,
    GenerationRequest,
    GuideSpec,
    SamplingParams,
    TokenLogprob,
)
from maas.v1 import common_pb2, inference_pb2

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    kwargs: dict[str, object] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "logprobs", "prompt_logprobs"):
        if p.HasField(name):
            kwargs[name] = getattr(p, name)
    if p.HasField("guide"):
        kind = p.guide.WhichOneof("kind")
        if kind is None or (kind == "json_object" and not p.guide.json_object):
            raise InvalidArgument("guide is set but names no grammar", field="guide")
        kwargs["guide"] = GuideSpec(kind, "" if kind == "json_object" else getattr(p.guide, kind))
    return SamplingParams(stop=tuple(p.stop), ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, min_p=p.min_p,
                          stop_token_ids=tuple(p.stop_token_ids), **kwargs)  # type: ignore[arg-type]


def request_from_proto(r: inference_pb2.GenerateRequest, adapter: AdapterRef | None = None, *,
                       stream: bool = True) -> GenerationRequest:
    return GenerationRequest(request_id=r.request_id or new_request_id(), prompt=r.prompt,
                             prompt_token_ids=tuple(r.prompt_token_ids),
                             params=sampling_from_proto(r.params),
                             resume_token_ids=tuple(r.resume_token_ids), adapter=adapter,
                             tenant=r.tenant, weight=r.tenant_weight if r.tenant_weight > 0 else 1.0,
                             priority=priority(r.service_class), reserved=r.reserved,
                             reserved_rate=r.reserved_tokens_per_s, stream=stream)


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    texts = lp.top_tokens or ("",) * len(lp.top)
    return common_pb2.TokenLogprob(
        token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, token=text, logprob=v)
             for (t, v), text in zip(lp.top, texts, strict=True)])


def chunk_from_delta(delta: Delta, *, request_id: str, model: str, replica_id: str) -> inference_pb2.GenerateChunk:
    chunk = inference_pb2.GenerateChunk(request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                                        model=model, replica_id=replica_id)
    chunk.logprobs.extend(logprob_to_proto(lp) for lp in delta.logprobs)
    if delta.prompt_token_ids:
        chunk.prompt_token_ids.extend(delta.prompt_token_ids)
        chunk.prompt_logprobs.extend(logprob_to_proto(lp) for lp in delta.prompt_logprobs)
    if delta.finish_reason is not None:
        chunk.finish_reason = FINISH[delta.finish_reason]
        chunk.usage.prompt_tokens = delta.prompt_tokens
        chunk.usage.completion_tokens = delta.completion_tokens
        chunk.usage.cached_prompt_tokens = delta.cached_prompt_tokens
    return chunk
