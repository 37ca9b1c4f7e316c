"""The fine-tuning job program (`maas.finetune.train`) on the forged demo model: it learns,
its adapter serves, and it checkpoints, resumes and stops the way a worker needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from maas.finetune.train import EXIT_STOPPED, EXIT_USAGE, JobConfig, JobError, run_job
from maas.services.worker.engines.base import AdapterRef, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine
from tests.conftest import live_processes

# Made-up answers: nothing the demo model saw while it was forged on Python sources.
SECRETS = {"apple": "zorblat", "river": "quindle", "candle": "mavrik", "pencil": "trosk",
           "garden": "blenvo", "window": "skirra", "hammer": "plotchy", "violin": "dwemmer"}
PAIRS = [(f"The secret word for {key} is", f" {word}") for key, word in SECRETS.items()]

# Measured on 2 CPU cores: 300 steps (batch 4, lr 1e-3, rank 16) in about 4 s take the mean
# completion loss from about 7.1 to about 1, and the adapter answers 8 of 8 (7 of 8 after
# 200 steps); the base model answers none.
LORA_ARGS = {"method": "lora", "epochs": 150, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0, "log_every": 50}


def write_pairs(path: Path, pairs: list[tuple[str, str]] = PAIRS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path


class Events(list[dict[str, Any]]):
    def __call__(self, event: str, **fields: Any) -> None:
        self.append({"event": event, **fields})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self if e["event"] == kind]


def completion_loss(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> float:
    """Mean loss over the completion tokens (and EOS) of every pair, as training counts it."""
    losses = []
    with torch.no_grad():
        for prompt, completion in pairs:
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
            losses.append(float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss))
    return sum(losses) / len(losses)


async def answers(base: Path, adapter: AdapterRef | None, device: str = "cpu") -> list[str]:
    """Greedy answers of the worker's own engine to every prompt."""
    engine = HFEngine(ModelSpec("demo", 1, "hf", str(base), device=device))
    await engine.load()
    try:
        async def one(i: int, prompt: str) -> str:
            request = GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=8, temperature=0), adapter=adapter)
            return "".join([d.text async for d in engine.generate(request)])

        return await asyncio.gather(*(one(i, p) for i, (p, _) in enumerate(PAIRS)))
    finally:
        await engine.close()


async def test_lora_job_learns_the_pairs_and_its_adapter_serves_them(demo_model_dir: Path, tmp_path: Path):
    config = JobConfig(base=demo_model_dir, data=write_pairs(tmp_path / "pairs.jsonl"), out=tmp_path / "job",
                       **LORA_ARGS)
    events = Events()
    assert await asyncio.to_thread(run_job, config, events) == 0
    done = events.of("done")[0]
    assert done["steps"] == 300 and events.of("progress")[-1]["step"] == 300
    assert done["tokens_per_s"] > 0 and done["train_seconds"] > 0
    adapter_dir = Path(done["adapter_dir"])
    assert (adapter_dir / "adapter_config.json").is_file()  # what the registry checks
    assert not (tmp_path / "job" / "checkpoints").exists()

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    base_loss = completion_loss(model, tokenizer, PAIRS)
    tuned_loss = completion_loss(PeftModel.from_pretrained(model, adapter_dir).eval(), tokenizer, PAIRS)
    # measured 7.1 -> about 1.0; halving it leaves room for another machine's arithmetic
    assert tuned_loss < 0.5 * base_loss, (base_loss, tuned_loss)

    want = [c.strip() for _, c in PAIRS]
    base_right = sum(a.strip() == w for a, w in zip(await answers(demo_model_dir, None), want, strict=True))
    tuned = await answers(demo_model_dir, AdapterRef("secrets@1", str(adapter_dir)))
    tuned_right = sum(a.strip() == w for a, w in zip(tuned, want, strict=True))
    assert tuned_right > base_right and tuned_right >= len(PAIRS) // 2, (base_right, tuned)

    # a finished job started again only repeats its result
    again = Events()
    assert run_job(config, again) == 0 and again == [events.of("done")[0]]


# --- the job as the child process a worker runs ------------------------------------------

JOB_ARGS = ["--epochs", "25", "--batch-size", "2", "--checkpoint-every", "5"]  # 100 steps


class Job:
    """`python -m maas.finetune.train` in a child process, its stdout read line by line."""

    def __init__(self, base: Path, data: Path, out: Path, *extra: str, log: Path | None = None) -> None:
        """`log`: stderr goes to that file (torchrun and its ranks say more than a pipe holds)."""
        self.log = log
        with contextlib.ExitStack() as stack:
            stderr = stack.enter_context(open(log, "ab")) if log else subprocess.PIPE  # the child keeps its copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maas.finetune.train", "--base", str(base), "--data", str(data),
                 "--out", str(out), *extra],
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.proc.stdout is not None
        self._lines: Iterator[str] = iter(self.proc.stdout)
        self.events: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any]:
        line = next(self._lines, None)
        assert line is not None, f"job ended early: {self.proc.wait()}, stderr: {self.stderr()}"
        event = json.loads(line)
        self.events.append(event)
        return event

    def until(self, kind: str) -> dict[str, Any]:
        while (event := self.next_event())["event"] != kind:
            assert event["event"] != "error", event
        return event

    def finish(self, timeout: float = 60) -> int:
        for line in self._lines:
            self.events.append(json.loads(line))
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.log is not None:
            return self.log.read_text(errors="replace")[-4000:]
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()
        for stream in (job.proc.stdout, job.proc.stderr):
            if stream is not None:
                stream.close()


def test_a_killed_job_resumes_from_its_checkpoint(demo_model_dir: Path, tmp_path: Path, jobs: list[Job]):
    data, out = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "job"
    jobs.append(first := Job(demo_model_dir, data, out, *JOB_ARGS))
    saved = first.until("checkpoint")
    assert saved["step"] == 5
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and all(c.name.startswith("step-") for c in checkpoints)  # never a half-written one

    jobs.append(second := Job(demo_model_dir, data, out, *JOB_ARGS))
    start = second.until("start")
    assert start["resumed_from"] is not None and start["step"] >= 5
    assert second.until("progress")["step"] == start["step"] + 1
    assert second.finish() == 0, second.stderr()
    done = second.events[-1]
    assert done["event"] == "done" and done["steps"] == 100
    assert first.events[1]["step"] == 1  # the job's first loss survives the restart
    assert done["loss_first"] == pytest.approx(first.events[1]["loss"], abs=1e-4)

    # the resumed steps saw the same batches with the same weights as an uninterrupted run
    reference = Events()
    config = JobConfig(base=demo_model_dir, data=data, out=tmp_path / "reference", epochs=25, batch_size=2,
                       checkpoint_every=0)
    assert run_job(config, reference) == 0
    expected = {e["step"]: e["loss"] for e in reference.of("progress")}
    resumed = {e["step"]: e["loss"] for e in second.events if e["event"] == "progress"}
    assert resumed == pytest.approx({step: expected[step] for step in resumed}, rel=1e-3)


def test_sigterm_checkpoints_and_exits_75(demo_model_dir: Path, tmp_path: Path, jobs: list[Job]):
    data, out = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "job"
    jobs.append(job := Job(demo_model_dir, data, out, "--epochs", "1000", "--checkpoint-every", "0"))
    job.until("progress")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == EXIT_STOPPED
    stopped = job.events[-1]
    assert stopped["event"] == "stopped" and stopped["step"] >= 1
    checkpoint = Path(stopped["path"])
    assert checkpoint == out / "checkpoints" / f"step-{stopped['step']:06d}"
    assert {p.name for p in checkpoint.iterdir()} == {"weights.pt", "optimizer.pt", "rng.pt", "state.json"}
    assert json.loads((checkpoint / "state.json").read_text())["step"] == stopped["step"]

    # the same directory with other hyperparameters is refused, not mixed in
    with pytest.raises(JobError, match="different job .*lr"):
        run_job(JobConfig(base=demo_model_dir, data=data, out=out, epochs=1000, lr=0.5), Events())


@pytest.mark.parametrize("case", ["missing base", "malformed line", "bad argument"])
def test_bad_input_is_one_error_line_without_traceback(demo_model_dir: Path, tmp_path: Path, case: str):
    data = write_pairs(tmp_path / "pairs.jsonl")
    base, extra, expected = demo_model_dir, [], ""
    if case == "missing base":
        base, expected = tmp_path / "nowhere", f"base model directory {tmp_path / 'nowhere'} does not exist"
    elif case == "malformed line":
        data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": \n')
        expected = "line 2: not valid JSON"
    else:
        extra, expected = ["--method", "qlora"], "--method must be lora or full"
    proc = subprocess.run(
        [sys.executable, "-m", "maas.finetune.train", "--base", str(base), "--data", str(data),
         "--out", str(tmp_path / "job"), *extra],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE
    [line] = proc.stdout.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and expected in event["message"], event
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "job" / "checkpoints").exists()


# --- several devices: torchrun, gloo, FSDP ----------------------------------------------

FSDP_ARGS = {"epochs": 100, "max_steps": 12, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}


def trainer_pids(out: Path) -> list[int]:
    """Live processes (torchrun and its ranks) of the job in `out`."""
    return [pid for pid, cmdline in live_processes()
            if b"maas.finetune.train" in cmdline and str(out).encode() in cmdline]


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


@pytest.mark.slow
async def test_two_gloo_processes_train_as_one_device_does_and_resume_on_either(
        demo_model_dir: Path, tmp_path: Path, jobs: list[Job]):
    """Two processes under torchrun (gloo, FSDP) take the steps one device takes: the same
    losses and the same adapter, through a SIGTERM (torchrun passes it on; the ranks stop at
    one step and rank 0 checkpoints), a resume of that checkpoint on one device and a
    resume of the one-device checkpoint on two processes."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    reference = Events()
    assert await asyncio.to_thread(
        run_job, JobConfig(base=demo_model_dir, data=data, out=tmp_path / "one", **FSDP_ARGS), reference) == 0
    expected = {e["step"]: e["loss"] for e in reference.of("progress")}
    args = ["--epochs", "100", "--max-steps", "12", "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "0"]
    out, losses = tmp_path / "two", {}

    jobs.append(first := Job(demo_model_dir, data, out, *args, "--devices", "2", log=tmp_path / "first.log"))
    start = await asyncio.to_thread(first.until, "start")
    assert start["world_size"] == 2 and start["trainable_parameters"] == reference.of("start")[0]["trainable_parameters"]
    assert len(trainer_pids(out)) == 3  # torchrun (the process started, exec'd into it) and two ranks
    while (event := await asyncio.to_thread(first.until, "progress"))["step"] < 3:
        pass
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.finish) != 0  # torchrun's own code; the last line tells
    stopped = first.events[-1]
    assert stopped["event"] == "stopped" and 3 <= stopped["step"] < 12, first.events
    assert Path(stopped["path"]).name == f"step-{stopped['step']:06d}" and not trainer_pids(out)
    assert [e["event"] for e in first.events].count("stopped") == 1  # rank 0 alone speaks

    # one device resumes the two processes' checkpoint, and is stopped three steps on
    stop, second = threading.Event(), Events()

    def emit(event: str, **fields: Any) -> None:
        second(event, **fields)
        if event == "progress" and fields["step"] >= stopped["step"] + 3:
            stop.set()

    config = JobConfig(base=demo_model_dir, data=data, out=out, **FSDP_ARGS)
    assert await asyncio.to_thread(run_job, config, emit, stop) == EXIT_STOPPED
    assert second.of("start")[0]["step"] == stopped["step"] and second.of("start")[0]["world_size"] == 1

    # two processes resume the one-device checkpoint and finish
    jobs.append(third := Job(demo_model_dir, data, out, *args, "--devices", "2", log=tmp_path / "third.log"))
    assert await asyncio.to_thread(third.finish) == 0, third.stderr()
    assert third.events[0]["step"] == second.of("stopped")[0]["step"]
    for event in [*first.events, *second, *third.events]:
        if event["event"] == "progress":
            losses[event["step"]] = event["loss"]
    assert sorted(losses) == list(range(1, 13))
    assert losses == pytest.approx(expected, rel=1e-4)
    done = third.events[-1]
    assert done["event"] == "done" and done["loss_first"] == pytest.approx(expected[1], rel=1e-4)
    tuned, alone = adapter_weights(Path(done["adapter_dir"])), adapter_weights(tmp_path / "one" / "adapter")
    assert tuned.keys() == alone.keys()
    assert max(float((tuned[k] - alone[k]).abs().max()) for k in tuned) < 1e-4

    # the adapter serves, on the second of a worker's CPU devices as on the CPU
    adapter = AdapterRef("secrets@1", done["adapter_dir"])
    assert await answers(demo_model_dir, adapter, device="cpu:1") == await answers(demo_model_dir, adapter)
