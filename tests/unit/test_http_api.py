"""The HTTP API without a server: the error mapping, parameter mapping, stream shapes, OpenAPI."""

from __future__ import annotations

import grpc
import pytest

from maas.mesh.errors import (
    InvalidArgument,
    MaasError,
    NotFound,
    ResourceExhausted,
    StartupError,
    Unauthenticated,
)
from maas.services.router import openai_api, openapi
from maas.services.router.http import HTTP_STATUS, HttpApi, HttpError, _error
from maas.v1 import common_pb2, inference_pb2


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.OUT_OF_RANGE, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.CANCELLED, 499), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
])
def test_every_code_has_its_status(code: grpc.StatusCode, status: int) -> None:
    err = MaasError("nope", field="x")
    err.code = code
    got, body, _ = _error(err)
    assert got == status == HTTP_STATUS[code][0]
    assert body == {"error": {"message": "nope", "type": HTTP_STATUS[code][1], "param": "x",
                              "code": code.name.lower()}}


def test_retry_after_is_a_whole_number_of_seconds() -> None:
    status, body, headers = _error(ResourceExhausted("slow down", retry_after=0.2))
    assert (status, headers) == (429, {"Retry-After": "1"})
    assert _error(ResourceExhausted("slow down"))[2] == {}


def test_unexpected_errors_are_500_without_detail(caplog: pytest.LogCaptureFixture) -> None:
    status, body, _ = _error(RuntimeError("secret internals at 0xdeadbeef"))
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "secret" not in body["error"]["message"] and "internal error" in body["error"]["message"]
    assert "secret internals" in caplog.text  # logged, with the trace, for the operator
    internal = MaasError("engine detail")  # INTERNAL: also generic
    assert _error(internal)[0] == 500 and "engine detail" not in _error(internal)[1]["error"]["message"]


def test_http_refusals_and_typed_errors() -> None:
    assert _error(HttpError(413, "too big", code="request_too_large"))[0] == 413
    assert _error(Unauthenticated("who are you"))[1]["error"]["type"] == "authentication_error"
    assert _error(NotFound("no model", field="model"))[1]["error"]["param"] == "model"
    assert _error(InvalidArgument("bad"))[1]["error"]["param"] is None


def test_the_openapi_request_schemas_are_the_accepted_fields() -> None:
    doc = openapi.document()
    schemas = doc["components"]["schemas"]
    for name, fields in [("ChatCompletionRequest", openai_api.CHAT_FIELDS),
                         ("CompletionRequest", openai_api.COMPLETION_FIELDS),
                         ("EmbeddingRequest", openai_api.EMBEDDING_FIELDS),
                         ("BatchRequest", openai_api.BATCH_FIELDS)]:
        assert set(schemas[name]["properties"]) == set(fields)
    refs = {v for path in doc["paths"].values() for op in path.values() for v in _refs(op)}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_chat_parameters_map_to_sampling_params() -> None:
    request, opts = openai_api.chat_request({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
        "max_tokens": 9, "temperature": 0, "top_p": 0.5, "stop": "x", "seed": -1, "presence_penalty": 1,
        "frequency_penalty": -1, "top_k": 3, "repetition_penalty": 1.1, "ignore_eos": True, "logprobs": True,
        "top_logprobs": 2, "user": "u", "n": 1, "stream": True, "stream_options": {"include_usage": True},
        "store": False, "metadata": {}, "service_tier": "auto", "logit_bias": {}, "parallel_tool_calls": True,
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "adapter": None})
    p = request.params
    assert (p.max_tokens, p.temperature, p.top_p, list(p.stop), p.seed, p.top_k, p.logprobs) == (
        5, 0, 0.5, ["x"], 2**64 - 1, 3, 2)
    assert p.ignore_eos and p.HasField("temperature")
    assert opts == openai_api.Options(kind="chat", model="m", stream=True, include_usage=True, logprobs=True)
    default, _ = openai_api.chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert default.params.max_tokens == openai_api.DEFAULT_CHAT_MAX_TOKENS
    assert not default.params.HasField("temperature") and not default.params.HasField("seed")


def _chunk(text: str, ids: list[int], finish: int = 0) -> inference_pb2.GenerateChunk:
    chunk = inference_pb2.GenerateChunk(text=text, token_ids=ids, finish_reason=finish)  # type: ignore[arg-type]
    for t in ids:
        chunk.logprobs.append(common_pb2.TokenLogprob(token_id=t, logprob=-0.5,
                                                      top=[common_pb2.TopLogprob(token_id=t, logprob=-0.5)]))
    if finish:
        chunk.usage.prompt_tokens, chunk.usage.completion_tokens = 3, 2
    return chunk


def test_stream_events_of_a_chat() -> None:
    opts = openai_api.Options(kind="chat", model="m", stream=True, include_usage=True, logprobs=True)
    enc = openai_api.StreamEncoder(opts, "r1", 7)
    events = [*enc.start(), *enc.chunk(_chunk("a", [1])), *enc.chunk(_chunk("", [])),
              *enc.chunk(_chunk(" b", [2], common_pb2.FINISH_REASON_LENGTH)), *enc.end()]
    assert [e["choices"][0]["delta"] if e["choices"] else None for e in events] == [
        {"role": "assistant", "content": ""}, {"content": "a"}, {"content": " b"}, None]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert events[1]["choices"][0]["logprobs"]["content"][0] == {
        "token": "token_id:1", "logprob": -0.5, "bytes": None,
        "top_logprobs": [{"token": "token_id:1", "logprob": -0.5, "bytes": None}]}
    assert all(e["id"] == "chatcmpl-r1" and e["created"] == 7 for e in events)
    assert [e["usage"] for e in events[:-1]] == [None] * 3
    assert events[-1]["usage"]["total_tokens"] == 5


def test_a_cancelled_or_failed_sequence_is_an_error_not_a_reply() -> None:
    opts = openai_api.Options(kind="text", model="m")
    reply = inference_pb2.GenerateResponse(text="x", finish_reason=common_pb2.FINISH_REASON_CANCELLED)
    with pytest.raises(MaasError) as err:
        openai_api.completion(reply, opts, "r", 0)
    assert err.value.code == grpc.StatusCode.CANCELLED and _error(err.value)[0] == 499
    reply.finish_reason = common_pb2.FINISH_REASON_ERROR
    with pytest.raises(MaasError) as err:
        openai_api.completion(reply, opts, "r", 0)
    assert _error(err.value)[0] == 500
    reply.finish_reason = common_pb2.FINISH_REASON_STOP
    reply.logprobs.append(common_pb2.TokenLogprob(token_id=4, token="x", logprob=-1.0))
    text = openai_api.completion(reply, openai_api.Options(kind="text", model="m", logprobs=True), "r", 0)
    assert text["choices"][0]["logprobs"] == {"tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [{}],
                                              "text_offset": [0]}


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 3601])
def test_the_routers_http_timeout_is_checked_at_start(timeout: float) -> None:
    with pytest.raises(StartupError, match="HTTP request timeout"):
        HttpApi(None, "127.0.0.1", 0, timeout=timeout)  # type: ignore[arg-type]


def test_text_offsets_count_whole_characters_and_leading_spaces() -> None:
    from maas.services.router.openai_api import text_logprobs
    from maas.v1 import common_pb2

    def lps(*tokens: str) -> list[common_pb2.TokenLogprob]:
        return [common_pb2.TokenLogprob(token=t, logprob=-1.0) for t in tokens]

    # "€" split over two byte pieces, then text after it
    got = text_logprobs(lps("a", "bytes:\\xe2\\x82", "bytes:\\xac", "b"), 0, (), "a€b")
    assert got["text_offset"] == [0, 1, 1, 2]
    # an echoed prompt whose first token carries SentencePiece's leading space, after a BOS
    got = text_logprobs(lps("!"), 0, lps("<s>", " Hello", " world"), "Hello world!")
    assert got["text_offset"] == [0, 0, 5, 11]
    assert got["token_logprobs"][0] is None
