"""Workers on one host split its cores between their torch thread pools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maas.mesh.errors import StartupError
from maas.services.worker.main import limit_torch_threads
from maas.stack.supervisor import Stack, UpConfig


def _threads_after(code: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


@pytest.mark.parametrize("import_torch_first", [False, True])
def test_the_limit_holds_whether_torch_was_imported_or_not(import_torch_first: bool) -> None:
    pre = "import torch; " if import_torch_first else ""
    code = (f"{pre}from maas.services.worker.main import limit_torch_threads; limit_torch_threads(1); "
            "import torch; print(torch.get_num_threads())")
    assert _threads_after(code, {"OMP_NUM_THREADS": "2"}) == "1"


def test_zero_leaves_torch_alone_and_negative_is_refused() -> None:
    limit_torch_threads(0)
    with pytest.raises(StartupError, match="--torch-threads must be 0"):
        limit_torch_threads(-1)


def test_maas_up_divides_the_cores_among_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_TORCH_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert Stack(UpConfig(Path("/unused"), workers=2))._torch_threads() == ("--torch-threads", str(max(1, (cores - 1) // 2)))
    assert Stack(UpConfig(Path("/unused"), workers=cores * 4))._torch_threads() == ("--torch-threads", "1")
    # the operator's choice wins
    assert Stack(UpConfig(Path("/unused"), workers=2, worker_args=("--torch-threads", "3")))._torch_threads() == ()
    monkeypatch.setenv("MAAS_TORCH_THREADS", "3")
    assert Stack(UpConfig(Path("/unused"), workers=2))._torch_threads() == ()
