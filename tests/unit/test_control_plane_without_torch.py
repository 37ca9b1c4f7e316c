"""The control plane (router, registry, scheduler, the CLI) runs without the `worker` extra,
as in the `control` image of deploy/Dockerfile: each check runs in a fresh interpreter whose
imports of torch, the other worker-only libraries and every package the control plane does
not depend on raise ModuleNotFoundError (`without_worker_extra`). A worker without the extra
serves sim models only and refuses the rest with the command that installs the extra.

tests/integration/test_control_plane_without_torch.py starts the services so."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

from maas.services.worker.extra import INSTALL_WORKER_EXTRA, WORKER_MODULES

WORKER_ONLY_MODULES = frozenset({
    "maas.models.forge",
    "maas.services.worker.engines.batch",
    "maas.services.worker.engines.embed",
    "maas.services.worker.engines.guide",
    "maas.services.worker.engines.hf",
    "maas.services.worker.engines.prefix",
    "maas.services.worker.engines.sampling",
    "maas.services.worker.engines.vllm",
    "maas.services.worker.engines.vllm_sampler",
})
"""The modules that import the worker extra's libraries (or vLLM) as they load: only a
worker's engines and the demo model's forge. Every other module must import without."""

ALWAYS_THERE = frozenset({"pip", "setuptools", "pkg_resources", "_distutils_hack", "maas"})


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def control_plane_distributions() -> set[str]:
    """maas-mesh and what it depends on without extras, transitively (as installed here)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("maas-mesh", frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (_name(name), extras) in seen:
            continue
        seen.add((_name(name), extras))
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


def blocked_modules() -> set[str]:
    """The worker extra's modules, and every top-level module installed here by a distribution
    outside the control plane's dependencies (the test tools, torch's own dependencies, ...)."""
    allowed = control_plane_distributions()
    outside = {module for module, dists in md.packages_distributions().items()
               if module.isidentifier() and not any(_name(d) in allowed for d in dists)}
    return (outside | set(WORKER_MODULES)) - ALWAYS_THERE


SITECUSTOMIZE = '''\
"""Installed by the maas-mesh tests: this interpreter has no worker extra."""
import importlib.util
import sys

BLOCKED = frozenset({blocked!r})


def blocked(name):
    return name.partition(".")[0] in BLOCKED


class WithoutWorkerExtra:
    """Every import of a blocked module raises ModuleNotFoundError, as if not installed."""

    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not installed without the worker extra)",
                                      name=name)
        return None


def find_spec(name, package=None, _find_spec=importlib.util.find_spec):
    """A probe (`importlib.util.find_spec(name) is not None`) finds no blocked module either."""
    return None if blocked(name) else _find_spec(name, package)


sys.meta_path.insert(0, WithoutWorkerExtra())
importlib.util.find_spec = find_spec
'''


def without_worker_extra(directory: Path) -> dict[str, str]:
    """The environment of a Python process (and of every Python process it starts) that
    cannot import what the control plane does not depend on: a `sitecustomize` in `directory`,
    put first on PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=sorted(blocked_modules())))
    path = os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_python(code: str, tmp_path: Path) -> dict[str, object]:
    """Run `code` without the worker extra; it prints one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=without_worker_extra(tmp_path / "site"),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_blocker_blocks_torch_and_the_test_tools(tmp_path: Path):
    result = run_python("""
        import importlib, json
        def importable(name):
            try:
                importlib.import_module(name)
                return True
            except ModuleNotFoundError:
                return False
        print(json.dumps({n: importable(n) for n in ("torch", "transformers", "peft", "pytest", "grpc", "faiss")}))
    """, tmp_path)
    assert result == {"torch": False, "transformers": False, "peft": False, "pytest": False,
                      "grpc": True, "faiss": True}


def test_every_control_plane_module_imports_without_the_worker_extra(tmp_path: Path):
    result = run_python(f"""
        import importlib, json, pkgutil, sys
        import maas

        failed, imported = {{}}, []
        for info in pkgutil.walk_packages(maas.__path__, "maas."):
            if info.name in {sorted(WORKER_ONLY_MODULES)!r} or info.name == "maas.__main__":
                continue
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except Exception as e:
                failed[info.name] = f"{{type(e).__name__}}: {{e}}"
        print(json.dumps({{"failed": failed, "imported": imported,
                          "loaded": sorted(m for m in {list(WORKER_MODULES)!r} if m in sys.modules)}}))
    """, tmp_path)
    assert result["failed"] == {}, "these modules need a worker-only library at import time: " + "; ".join(
        f"{m} ({why})" for m, why in result["failed"].items())  # type: ignore[union-attr]
    imported = set(result["imported"])  # type: ignore[arg-type]
    for module in ("maas.services.router.main", "maas.services.router.http", "maas.services.router.pipelines",
                   "maas.services.registry.main", "maas.services.registry.s3", "maas.services.scheduler.main",
                   "maas.services.worker.main", "maas.cli.main", "maas.pipelines.index", "maas.stack.supervisor"):
        assert module in imported
    assert result["loaded"] == []


def test_the_cli_and_every_service_parse_their_flags_without_the_worker_extra(tmp_path: Path):
    result = run_python("""
        import contextlib, io, json
        from maas.cli.main import main

        usage = {}
        for argv in ([], ["router"], ["registry"], ["scheduler"], ["worker"], ["up"], ["models"], ["deploy"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main([*argv, "--help"])
                    code = None
                except SystemExit as e:
                    code = e.code
            usage[" ".join(argv)] = [code, out.getvalue().splitlines()[0] if out.getvalue() else ""]
        print(json.dumps(usage))
    """, tmp_path)
    for command, (code, first_line) in result.items():
        assert code == 0, f"`maas {command} --help` exited {code}"
        assert first_line.startswith(f"usage: maas {command}".rstrip()), first_line


def test_a_worker_without_the_extra_serves_sim_models_only_and_names_the_extra(tmp_path: Path):
    result = run_python("""
        import json
        from maas.mesh.errors import FailedPrecondition, StartupError
        from maas.services.worker.devices import detect_devices
        from maas.services.worker.engines.base import ModelSpec
        from maas.services.worker.extra import has_worker_extra
        from maas.services.worker.main import engine_factory, served_formats

        create = engine_factory(own_process=True)
        result = {"extra": has_worker_extra(), "formats": served_formats(),
                  "auto": [d.id for d in detect_devices("auto", 2**30)],
                  "sim": type(create(ModelSpec(name="echo", version=1, format="sim", source=""))).__name__}
        try:
            detect_devices("cuda")
        except StartupError as e:
            result["cuda"] = str(e)
        try:
            create(ModelSpec(name="demo", version=3, format="hf", source="/models/demo"))
        except FailedPrecondition as e:
            result["hf"] = e.message
        print(json.dumps(result))
    """, tmp_path)
    assert result["extra"] is False
    assert result["formats"] == ["sim"]  # the scheduler places no transformers model or training job here
    assert result["auto"] == ["cpu"]
    assert result["sim"] == "SimEngine"
    assert INSTALL_WORKER_EXTRA in result["cuda"] and "--device cuda" in result["cuda"]  # type: ignore[operator]
    assert str(result["hf"]).startswith("demo@3 (format hf) needs the worker extra (torch, ")
    assert str(result["hf"]).endswith(INSTALL_WORKER_EXTRA)


def test_maas_up_without_the_extra_says_which_extra_to_install(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "maas", "up", "--data-dir", str(tmp_path / "stack")],
                         env=without_worker_extra(tmp_path / "site"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "maas up: serving the demo model needs the worker extra (torch, " in out.stderr
    assert INSTALL_WORKER_EXTRA in out.stderr
    assert "Traceback" not in out.stderr
