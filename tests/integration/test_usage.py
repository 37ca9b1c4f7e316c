"""Usage metering on a real mesh: two tenants' requests (gRPC streams and unary calls, the
OpenAI HTTP API) to a model on two worker processes, one of them SIGKILLed mid-stream so
that streams move and calls are retried; the metered totals equal what the clients were
told, request for request, survive restarts of the registry and the router, and each
tenant sees only its own. Then the outbox across a NATS restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import openai
import pytest
from openai import AsyncOpenAI

from maas.cli.main import main
from maas.mesh import usage
from maas.mesh.clients import credential_metadata
from maas.mesh.config import MeshConfig
from maas.mesh.errors import FIELD_METADATA
from maas.services.router.forward import RETRIES
from maas.stack.servers import free_port, start_nats
from maas.v1 import common_pb2, inference_pb2, scheduler_pb2, usage_pb2

from .conftest import MeshHarness, eventually

MAX_TOKENS = 40
CHAT = [{"role": "user", "content": "say something long"}]


@dataclass
class Tally:
    """What the clients of one tenant saw."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streamed_before_an_error: int = 0

    def ok(self, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def failed(self, streamed: int = 0) -> None:
        self.requests += 1
        self.errors += 1
        self.streamed_before_an_error += streamed

    @property
    def totals(self) -> tuple[int, int, int, int]:
        return self.requests, self.errors, self.prompt_tokens, self.completion_tokens


def totals(t: usage_pb2.UsageTotals) -> tuple[int, int, int, int]:
    return t.requests, t.errors, t.prompt_tokens, t.completion_tokens


async def _workers(mesh: MeshHarness, n: int) -> bool:
    stub = await mesh.stub("scheduler")
    listing = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)  # type: ignore[attr-defined]
    return len(listing.workers) == n


async def cli(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `maas ARGS` in-process (in a thread: the CLI runs its own event loop)."""
    capsys.readouterr()
    try:
        rc = await asyncio.to_thread(main, [*args, "--etcd", mesh.etcd, "--prefix", mesh.prefix])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


async def _get_usage(mesh: MeshHarness, key: str = "", **kw: object) -> usage_pb2.GetUsageResponse:
    stub = await mesh.stub("registry")
    return await stub.GetUsage(usage_pb2.GetUsageRequest(**kw),  # type: ignore[attr-defined, arg-type]
                               metadata=credential_metadata(key) if key else None, timeout=30)


async def test_usage_counts_each_request_once_across_retries_migrations_and_restarts(
        mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    began_ms = int(time.time() * 1000) - 1000
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    w1 = mesh.spawn("worker", "--instance", "w1", "--cpu-memory-gib", "2")
    mesh.spawn("worker", "--instance", "w2", "--cpu-memory-gib", "2")
    await eventually(lambda: _workers(mesh, 2), timeout=30)
    await mesh.register("echo", token_delay_ms="25")
    await mesh.deploy("echo", replicas=2)
    st = await mesh.wait_ready("echo", replicas=2, timeout=60)
    assert {r.worker_id for r in st.replicas} == {"w1", "w2"}

    keys = {t: {role: await mesh.key(t, role) for role in ("inference", "developer")} for t in ("ta", "tb")}
    stub = await mesh.stub("router")
    tally: dict[str, Tally] = defaultdict(Tally)
    moved = 0

    async def knows(key: str) -> bool:
        await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=credential_metadata(key),  # type: ignore[attr-defined]
                              timeout=5)
        return True

    for t in keys:
        await eventually(lambda t=t: knows(keys[t]["inference"]), timeout=15)

    def request(tenant: str, i: int, **params: object) -> inference_pb2.GenerateRequest:
        params.setdefault("max_tokens", MAX_TOKENS)
        return inference_pb2.GenerateRequest(model=str(params.pop("model", "echo")), prompt=f"{tenant} asks {i}",
                                             params=common_pb2.SamplingParams(**params))  # type: ignore[arg-type]

    async def grpc_stream(tenant: str, i: int, started: asyncio.Event | None = None, **params: object) -> None:
        nonlocal moved
        call = stub.GenerateStream(request(tenant, i, **params),  # type: ignore[attr-defined]
                                   metadata=credential_metadata(keys[tenant]["inference"]), timeout=60)
        last, replicas, n = None, set(), 0
        try:
            async for chunk in call:
                replicas.add(chunk.replica_id)
                n += len(chunk.token_ids)
                last = chunk
                if started is not None and n >= 5:
                    started.set()
        except grpc.aio.AioRpcError:
            tally[tenant].failed(n)
            return
        assert last is not None and last.finish_reason, f"{tenant} stream {i} ended without its last chunk"
        moved += len(replicas) == 2
        tally[tenant].ok(last.usage.prompt_tokens, last.usage.completion_tokens)

    async def hang_up(tenant: str, i: int, after: int) -> None:
        """A stream whose client goes away after `after` tokens."""
        call = stub.GenerateStream(request(tenant, i),  # type: ignore[attr-defined]
                                   metadata=credential_metadata(keys[tenant]["inference"]), timeout=60)
        n = 0
        while n < after:
            chunk = await call.read()
            assert chunk is not grpc.aio.EOF
            n += len(chunk.token_ids)
        call.cancel()
        tally[tenant].failed(n)

    async def grpc_unary(tenant: str, i: int, **params: object) -> grpc.StatusCode:
        try:
            reply = await stub.Generate(request(tenant, i, **params),  # type: ignore[attr-defined]
                                        metadata=credential_metadata(keys[tenant]["inference"]), timeout=60)
        except grpc.aio.AioRpcError as e:
            tally[tenant].failed()
            return e.code()
        tally[tenant].ok(reply.usage.prompt_tokens, reply.usage.completion_tokens)
        return grpc.StatusCode.OK

    client = AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=keys["ta"]["inference"],
                         max_retries=0)

    async def http_stream(i: int) -> None:
        got = None
        try:
            stream = await client.chat.completions.create(
                model="echo", messages=CHAT + [{"role": "user", "content": str(i)}],  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS, seed=i, stream=True, stream_options={"include_usage": True})
            async for c in stream:
                got = c.usage or got
        except openai.APIError:
            tally["ta"].failed()
            return
        assert got is not None
        tally["ta"].ok(got.prompt_tokens, got.completion_tokens)

    async def http_unary(i: int) -> None:
        try:
            reply = await client.completions.create(model="echo", prompt=f"http {i}", max_tokens=MAX_TOKENS)
        except openai.APIError:
            tally["ta"].failed()
            return
        assert reply.usage is not None
        tally["ta"].ok(reply.usage.prompt_tokens, reply.usage.completion_tokens)

    # both tenants at once; w1 is killed while every stream is running
    retried = RETRIES.labels("echo")._value.get()
    started = asyncio.Event()
    runs = [asyncio.create_task(grpc_stream("ta", 0, started))]
    for tenant in ("ta", "tb"):
        runs += [asyncio.create_task(grpc_stream(tenant, i, seed=i, temperature=0.8)) for i in range(1, 8)]
        runs += [asyncio.create_task(grpc_unary(tenant, 100 + i)) for i in range(4)]
    runs += [asyncio.create_task(http_stream(i)) for i in range(3)]
    runs += [asyncio.create_task(http_unary(i)) for i in range(2)]
    runs.append(asyncio.create_task(hang_up("tb", 50, after=3)))
    bad = [asyncio.create_task(grpc_unary("ta", 200, temperature=-1.0)),     # refused by the worker
           asyncio.create_task(grpc_unary("ta", 201, model="nope")),         # admitted, then not found
           asyncio.create_task(grpc_unary("tb", 202, top_p=5.0))]
    await started.wait()
    w1.signal(signal.SIGKILL)
    await asyncio.gather(*runs)
    assert [await b for b in bad] == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                      grpc.StatusCode.INVALID_ARGUMENT]
    await client.close()
    assert moved >= 1, "no stream was moved: the kill came too late?"
    assert RETRIES.labels("echo")._value.get() > retried, "no call was retried on another replica"
    sent = {"ta": 8 + 4 + 3 + 2 + 2, "tb": 7 + 4 + 1 + 1}
    assert {t: tally[t].requests for t in sent} == sent
    assert tally["ta"].errors >= 2 and tally["tb"].errors >= 2  # the bad requests, the hang-up
    expected = {t: tally[t].totals for t in sent}

    async def metered(tenant: str) -> bool:
        got = await _get_usage(mesh, tenant=tenant, since_ms=began_ms)
        return totals(got.totals) == expected[tenant]

    for tenant in sent:
        await eventually(lambda tenant=tenant: metered(tenant), timeout=30)

    # the same totals, however grouped; nothing was stored twice
    a_key_id = keys["ta"]["inference"].split("_")[1]
    for by, groups in (("model", {("echo", ""), ("nope", "")}), ("key", {(a_key_id, "")}),
                       ("deployment", {("echo", ""), ("", "")}), ("day", None)):
        got = await _get_usage(mesh, tenant="ta", since_ms=began_ms, by=by)
        assert got.by == by and got.tenant == "ta" and got.duplicates_skipped == 0
        assert totals(got.totals) == expected["ta"]
        assert all(r.tenant == "ta" for r in got.rows)
        if groups is not None:
            assert {(r.group, r.adapter) for r in got.rows} == groups, by
    everyone = await _get_usage(mesh, since_ms=began_ms)
    assert {r.tenant: totals(r.totals) for r in everyone.rows} == expected
    partial = (await _get_usage(mesh, tenant="tb", since_ms=began_ms)).totals.partial_completion_tokens
    assert partial >= tally["tb"].streamed_before_an_error >= 3  # the hung-up stream's tokens, apart

    # a tenant sees its own usage only, whatever it asks; an inference key none
    for asked in ("", "tb", "ta"):
        mine = await _get_usage(mesh, keys["ta"]["developer"], tenant=asked, since_ms=began_ms)
        assert mine.tenant == "ta" and totals(mine.totals) == expected["ta"]
        assert {r.tenant for r in mine.rows} == {"ta"}
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await _get_usage(mesh, keys["ta"]["inference"], tenant="ta")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for bad_request, field in ((usage_pb2.GetUsageRequest(by="hour"), "by"),
                               (usage_pb2.GetUsageRequest(since_ms=int(time.time() * 1000) + 3_600_000), "since_ms"),
                               (usage_pb2.GetUsageRequest(since_ms=began_ms, until_ms=began_ms), "until_ms")):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await (await mesh.stub("registry")).GetUsage(bad_request, timeout=10)  # type: ignore[attr-defined]
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(invalid.value.trailing_metadata() or ())[FIELD_METADATA] == field

    # `maas usage --json`: the admin, for any tenant; a developer key, for its own only
    async def usage_cli(*args: str) -> dict[str, object]:
        rc, out, err = await cli(mesh, capsys, "usage", "--json", "--since", "1h", *args)
        assert rc == 0, err
        return json.loads(out)

    for tenant in sent:
        out = await usage_cli("--tenant", tenant, "--by", "model")
        assert (out["requests"], out["errors"], out["prompt_tokens"], out["completion_tokens"]) == expected[tenant]
        assert {(r["model"], r["adapter"]) for r in out["rows"]} == (  # type: ignore[union-attr]
            {("echo", ""), ("nope", "")} if tenant == "ta" else {("echo", "")})
    out = await usage_cli("--api-key", keys["ta"]["developer"], "--tenant", "tb")
    assert out["tenant"] == "ta" and out["requests"] == expected["ta"][0]
    assert [r["tenant"] for r in out["rows"]] == ["ta"]  # type: ignore[union-attr]
    rc, out_text, _ = await cli(mesh, capsys, "usage", "--since", "1h", "--by", "key")
    assert rc == 0 and a_key_id in out_text and out_text.splitlines()[0].startswith("usage of every tenant")
    rc, _, err = await cli(mesh, capsys, "usage", "--since", "yesterday")
    assert rc == 2 and "error: --since" in err

    # restarts: the records are in JetStream, not in any service
    registry_rt = next(rt for rt in mesh.runtimes if rt.config.kind == "registry")
    await registry_rt.stop()
    mesh.runtimes.remove(registry_rt)
    await mesh.reset_client()
    await mesh.registry()
    for tenant in sent:
        assert totals((await _get_usage(mesh, tenant=tenant, since_ms=began_ms)).totals) == expected[tenant]

    await router.stop()
    mesh.runtimes.remove(router)
    await mesh.reset_client()
    await mesh.router()
    for tenant in sent:
        assert totals((await _get_usage(mesh, tenant=tenant, since_ms=began_ms)).totals) == expected[tenant]
    stub = await mesh.stub("router")
    assert await grpc_unary("tb", 300) == grpc.StatusCode.OK  # through the new router
    after = tally["tb"].totals

    async def counted_once_more() -> bool:
        return totals((await _get_usage(mesh, tenant="tb", since_ms=began_ms)).totals) == after

    await eventually(counted_once_more, timeout=30)


def _record(i: int, tenant: str = "t") -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(request_id=f"r{i}", tenant=tenant, key_id="k", model="m", prompt_tokens=2,
                                 completion_tokens=3, status="OK", kind="generate")


async def test_records_queued_while_nats_is_away_are_stored_once_it_is_back(tmp_path: Path):
    port = free_port()
    child, url = start_nats(tmp_path / "js", port=port)
    meter = usage.UsageMeter(MeshConfig(kind="router", instance="r9", nats=url, prefix="/p/", metrics_port=-1))
    reader: nats.NATS | None = None
    try:
        await meter.start()
        for i in range(20):
            meter.record(_record(i))
        assert await meter.flush(10) and meter.unstored == 0

        child.stop()  # NATS goes away: the router goes on serving, its records wait in the outbox
        retried = usage.RETRIED._value.get()
        for i in range(20, 50):
            meter.record(_record(i))
        await eventually(lambda: usage.RETRIED._value.get() > retried, timeout=30)  # publishes failed, will be re-sent
        assert meter.unstored == 30
        child, _ = start_nats(tmp_path / "js", port=port)  # back, with what it had stored
        assert await meter.flush(60) and meter.unstored == 0

        reader = await nats.connect(url)
        got = await usage.query(reader, "/p/", None)
        assert (got.totals.requests, got.totals.prompt_tokens, got.duplicates_skipped) == (50, 100, 0)
        assert (await usage.query(reader, "/other/", None)).totals.requests == 0  # another mesh's

        # a copy stored under another message id (a republish later than the stream's window)
        # is skipped by readers
        js = reader.jetstream()
        copy = _record(99)
        copy.id = "fixed-id"
        for msg_id in ("one", "two"):
            await js.publish(usage.subject("/p/", "t"), copy.SerializeToString(), headers={"Nats-Msg-Id": msg_id})
        got = await usage.query(reader, "/p/", "t")
        assert (got.totals.requests, got.duplicates_skipped) == (51, 1)
    finally:
        await meter.close(flush_timeout=1)
        if reader is not None:
            await reader.close()
        child.stop()
