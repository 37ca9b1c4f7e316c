"""The plugin process: two versions of a plugin side by side, failures named, a CPU-heavy
plugin that does not stall the router's event loop, a crashed process started again, and
no mesh credentials in its environment. A real child process, no mocks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from maas.mesh.errors import InvalidArgument, NotFound, Unavailable
from maas.pipelines.plugins import THREADS, PluginError, PluginHost

PLUGIN = '''
import os, time

class Echo:
    def run(self, ctx, value):
        return {"version": VERSION, "value": value, "step": ctx.step, "tenant": ctx.tenant, "config": ctx.config}

class Fails:
    def run(self, ctx, value):
        return 1 / 0

class NotJson:
    def run(self, ctx, value):
        return object()

class Burns:
    def run(self, ctx, value):
        end = time.process_time() + value   # CPU, holding the GIL of its own process
        n = 0
        while time.process_time() < end:
            n += 1
        return n > 0

class Env:
    def run(self, ctx, value):
        return sorted(k for k in os.environ if k.startswith("MAAS") or "KEY" in k or "TOKEN" in k)

class Dies:
    def run(self, ctx, value):
        os._exit(3)

class Noisy:
    def run(self, ctx, value):
        print("a plugin's print")
        os.write(1, b"garbage on fd 1\\n")
        return "still fine"

class Sleeps:
    def run(self, ctx, value):
        time.sleep(value)
        return value

class Asks:
    def run(self, ctx, value):
        ctx.event("asking", model="m")
        answer = ctx.generate("m", value, max_tokens=3)
        docs = ctx.retrieve("kb", value, k=1)
        try:
            ctx.generate("missing", value)
        except Exception as e:
            failed = str(e)
        return {"answer": answer, "docs": docs, "vector": ctx.embed("e", [value]), "failed": failed}

class Upper:
    def stream(self, ctx, chunks):
        for chunk in chunks:
            yield chunk.upper()
        yield ctx.config.get("end", "")

class AsyncUpper:
    async def stream(self, ctx, chunks):
        async for chunk in chunks:
            yield chunk.upper()

class BreaksMidStream:
    def stream(self, ctx, chunks):
        for chunk in chunks:
            yield chunk
            raise ValueError("bad chunk")

class Later:
    async def run(self, ctx, value):
        import asyncio
        await asyncio.sleep(0.01)
        return value * 2
'''


def package(tmp: Path, version: str) -> Path:
    where = tmp / version
    where.mkdir()
    (where / "p.py").write_text(f"VERSION = {version!r}\n" + PLUGIN)
    return where


async def call(host: PluginHost, where: Path, ref: str, value: object = None, sha: str = "") -> object:
    return await host.call(where, sha or where.name * 8, f"p:{ref}", step="s", tenant="acme", config={"k": 1},
                           timeout=5.0, value=value)


async def test_two_versions_side_by_side_and_failures_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_CREDENTIAL", "secret-key")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    v1, v2 = package(tmp_path, "v1"), package(tmp_path, "v2")
    host = PluginHost()
    try:
        got = await asyncio.gather(*(call(host, where, "Echo", i) for i, where in enumerate([v1, v2, v1, v2])))
        assert [g["version"] for g in got] == ["v1", "v2", "v1", "v2"]  # type: ignore[index]
        assert got[1] == {"version": "v2", "value": 1, "step": "s", "tenant": "acme", "config": {"k": 1}}
        assert await call(host, v1, "Later", 21) == 42
        with pytest.raises(PluginError, match="^ZeroDivisionError: division by zero$"):
            await call(host, v1, "Fails")
        with pytest.raises(PluginError, match="TypeError: Object of type object is not JSON serializable"):
            await call(host, v1, "NotJson")
        with pytest.raises(PluginError, match="AttributeError: module 'p' has no 'Nope'"):
            await call(host, v1, "Nope")
        with pytest.raises(InvalidArgument, match="not JSON"):
            await call(host, v1, "Echo", object())
        assert await call(host, v1, "Env") == []  # the router's credentials stay in the router
        assert await call(host, v1, "Noisy") == "still fine"  # its output goes to stderr, not the protocol
        assert await call(host, v1, "Echo", "after")
    finally:
        await host.close()


async def test_a_cpu_heavy_plugin_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    where = package(tmp_path, "v1")
    host = PluginHost()
    try:
        await call(host, where, "Echo")  # started
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        assert await call(host, where, "Burns", 1.5) is True
        ticker.cancel()
        # 1.5 s of CPU in the plugin: the loop kept ticking meanwhile (at 0.01 s a tick it
        # would make ~150; a loop stalled for the call would make none or one)
        assert ticks >= 20, ticks
    finally:
        await host.close()


async def test_a_plugin_that_kills_its_process_fails_its_call_and_the_next_call_starts_another(
        tmp_path: Path) -> None:
    where = package(tmp_path, "v1")
    host = PluginHost()
    try:
        with pytest.raises(Unavailable, match="exited"):
            await call(host, where, "Dies")
        assert (await call(host, where, "Echo", "again"))["value"] == "again"  # type: ignore[index]
    finally:
        await host.close()


async def test_plugins_stuck_past_their_budgets_restart_the_process(tmp_path: Path) -> None:
    """Calls abandoned by their steps keep their threads; once as many are stuck as the
    process has threads, it is restarted, so the next call runs at once."""
    where = package(tmp_path, "v1")
    host = PluginHost()
    try:
        for _ in range(THREADS):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call(host, where, "Sleeps", 60), 0.05)
        assert await asyncio.wait_for(call(host, where, "Echo", "fresh"), 10) == {
            "version": "v1", "value": "fresh", "step": "s", "tenant": "acme", "config": {"k": 1}}
    finally:
        await host.close()


def test_a_package_holds_plain_files_inside_itself_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    from maas.pipelines import package

    def tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
            for info, data in members:
                info.size = len(data) if info.isreg() else 0
                t.addfile(info, io.BytesIO(data) if info.isreg() else None)
        return out.getvalue()

    spec = (tarfile.TarInfo("pipeline.yaml"), b"steps: []\n")
    assert package.read(tar(spec, (tarfile.TarInfo("p.py"), b"x = 1\n"))).has_module("p")
    link = tarfile.TarInfo("p.py")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(package.PackageError, match="not a plain file"):
        package.read(tar(spec, (link, b"")))
    with pytest.raises(package.PackageError, match="outside itself"):
        package.read(tar(spec, (tarfile.TarInfo("../evil.py"), b"x = 1\n")))
    with pytest.raises(package.PackageError, match=r"no pipeline\.yaml"):
        package.read(tar((tarfile.TarInfo("p.py"), b"x = 1\n")))
    monkeypatch.setattr(package, "MAX_PACKAGE_BYTES", 1000)
    with pytest.raises(package.PackageError, match="at most 1000 bytes"):
        package.read(tar(spec, (tarfile.TarInfo("big.py"), b"#" * 900)))


class Services:
    """What a pipeline's steps call (the router's MeshServices), faked: the calls a plugin
    makes through ctx land here, in the router's process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, object], *,
                       deadline: float | None) -> AsyncIterator[str]:
        if model == "missing":
            raise NotFound("model 'missing' does not exist")
        self.calls.append(("generate", (model, messages, params)))
        for word in ("a ", "b"):
            yield word

    async def embed(self, model: str, texts: list[str], *, deadline: float | None) -> list[list[float]]:
        self.calls.append(("embed", (model, texts)))
        return [[1.0, 2.0] for _ in texts]

    async def retrieve(self, index: str, query: object, k: int, *, deadline: float | None) -> list[dict[str, object]]:
        self.calls.append(("retrieve", (index, query, k)))
        return [{"text": f"about {query}", "score": 0.5}][:k]


async def test_a_plugin_calls_models_and_indexes_through_the_router(tmp_path: Path) -> None:
    where = package(tmp_path, "v1")
    host = PluginHost()
    services = Services()
    try:
        got = await host.call(where, "v1" * 8, "p:Asks", step="s", tenant="acme", config={}, timeout=5.0,
                              value="q", services=services, deadline=asyncio.get_running_loop().time() + 5)
    finally:
        await host.close()
    assert got == {"answer": "a b", "docs": [{"text": "about q", "score": 0.5}], "vector": [[1.0, 2.0]],
                   "failed": "ctx.generate: NOT_FOUND: model 'missing' does not exist"}
    assert services.calls == [("generate", ("m", [{"role": "user", "content": "q"}], {"max_tokens": 3})),
                              ("retrieve", ("kb", "q", 1)), ("embed", ("e", ["q"]))]


async def test_a_streaming_plugin_gets_chunks_as_they_come_and_its_own_go_out_as_made(tmp_path: Path) -> None:
    where = package(tmp_path, "v1")
    host = PluginHost()
    second_sent = asyncio.Event()

    async def chunks() -> AsyncIterator[str]:
        yield "one "
        await second_sent.wait()  # the first output must come before the second input
        yield "two"

    try:
        for ref in ("p:Upper", "p:AsyncUpper"):
            second_sent.clear()
            got = []
            async for chunk in host.stream(where, "v1" * 8, ref, chunks(), step="s", tenant="acme",
                                           config={"end": "!"}, timeout=5.0):
                got.append(chunk)
                second_sent.set()
            assert got == (["ONE ", "TWO", "!"] if ref == "p:Upper" else ["ONE ", "TWO"])
        with pytest.raises(PluginError, match="ValueError: bad chunk"):
            async for _ in host.stream(where, "v1" * 8, "p:BreaksMidStream", chunks(), step="s", tenant="acme",
                                       config={}, timeout=5.0):
                second_sent.set()
    finally:
        await host.close()
