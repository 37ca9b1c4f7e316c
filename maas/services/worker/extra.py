"""The `worker` extra: torch and the model libraries a worker needs to serve transformers
models and run fine-tuning jobs (`pip install 'maas-mesh[worker]'`).

The control plane (router, registry, scheduler, the CLI) runs without them. A worker without
them serves sim models only: it offers the scheduler no other format, and is refused, with
the command that installs the extra, anything that needs one.
"""

from __future__ import annotations

import functools
import importlib.util

from maas.mesh.errors import FailedPrecondition

INSTALL_WORKER_EXTRA = "pip install 'maas-mesh[worker]'"
WORKER_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "peft", "llguidance")
"""The top-level modules of the `worker` extra (pyproject.toml), as imported."""


@functools.cache
def missing_worker_modules() -> tuple[str, ...]:
    """The worker extra's modules this interpreter cannot import (none: the extra is installed)."""
    missing = []
    for name in WORKER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses the name, a broken installation
            found = False
        if not found:
            missing.append(name)
    return tuple(missing)


def has_worker_extra() -> bool:
    return not missing_worker_modules()


def worker_extra_hint(what: str) -> str:
    """A sentence saying that `what` needs the worker extra, what is missing, and how to install it."""
    return (f"{what} needs the worker extra ({', '.join(missing_worker_modules())} not installed): "
            f"{INSTALL_WORKER_EXTRA}")


def require_worker_extra(what: str) -> None:
    """FailedPrecondition naming the extra unless it is installed."""
    if not has_worker_extra():
        raise FailedPrecondition(worker_extra_hint(what))
