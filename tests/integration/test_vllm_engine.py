"""The vLLM engine (engine=vllm, docs/engine.md) on this CPU: vLLM's CPU build in its own
environment (`make vllm`, MAAS_VLLM_PYTHON), run in the engine process a worker would start,
against the built-in engine on the same forged model.

Skipped with the reason where MAAS_VLLM_PYTHON names no environment with vLLM (`make test`
makes one and sets it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from maas.mesh import kvblocks
from maas.mesh.errors import EngineDead, InvalidArgument
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import (
    AdapterRef,
    Delta,
    GenerationRequest,
    GuideSpec,
    ModelSpec,
    SamplingParams,
)
from maas.services.worker.engines.hf import HFEngine
from maas.services.worker.engines.process import ProcessEngine
from tests.integration.conftest import eventually
from tests.unit.test_adapters import make_adapter


def vllm_python() -> str | None:
    """MAAS_VLLM_PYTHON when that interpreter can find vLLM (found, not imported: seconds)."""
    python = os.environ.get("MAAS_VLLM_PYTHON")
    if not python or not os.access(python, os.X_OK):
        return None
    found = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True, timeout=60)
    return python if found.returncode == 0 else None


needs_vllm = pytest.mark.skipif(vllm_python() is None, reason="no vLLM: MAAS_VLLM_PYTHON must name a python with "
                                "vLLM installed (`make vllm` makes .venv-vllm; `make test` sets it)")
pytestmark = [pytest.mark.slow, needs_vllm, pytest.mark.asyncio(loop_scope="module")]

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def push(self, item):", "for i in range(10):"]
# a small KV cache and two adapter places keep the engine near 1.3 GB
OPTIONS = {"engine": "vllm", "kv_cache_mb": "64", "max_adapters": "2", "max_lora_rank": "8"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm(demo_model_dir: Path) -> AsyncIterator[ProcessEngine]:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options=OPTIONS))
    assert isinstance(engine, ProcessEngine)
    await engine.load()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def builtin(demo_model_dir: Path) -> AsyncIterator[HFEngine]:
    engine = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_adapters": "2"}))
    await engine.load()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("vllm-adapters")
    return {name: AdapterRef(f"{name}@1", str(make_adapter(demo_model_dir, root / name, seed)))
            for name, seed in (("a", 1), ("b", 2))}


async def run(engine: object, prompt: str, request_id: str = "r", *, adapter: AdapterRef | None = None,
              resume: tuple[int, ...] = (), **params: object) -> list[Delta]:
    request = GenerationRequest(request_id, prompt, SamplingParams(**params), adapter=adapter,  # type: ignore[arg-type]
                                resume_token_ids=resume)
    return [d async for d in engine.generate(request)]  # type: ignore[attr-defined]


def ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_greedy_output_equals_the_builtin_engine(vllm: ProcessEngine, builtin: HFEngine):
    want = [ids(await run(builtin, p, max_tokens=24, temperature=0, ignore_eos=True)) for p in PROMPTS]
    # all at once: vLLM batches them
    got = await asyncio.gather(*(run(vllm, p, f"g{i}", max_tokens=24, temperature=0, ignore_eos=True)
                                 for i, p in enumerate(PROMPTS)))
    assert [ids(d) for d in got] == want
    for deltas in got:
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 24
        assert "".join(d.text for d in deltas) == builtin.tokenizer.decode(ids(deltas), skip_special_tokens=True)


async def test_a_resumed_sampled_stream_continues_with_the_same_tokens(vllm: ProcessEngine):
    params = {"max_tokens": 32, "temperature": 0.9, "top_p": 0.95, "seed": 4321, "ignore_eos": True}
    whole = ids(await run(vllm, PROMPTS[0], "whole", **params))
    assert whole == ids(await run(vllm, PROMPTS[0], "again", **params))
    assert whole != ids(await run(vllm, PROMPTS[0], "other", **{**params, "seed": 1}))
    for cut in (1, 11, 31):
        rest = await run(vllm, PROMPTS[0], f"resume{cut}", resume=tuple(whole[:cut]), **params)
        assert ids(rest) == whole[cut:], f"resumed after {cut} tokens"
        assert rest[-1].completion_tokens == 32


async def test_penalties_logprobs_and_stops(vllm: ProcessEngine, builtin: HFEngine):
    deltas = await run(vllm, PROMPTS[1], max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
    entries = [lp for d in deltas for lp in d.logprobs]
    assert [e.token_id for e in entries] == ids(deltas)
    assert all(len(e.top) == 3 and e.top[0][1] >= e.top[-1][1] and e.logprob <= 0 for e in entries)
    assert all(e.token_id == e.top[0][0] for e in entries)  # greedy picks the top token
    # a repetition penalty changes a greedy output that repeats itself, as in the built-in engine
    plain = ids(await run(builtin, PROMPTS[1], max_tokens=24, temperature=0, ignore_eos=True))
    penalised = await run(vllm, PROMPTS[1], max_tokens=24, temperature=0, repetition_penalty=1.5, ignore_eos=True)
    assert ids(penalised) == ids(await run(builtin, PROMPTS[1], max_tokens=24, temperature=0,
                                           repetition_penalty=1.5, ignore_eos=True))
    assert ids(penalised) != plain
    # a stop string ends the output before it, finish "stop"
    text = "".join(d.text for d in await run(vllm, PROMPTS[0], max_tokens=24, temperature=0, ignore_eos=True))
    stop = text[5:8]
    stopped = await run(vllm, PROMPTS[0], max_tokens=24, temperature=0, stop=(stop,), ignore_eos=True)
    assert stopped[-1].finish_reason == "stop"
    assert "".join(d.text for d in stopped) == text[:text.index(stop)]


async def test_adapters_apply_per_request_in_one_batch(vllm: ProcessEngine, builtin: HFEngine,
                                                       adapters: dict[str, AdapterRef]):
    cases = [None, adapters["a"], adapters["b"], None, adapters["a"]]
    want = [ids(await run(builtin, PROMPTS[0], adapter=a, max_tokens=16, temperature=0, ignore_eos=True))
            for a in cases]
    assert len({tuple(w) for w in want}) == 3  # each adapter changes the output
    got = await asyncio.gather(*(run(vllm, PROMPTS[0], f"lora{i}", adapter=a, max_tokens=16, temperature=0,
                                     ignore_eos=True) for i, a in enumerate(cases)))
    assert [ids(d) for d in got] == want


async def test_constrained_output_follows_its_schema(vllm: ProcessEngine):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    for seed in (1, 2, 3):
        deltas = await run(vllm, PROMPTS[0], f"json{seed}", max_tokens=60, temperature=1.0, seed=seed,
                           guide=GuideSpec("json_schema", json.dumps(schema)))
        assert deltas[-1].finish_reason == "stop", "the schema closes the object before max_tokens"
        value = json.loads("".join(d.text for d in deltas))
        assert set(value) == {"name", "ok"} and isinstance(value["ok"], bool) and len(value["name"]) <= 12
        assert "".join(d.text for d in deltas).startswith('{"'), "compact JSON, as the built-in engine writes it"


async def test_a_bad_adapter_fails_its_request_and_the_engine_serves_on(vllm: ProcessEngine):
    with pytest.raises(InvalidArgument, match="bad@1 cannot be loaded"):
        await run(vllm, PROMPTS[0], adapter=AdapterRef("bad@1", "/nonexistent/adapter"), max_tokens=4)
    assert len(ids(await run(vllm, PROMPTS[0], max_tokens=4, temperature=0, ignore_eos=True))) == 4


async def test_a_closed_stream_is_aborted_in_vllm(vllm: ProcessEngine):
    stream = vllm.generate(GenerationRequest("long", PROMPTS[2], SamplingParams(max_tokens=900, ignore_eos=True)))
    async for _ in stream:
        break
    await stream.aclose()
    closed = asyncio.get_running_loop().time()
    # left running, 900 tokens take seconds here (and longer on a busier machine); aborted, the
    # engine is idle by its next status report (every 0.5 s)
    while vllm.stats().running or vllm.stats().waiting:
        assert asyncio.get_running_loop().time() - closed < 1.5, f"the closed request still runs: {vllm.stats()}"
        await asyncio.sleep(0.05)
    assert len(ids(await run(vllm, PROMPTS[0], max_tokens=4))) == 4


async def test_a_resumed_stream_keeps_penalties_min_tokens_and_stop_strings(vllm: ProcessEngine):
    params = {"max_tokens": 40, "temperature": 0.8, "seed": 77, "repetition_penalty": 1.3, "presence_penalty": 0.5,
              "min_tokens": 20, "stop": ("@@never@@", "self.zz")}
    whole = await run(vllm, PROMPTS[2], "whole", **params)
    tokens, text = ids(whole), "".join(d.text for d in whole)
    tokenizer = vllm.tokenizer
    sent_ids: list[int] = []
    sent_text = ""
    for d in whole[:-1]:  # every delta but the last ends where the tokens' text is the text sent
        sent_ids += d.token_ids
        sent_text += d.text
        assert tokenizer.decode(sent_ids, skip_special_tokens=True) == sent_text
    for cut in (3, 17, 25):
        if cut >= len(tokens):
            continue
        rest = await run(vllm, PROMPTS[2], f"rest{cut}", resume=tuple(tokens[:cut]), **params)
        assert ids(rest) == tokens[cut:], f"resumed after {cut} tokens"
        assert tokenizer.decode(tokens[:cut], skip_special_tokens=True) + "".join(d.text for d in rest) == text


async def test_a_bad_request_is_invalid_argument_and_the_engine_serves_on(vllm: ProcessEngine):
    with pytest.raises(InvalidArgument):
        await run(vllm, PROMPTS[0], max_tokens=4, guide=GuideSpec("regex", "((("))
    assert len(ids(await run(vllm, PROMPTS[0], max_tokens=4, temperature=0, ignore_eos=True))) == 4
    assert not vllm._dead


async def test_load_reports_come_from_vllms_scheduler(vllm: ProcessEngine):
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(vllm.stats().running)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(run(vllm, p, f"load{i}", max_tokens=700, ignore_eos=True) for i, p in enumerate(PROMPTS)))
    watcher.cancel()
    assert max(seen) >= 2, f"running counts seen while 4 requests ran: {sorted(set(seen))}"


async def test_kv_events_name_the_prompts_blocks_as_the_router_does(vllm: ProcessEngine, builtin: HFEngine,
                                                                    adapters: dict[str, AdapterRef]):
    """vLLM's BlockStored events reach the worker (through the engine process's status
    messages) renamed with kvblocks' chained names: the names a router computes from the
    prompt's tokens, namespaced by adapter, whatever vLLM's own hashes are."""
    assert vllm.kv_events is not None
    events = vllm.kv_events
    prompt = "# a long shared system prompt: " + " ".join(f"rule {i} is to be kind;" for i in range(80))
    prompt_ids = builtin.tokenizer(prompt)["input_ids"]
    assert len(prompt_ids) > 3 * 128  # several of vLLM's blocks
    await run(vllm, prompt, "kv-base", max_tokens=4, temperature=0)
    await run(vllm, prompt, "kv-adapter", max_tokens=4, temperature=0, adapter=adapters["a"])

    def holds(names: list[int]) -> bool:
        return bool(names) and all(n in events for n in names)

    size = events.block_size
    assert size > 0
    base = kvblocks.block_hashes(prompt_ids, size)
    adapted = kvblocks.block_hashes(prompt_ids, size, adapters["a"].key)
    await eventually(lambda: holds(base) and holds(adapted), timeout=10)
    assert not set(base) & set(adapted)


async def test_a_dead_engine_core_fails_streams_with_engine_dead(vllm: ProcessEngine):
    """Last in the module: it kills the engine's vLLM core (a child of the engine process)."""
    assert vllm._process is not None
    children = _children(vllm._process.pid)
    assert children, "vLLM's engine core process was not found"
    stream = vllm.generate(GenerationRequest("doomed", PROMPTS[3], SamplingParams(max_tokens=900, ignore_eos=True)))
    with pytest.raises(EngineDead):
        async for _ in stream:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            children = []


def _children(parent: int) -> list[int]:
    """The live processes whose parent is `parent` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
