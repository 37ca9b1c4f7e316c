"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
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
