"""A mesh whose every link is TLS (as `maas up` makes it): services serve gRPC with a
certificate from one CA and dial each other verifying it, the router serves HTTPS, and a
client without the CA, or speaking plaintext, gets nowhere."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc
import openai
import pytest

from maas.mesh.clients import MeshClient, dial
from maas.mesh.tls import TlsFiles, issue, make_ca
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc

from .conftest import MeshHarness

HOSTS = ["127.0.0.1", "localhost"]


def tls_for(directory: Path, kind: str) -> TlsFiles:
    make_ca(directory)
    cert, key = issue(directory, kind, HOSTS)
    return TlsFiles(ca=(directory / "ca.pem").read_bytes(), cert=cert.read_bytes(), key=key.read_bytes())


async def test_every_link_is_tls_and_clients_verify_the_stack(mesh: MeshHarness, tmp_path: Path) -> None:
    ca_dir = tmp_path / "tls"
    original = mesh.config

    def config(kind: str, **kw: object):  # type: ignore[no-untyped-def]
        return dataclasses.replace(original(kind, **kw), tls=tls_for(ca_dir, kind))

    mesh.config = config  # type: ignore[method-assign]
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    ca = TlsFiles(ca=(ca_dir / "ca.pem").read_bytes())
    admin = MeshClient(mesh.etcd, mesh.prefix, credential=mesh.admin_token, tls=ca)
    mesh._client = admin  # the harness's stubs now verify the stack too
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    key = await mesh.key("t", "inference")

    # gRPC through the router, which reaches the worker over TLS as well
    async with dial(router.endpoint, key, ca) as channel:
        request = inference_pb2.GenerateRequest(model="echo", prompt="hi",
                                                params=common_pb2.SamplingParams(max_tokens=4))
        chunks = [c async for c in inference_pb2_grpc.InferenceStub(channel).GenerateStream(request, timeout=10)]
        assert chunks[-1].usage.completion_tokens == 4

    # plaintext to a TLS port, or TLS against another CA, never gets an answer
    async with dial(mesh.endpoint("registry"), mesh.admin_token) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry_pb2_grpc.RegistryStub(plain).ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = tls_for(tmp_path / "other-ca", "client")
    async with dial(mesh.endpoint("registry"), mesh.admin_token, stranger) as wrong:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry_pb2_grpc.RegistryStub(wrong).ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # the OpenAI API over HTTPS, verified with the stack's CA (the async client: the router
    # serves from this test's event loop)
    base_url = f"https://{router.info.http_endpoint}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(
                                      verify=ssl.create_default_context(cafile=ca_dir / "ca.pem"))) as client:
        reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as unverified:
        with pytest.raises(openai.APIConnectionError):
            await unverified.models.list()
    async with openai.AsyncOpenAI(base_url=base_url.replace("https://", "http://"), api_key=key, max_retries=0,
                                  timeout=5) as plaintext:
        with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
            await plaintext.models.list()
