"""Find the devices a worker owns: CUDA GPUs through torch, else the CPU as one device (or
as N, `--cpu-devices N`: cpu:0..cpu:N-1, each with 1/N of the memory budget; they share the
cores, and are there so that jobs and replicas on several devices run on a CPU machine, as
the fine-tuning tests on two gloo processes do)."""

from __future__ import annotations

import os

from maas.mesh.errors import StartupError
from maas.services.worker.extra import has_worker_extra, worker_extra_hint
from maas.v1 import mesh_pb2

GiB = 1024**3


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def detect_devices(kind: str = "auto", cpu_memory_bytes: int = 0, cpu_devices: int = 1) -> list[mesh_pb2.Device]:
    """kind: auto (CUDA if present, else CPU), cuda or cpu. cpu_memory_bytes: the CPU's
    budget (default: half the available memory, at most 16 GiB), split evenly between
    `cpu_devices` devices (one: id "cpu"; more: "cpu:0", "cpu:1", ...). Without the worker
    extra (no torch) auto means the CPU and cuda is a StartupError naming the extra."""
    if cpu_devices < 1:
        raise StartupError(f"--cpu-devices must be at least 1, got {cpu_devices}")
    if kind == "cuda" and not has_worker_extra():
        raise StartupError(worker_extra_hint("--device cuda"))
    if kind in ("auto", "cuda") and has_worker_extra():
        import torch

        if torch.cuda.is_available():
            devices = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                devices.append(mesh_pb2.Device(id=f"cuda:{i}", name=torch.cuda.get_device_name(i),
                                               memory_total_bytes=total, memory_free_bytes=free))
            return devices
        if kind == "cuda":
            raise StartupError("--device cuda was asked for but torch sees no CUDA device")
    available = _mem_available()
    budget = cpu_memory_bytes or min(available // 2, 16 * GiB)
    if cpu_devices == 1:
        return [mesh_pb2.Device(id="cpu", name=f"cpu ({os.cpu_count()} cores)", memory_total_bytes=budget,
                                memory_free_bytes=min(budget, available))]
    share = budget // cpu_devices
    return [mesh_pb2.Device(id=f"cpu:{i}", name=f"cpu {i + 1}/{cpu_devices} ({os.cpu_count()} cores, shared)",
                            memory_total_bytes=share, memory_free_bytes=min(share, available // cpu_devices))
            for i in range(cpu_devices)]
