"""Tenants, API keys and limits at the router."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest

from maas.cli.main import main
from maas.mesh.clients import dial
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import MeshHarness, eventually


def _cli(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([*args, "--etcd", mesh.etcd, "--prefix", mesh.prefix])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
        print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return rc, out, err


async def cli(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(_cli, mesh, capsys, *args)


async def new_key(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc, out, err = await cli(mesh, capsys, "keys", "create", *args)
    assert rc == 0, err
    return out.strip().splitlines()[-1]  # the key alone on the last line


async def ask(stub: inference_pb2_grpc.InferenceStub, key: str = "", model: str = "echo",
              max_tokens: int = 2) -> inference_pb2.GenerateResponse:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return await stub.Generate(inference_pb2.GenerateRequest(  # type: ignore[no-any-return]
        model=model, prompt="hello there", params=common_pb2.SamplingParams(max_tokens=max_tokens)),
        metadata=metadata, timeout=10)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_keys_lock_the_mesh_and_limit_each_tenant_alone(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.register("other", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.deploy("other")
    await mesh.wait_ready("echo")
    await mesh.wait_ready("other")
    stub = await mesh.stub("router")  # sends the admin token unless a call brings a key
    anonymous = inference_pb2_grpc.InferenceStub(dial(mesh.endpoint("router")))  # no credential
    err = await refused(ask(anonymous))  # locked from the first request: no open mode
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "needs a credential" in err.details()

    slow = await new_key(mesh, capsys, "--tenant", "slow", "--rpm", "3", "--models", "echo")
    free = await new_key(mesh, capsys, "--tenant", "free")
    assert slow.startswith("maas_") and slow != free
    err = await refused(ask(stub, "maas_nope_nope"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in err.details()

    for _ in range(3):
        await ask(stub, slow)
    err = await refused(ask(stub, slow))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 requests per minute" in err.details()
    retry_after = dict(err.trailing_metadata() or ()).get("retry-after")
    assert retry_after is not None and 1 <= int(retry_after) <= 20
    for _ in range(5):  # another tenant is not affected
        await ask(stub, free)

    err = await refused(ask(stub, slow, model="other"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "may not use model 'other'" in err.details()
    models = await stub.ListModels(inference_pb2.ListModelsRequest(),  # type: ignore[attr-defined]
                                   metadata=(("authorization", f"Bearer {slow}"),), timeout=5)
    assert [m.name for m in models.models] == ["echo"]

    # list shows ids and tenants, never the keys; revoke stops a key at once
    rc, out, err_text = await cli(mesh, capsys, "keys", "list")
    assert rc == 0 and "slow" in out and "free" in out and free not in out, (out, err_text)
    free_id = free.split("_")[1]
    rc, out, err_text = await cli(mesh, capsys, "keys", "revoke", free_id)
    assert rc == 0, err_text

    async def revoked() -> bool:
        try:
            await ask(stub, free)
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    await eventually(revoked, timeout=10)


async def test_concurrency_and_token_limits(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="50")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    one = await new_key(mesh, capsys, "--tenant", "one", "--max-concurrent", "1")
    tokens = await new_key(mesh, capsys, "--tenant", "tok", "--tpm", "20")
    stub = await mesh.stub("router")

    first = asyncio.create_task(ask(stub, one, max_tokens=20))  # about 1 s
    await asyncio.sleep(0.3)
    err = await refused(ask(stub, one))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in err.details()
    await first
    await ask(stub, one)  # free again

    used = await ask(stub, tokens, max_tokens=20)  # admitted with budget left; uses more than 20 tokens
    assert used.usage.prompt_tokens + used.usage.completion_tokens > 20
    err = await refused(ask(stub, tokens))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "20 tokens per minute" in err.details()


async def test_each_router_enforces_its_share_of_a_limit(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.registry()
    await mesh.scheduler()
    routers = [await mesh.router(), await mesh.router()]
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    key = await new_key(mesh, capsys, "--tenant", "shared", "--rpm", "4")
    stubs = [inference_pb2_grpc.InferenceStub(dial(rt.endpoint)) for rt in routers]
    for stub in stubs:  # 4 per minute across two routers: 2 each
        await ask(stub, key)
        await ask(stub, key)
        err = await refused(ask(stub, key))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_keys_are_the_admins_to_make_and_a_developers_for_its_own_inference_keys(
        mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    rc, out, err = await cli(mesh, capsys, "keys", "create", "--tenant", "x", "--api-key", "maas_nope_nope")
    assert rc == 1 and "UNAUTHENTICATED" in err, err
    dev = await new_key(mesh, capsys, "--tenant", "x", "--role", "developer")  # the admin (the test's default)
    inference = await new_key(mesh, capsys, "--tenant", "x", "--api-key", dev)  # a developer: its inference keys
    for refused_args in (("--tenant", "x", "--role", "developer"), ("--tenant", "y"), ("--admin",),
                         ("--service", "worker")):
        rc, out, err = await cli(mesh, capsys, "keys", "create", *refused_args, "--api-key", dev)
        assert rc == 1 and "PERMISSION_DENIED" in err, (refused_args, err)
    await new_key(mesh, capsys, "--tenant", "y")
    rc, out, err = await cli(mesh, capsys, "keys", "list", "--api-key", dev, "--json")
    assert rc == 0 and {k["tenant"] for k in json.loads(out)} == {"x"}, (out, err)
    rc, out, err = await cli(mesh, capsys, "keys", "list", "--api-key", inference)
    assert rc == 1 and "PERMISSION_DENIED" in err and "may not call" in err, err
    admin = await new_key(mesh, capsys, "--admin")
    assert await new_key(mesh, capsys, "--tenant", "z", "--role", "developer", "--api-key", admin)
    rc, out, err = await cli(mesh, capsys, "keys", "create", "--tenant", "Bad Name!", "--api-key", admin)
    assert rc == 1 and "INVALID_ARGUMENT" in err and "tenant" in err, err
    rc, out, err = await cli(mesh, capsys, "keys", "revoke", "admin")  # the installed admin token
    assert rc == 1 and "FAILED_PRECONDITION" in err and "--admin-token-file" in err, err
