"""The router sends a request on as the caller serialized it, with what it adds appended as
a second serialized message: parsing the two merges them into the amended request."""

from __future__ import annotations

from maas.services.router.forward import Forwarder
from maas.services.router.service import _as_received, _request
from maas.v1 import common_pb2, inference_pb2


def test_appended_fields_amend_the_request_as_if_it_had_been_changed_and_serialized() -> None:
    original = inference_pb2.GenerateRequest(
        model="m", prompt="hello", resume_token_ids=[1, 2],
        params=common_pb2.SamplingParams(max_tokens=7, temperature=0.5, stop=["x"]))
    request, raw = _request(original.SerializeToString())
    added = inference_pb2.GenerateRequest()
    Forwarder.prepare(request, added)           # a request id the router chose
    request.params.seed = added.params.seed = 42  # a pinned seed
    sent = raw + added.SerializeToString() + inference_pb2.GenerateRequest(
        resume_token_ids=[3, 4]).SerializeToString()  # tokens already passed on
    expected = inference_pb2.GenerateRequest()
    expected.CopyFrom(request)
    expected.resume_token_ids.extend([3, 4])
    got = inference_pb2.GenerateRequest.FromString(sent)
    assert got == expected
    assert got.request_id and got.params.max_tokens == 7 and got.params.seed == 42 and list(got.params.stop) == ["x"]


def test_the_callers_request_id_is_kept_and_nothing_is_added_then() -> None:
    request = inference_pb2.GenerateRequest(model="m", request_id="mine")
    added = inference_pb2.GenerateRequest()
    assert Forwarder.prepare(request, added) == (("x-request-id", "mine"),)
    assert added.SerializeToString() == b""


def test_replies_go_back_as_received() -> None:
    raw = inference_pb2.GenerateChunk(text="hi", token_ids=[5]).SerializeToString()
    assert _as_received((inference_pb2.GenerateChunk.FromString(raw), raw)) is raw


def test_an_adapter_asked_for_by_its_own_name_reaches_the_worker_as_model_and_adapter() -> None:
    class Pool:  # what route_adapter reads of the replica pool
        class deployments:  # noqa: N801
            items = {"demo": object()}

        @staticmethod
        def serving_adapter(model: str) -> str:
            return "demo" if model == "secrets" else ""

    forwarder = Forwarder(Pool())  # type: ignore[arg-type]
    request, raw = _request(inference_pb2.GenerateRequest(model="secrets", prompt="p").SerializeToString())
    added = inference_pb2.GenerateRequest()
    forwarder.route_adapter(request, added)
    assert (request.model, request.adapter) == ("demo", "secrets")
    assert inference_pb2.GenerateRequest.FromString(raw + added.SerializeToString()) == request
