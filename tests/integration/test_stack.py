"""The whole stack the way a user starts it: `maas up`, `maas status --wait`,
`maas generate`, `maas events`, then Ctrl-C. Uses the forged demo model and the real
transformers engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maas.stack.servers import free_port

pytestmark = pytest.mark.slow


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_maas_up_serves_the_demo_model_end_to_end(tmp_path: Path, demo_model_dir: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_DATA_DIR": str(tmp_path / ".maas")}
    # reuse the session's forged model so this test does not train it again
    (tmp_path / ".maas" / "models").mkdir(parents=True)
    os.symlink(demo_model_dir, tmp_path / ".maas" / "models" / "demo")
    router_port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "maas", "up", "--router-port", str(router_port)],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def maas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "maas", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=timeout)

        started = time.monotonic()
        status = maas("status", "--wait", "240", timeout=260)
        assert status.returncode == 0, status.stdout + status.stderr
        print(f"stack ready in {time.monotonic() - started:.1f}s")
        assert "demo" in status.stdout and "1/1" in status.stdout

        gen = maas("generate", "--model", "demo", "--max-tokens", "24", "--temperature", "0", "def add(a, b):")
        assert gen.returncode == 0, gen.stderr
        completion = gen.stdout.removeprefix("def add(a, b):")
        assert completion.strip(), "the demo model produced text"
        assert "finish=" in gen.stderr and "demo@1" in gen.stderr

        streamed = maas("generate", "--model", "demo", "--max-tokens", "8", "--json", "--seed", "3", "x = ")
        chunks = [line for line in streamed.stdout.splitlines() if line.startswith("{")]
        assert len(chunks) >= 2, "tokens are streamed as they are produced"

        workers = maas("workers")
        assert workers.returncode == 0 and "demo@1 ready" in workers.stdout, workers.stdout + workers.stderr

        bad = maas("generate", "--model", "nope", "hi")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr

        events = maas("events")
        for subject in ("service.started", "worker.joined", "model.registered", "deployment.created",
                        "replica.loading", "replica.ready"):
            assert subject in events.stdout, f"{subject} missing from:\n{events.stdout}"
    finally:
        children = _children_of(up.pid)
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    print(out)
    assert "maas-mesh is up" in out
    assert up.returncode == 0
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"processes left behind: {alive}"
