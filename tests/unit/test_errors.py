"""Errors keep their type across a hop: a real in-process gRPC server fails calls with each
status (and trailing metadata), and `from_rpc_error` rebuilds the class the service raised,
with its message, field and retry-after."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from maas.mesh.clients import upload_file
from maas.mesh.errors import (
    BY_CODE,
    FIELD_METADATA,
    AlreadyExists,
    DeadlineExceeded,
    EngineDead,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from maas.mesh.server import ErrorInterceptor
from maas.services.worker.jobs import job_at_fault
from maas.v1 import registry_pb2, registry_pb2_grpc

SERVICE = "maas.test.Errors"

CLASSES: list[tuple[grpc.StatusCode, type[MaasError]]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
]


async def _abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Fail with the status the request names: {"code", "message", "trailers": [[k, v], ...]}."""
    ask = json.loads(request)
    if ask.get("trailers"):
        context.set_trailing_metadata(tuple((k, v) for k, v in ask["trailers"]))
    await context.abort(grpc.StatusCode[ask["code"]], ask["message"])
    raise AssertionError("abort returned")


async def _abort_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """One message, then the failure `_abort` would give (a download failing half-way)."""
    yield b"first"
    await _abort(request, context)


async def _raise(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Raise the domain error the request names, for the service's ErrorInterceptor to map."""
    ask = json.loads(request)
    cls = {c.__name__: c for _, c in CLASSES}[ask.pop("class")]
    raise cls(**ask)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Abort": grpc.unary_unary_rpc_method_handler(_abort),
        "AbortStream": grpc.unary_stream_rpc_method_handler(_abort_stream),
        "Raise": grpc.unary_unary_rpc_method_handler(_raise),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


async def _failure(channel: grpc.aio.Channel, method: str, **ask: Any) -> grpc.aio.AioRpcError:
    call = channel.unary_unary(f"/{SERVICE}/{method}")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call(json.dumps(ask).encode(), timeout=10)
    return failed.value


def test_the_table_has_one_class_per_code_and_each_class_its_own_code() -> None:
    assert BY_CODE == dict(CLASSES)
    assert all(cls.code == code for code, cls in BY_CODE.items())
    assert EngineDead not in BY_CODE.values()  # UNAVAILABLE comes back as Unavailable


@pytest.mark.parametrize("code, cls", CLASSES, ids=[c.name for c, _ in CLASSES])
async def test_each_code_comes_back_as_its_class(channel: grpc.aio.Channel, code: grpc.StatusCode,
                                                 cls: type[MaasError]) -> None:
    e = await _failure(channel, "Abort", code=code.name, message="it went wrong",
                       trailers=[[FIELD_METADATA, "the_field"]])
    err = from_rpc_error(e, "calling the thing: ")
    assert type(err) is cls and err.code == code
    assert err.message == str(err) == "calling the thing: it went wrong"
    assert err.field == "the_field"


@pytest.mark.parametrize("code, cls", CLASSES, ids=[c.name for c, _ in CLASSES])
async def test_a_domain_error_raised_by_a_service_is_the_same_class_one_hop_on(
        channel: grpc.aio.Channel, code: grpc.StatusCode, cls: type[MaasError]) -> None:
    e = await _failure(channel, "Raise", **{"class": cls.__name__, "message": "no such thing", "field": "name"})
    err = from_rpc_error(e)
    assert type(err) is cls and (err.message, err.field) == ("no such thing", "name")


async def test_resource_exhausted_carries_retry_after(channel: grpc.aio.Channel) -> None:
    e = await _failure(channel, "Abort", code="RESOURCE_EXHAUSTED", message="slow down",
                       trailers=[["retry-after", "7"], [FIELD_METADATA, "tokens"]])
    err = from_rpc_error(e)
    assert isinstance(err, ResourceExhausted)
    assert (err.message, err.field, err.retry_after) == ("slow down", "tokens", 7.0)
    # as the services send it: the interceptor rounds up to whole seconds
    e = await _failure(channel, "Raise", **{"class": "ResourceExhausted", "message": "over", "retry_after": 2.2})
    err = from_rpc_error(e)
    assert isinstance(err, ResourceExhausted) and err.retry_after == 3.0 and err.field is None


@pytest.mark.parametrize("raw", [None, "soon", "-1", "nan", "inf"])
async def test_a_missing_or_unreadable_retry_after_is_none(channel: grpc.aio.Channel, raw: str | None) -> None:
    trailers = [] if raw is None else [["retry-after", raw]]
    err = from_rpc_error(await _failure(channel, "Abort", code="RESOURCE_EXHAUSTED", message="full",
                                        trailers=trailers))
    assert isinstance(err, ResourceExhausted) and err.retry_after is None


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
                                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS])
async def test_other_codes_are_a_maas_error_with_that_code(channel: grpc.aio.Channel,
                                                           code: grpc.StatusCode) -> None:
    err = from_rpc_error(await _failure(channel, "Abort", code=code.name, message="odd",
                                        trailers=[[FIELD_METADATA, "f"]]))
    assert type(err) is MaasError and (err.code, err.message, err.field) == (code, "odd", "f")


async def test_no_trailers_no_field_and_no_details_the_code_name(channel: grpc.aio.Channel) -> None:
    err = from_rpc_error(await _failure(channel, "Abort", code="NOT_FOUND", message=""), "looking: ")
    assert isinstance(err, NotFound) and err.field is None and err.message == "looking: NOT_FOUND"


async def test_a_stream_failing_half_way(channel: grpc.aio.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/AbortStream")(
        json.dumps({"code": "UNAVAILABLE", "message": "the registry is restarting"}).encode(), timeout=10)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            got.append(message)
    err = from_rpc_error(failed.value, "downloading: ")
    assert got == [b"first"]
    assert isinstance(err, Unavailable) and err.message == "downloading: the registry is restarting"


# --- a fine-tuning job's upload: requeued when the registry is away, failed when it refuses --


class _Registry(registry_pb2_grpc.RegistryServicer):
    """A registry whose uploads read one chunk, then fail with `code`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message

    async def UploadArtifact(self, request_iterator: AsyncIterator[registry_pb2.ArtifactChunk],
                             context: grpc.aio.ServicerContext) -> registry_pb2.Artifact:
        await anext(aiter(request_iterator))
        await context.abort(self.code, self.message)
        raise AssertionError("abort returned")


@pytest.mark.parametrize("code, at_fault", [(grpc.StatusCode.UNAVAILABLE, False),
                                            (grpc.StatusCode.DEADLINE_EXCEEDED, False),
                                            (grpc.StatusCode.INVALID_ARGUMENT, True),
                                            (grpc.StatusCode.FAILED_PRECONDITION, True)])
async def test_an_upload_the_registry_fails_is_requeued_only_when_the_registry_is_away(
        tmp_path: Path, code: grpc.StatusCode, at_fault: bool) -> None:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServicer_to_server(_Registry(code, "no"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result = tmp_path / "adapter.tar"
    result.write_bytes(b"weights" * 1000)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(MaasError) as failed:
                await upload_file(registry_pb2_grpc.RegistryStub(ch), result, timeout=10)
    finally:
        await server.stop(None)
    err = failed.value
    assert err.code == code and err.message == "uploading adapter.tar: no"
    assert job_at_fault(err) is at_fault


async def test_an_upload_cut_off_by_a_registry_restart_is_unavailable_and_requeued(tmp_path: Path) -> None:
    """The registry stopping while a job uploads its result (a restart)."""
    uploading = asyncio.Event()

    class Slow(registry_pb2_grpc.RegistryServicer):
        async def UploadArtifact(self, request_iterator: AsyncIterator[registry_pb2.ArtifactChunk],
                                 context: grpc.aio.ServicerContext) -> registry_pb2.Artifact:
            async for _ in request_iterator:
                uploading.set()
                await asyncio.sleep(0.1)  # a slow store: the upload outlasts the stop's grace
            return registry_pb2.Artifact()

    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result = tmp_path / "adapter.tar"
    result.write_bytes(b"w" * (16 << 20))  # 16 chunks, 1.6 s: still uploading when the server stops
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        upload = asyncio.create_task(upload_file(registry_pb2_grpc.RegistryStub(ch), result, timeout=30))
        await asyncio.wait_for(uploading.wait(), 10)
        await server.stop(0.1)
        with pytest.raises(MaasError) as failed:
            await upload
    assert isinstance(failed.value, Unavailable) and not job_at_fault(failed.value)
