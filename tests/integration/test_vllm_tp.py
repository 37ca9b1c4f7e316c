"""Several devices per replica (issue 17 item 4): a model version asking for two devices is
placed on two devices of one worker (`maas worker --cpu-devices 2 --engine vllm`) and served
by vLLM tensor-parallel across them, a rank per device; its greedy output through the router
equals the built-in engine's. The engines that load a model onto one device refuse such a
replica, naming engine=vllm as the way.

A killed engine process takes vLLM's processes with it (here rather than in a test of its
own: loading vLLM is most of either test's time). The vLLM test is skipped where
MAAS_VLLM_PYTHON names no environment with vLLM (`make test` makes one)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from maas.mesh.errors import FailedPrecondition
from maas.services.worker.engines.base import ModelSpec
from maas.services.worker.engines.hf import HFEngine
from maas.services.worker.replicas import check_devices
from maas.v1 import common_pb2, registry_pb2

from .conftest import MeshHarness, eventually
from .test_migration import _workers
from .test_vllm_engine import _alive, ids, needs_vllm, run

PROMPTS = ["def add(a, b):", "class Stack:\n    def push(self, item):"]


def test_engines_on_one_device_refuse_a_replica_on_two():
    two = ("cpu:0", "cpu:1")
    for task, engine in (("generate", "the built-in engine"), ("embed", "the embedding engine")):
        with pytest.raises(FailedPrecondition, match="engine=vllm") as refused:
            check_devices(ModelSpec("demo", 1, "hf", "/models/demo", task=task, devices=two))
        assert engine in str(refused.value) and "cpu:0, cpu:1" in str(refused.value)
    check_devices(ModelSpec("demo", 1, "hf", "/models/demo", options={"engine": "vllm"}, devices=two))
    check_devices(ModelSpec("demo", 1, "hf", "/models/demo", devices=("cpu:1",)))  # one device: any engine
    check_devices(ModelSpec("sim", 1, "sim", "", devices=two))  # the simulator pretends


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, process name) of `pid`'s descendants."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        names[int(entry.name)] = name
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append((p, names.get(p, "")))
        todo += children.get(p, [])
    return out


@pytest.mark.slow
@needs_vllm
async def test_a_replica_on_two_devices_runs_tensor_parallel_on_vllm(mesh: MeshHarness, demo_model_dir: Path):
    await mesh.core()
    worker = mesh.spawn("worker", "--instance", "w1", "--cpu-memory-gib", "4", "--cpu-devices", "2",
                        "--engine", "vllm")
    await eventually(lambda: _workers(mesh, 1), timeout=30)
    registry = await mesh.stub("registry")
    await registry.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="demo", format="hf", source=str(demo_model_dir), options={"kv_cache_mb": "64", "max_adapters": "0"},
        resources=common_pb2.Resources(devices=2)), timeout=10)
    await mesh.deploy("demo")
    st = await mesh.wait_ready("demo", timeout=240)  # two vLLM ranks warming up on 2 cores
    (replica,) = st.replicas
    assert replica.worker_id == "w1" and sorted(replica.device_ids) == ["cpu:0", "cpu:1"], replica
    assert worker.proc is not None
    tree = _descendants(worker.proc.pid)
    ranks = [pid for pid, name in tree if name.startswith("VLLM::Worker")]
    assert len(ranks) == 2, f"expected a vLLM worker process per device, found {tree}"
    # in the engine process's own process group: a killed engine process takes them along
    engine_groups = {pid for pid, _ in tree if pid not in ranks and os.getpgid(pid) == pid}
    assert {os.getpgid(pid) for pid in ranks} <= engine_groups, tree

    builtin = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir)))
    await builtin.load()
    try:
        for prompt in PROMPTS:
            want = ids(await run(builtin, prompt, max_tokens=24, temperature=0, ignore_eos=True))
            chunks = await mesh.generate("demo", prompt, timeout=60, max_tokens=24, temperature=0, ignore_eos=True)
            assert [t for c in chunks for t in c.token_ids] == want, prompt
            assert "".join(c.text for c in chunks) == builtin.tokenizer.decode(want, skip_special_tokens=True)
            assert {c.replica_id for c in chunks if c.replica_id} == {replica.replica_id}
    finally:
        await builtin.close()

    # a killed engine process takes vLLM's engine core and both ranks with it (the worker
    # kills the engine's process group when its pipe closes): nothing is left holding the
    # devices. (Streams failing with EngineDead when it dies: tests/unit/test_engine_process.py.)
    (engine_pid,) = [pid for pid in engine_groups if set(ranks) <= {p for p, _ in _descendants(pid)}]
    left = [pid for pid, _ in _descendants(engine_pid)]
    assert len(left) > len(ranks), f"expected vLLM's engine core beside the ranks, found {left}"
    os.kill(engine_pid, signal.SIGKILL)
    await eventually(lambda: not any(_alive(pid) for pid in left), timeout=15)
