"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The forged demo model (see `maas.models.forge`), built once and cached across runs.

    Lives under $MAAS_TEST_CACHE, or ~/.cache/maas-mesh/test-models, in a directory
    named after the forge parameters.
    """
    from maas.models.forge import DEFAULT_STEPS, FORGE_VERSION, forge_demo_model

    root = Path(os.environ.get("MAAS_TEST_CACHE") or Path.home() / ".cache" / "maas-mesh" / "test-models")
    return forge_demo_model(root / f"demo-v{FORGE_VERSION}-seed0-steps{DEFAULT_STEPS}", seed=0)


def live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, command line split at NULs) of every process /proc shows now (those that
    vanish while read are skipped): for tests that check what a kill left behind."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(pid), cmdline
