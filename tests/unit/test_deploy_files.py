"""deploy/ is checked statically (no Docker engine here): the files parse (the Dockerfile
with BuildKit's own parser), every maas command they run exists in the CLI, and the images
are what deploy/Dockerfile says: three targets, non-root, listening on every interface, torch
only in the workers."""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest
import yaml

from maas.cli.deployments import legacy_argv
from maas.cli.main import build_parser
from maas.services.worker.extra import WORKER_MODULES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGETS = {"control": "maas-mesh/control", "worker-cpu": "maas-mesh/worker-cpu", "worker-cuda": "maas-mesh/worker-cuda"}


def cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def parses(argv: list[str]) -> None:
    """Parse argv as `maas` does (fails the test on an unknown command or flag)."""
    try:
        build_parser().parse_args(legacy_argv(argv))
    except SystemExit as e:
        pytest.fail(f"`maas {' '.join(argv)}` is not a valid maas command line ({e})")


def test_compose_parses_and_runs_only_real_cli_commands():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"etcd", "nats", "registry", "scheduler", "router", "worker"} <= set(services)
    assert services["etcd"]["image"].split("/")[-1].startswith("etcd")
    assert services["nats"]["image"].startswith("nats")
    seen = set()
    for svc in services.values():
        if svc.get("image", "").startswith("maas-mesh"):
            command = svc["command"]
            if svc.get("entrypoint") == ["sh", "-c"]:
                for line in re.findall(r"maas [^&|;]+", " ".join(command)):
                    argv = shlex.split(line)[1:]
                    parses(argv)
                    seen.add(argv[0])
            else:
                parses(command)
                seen.add(command[0])
    assert {"registry", "scheduler", "router", "worker"} <= seen <= cli_commands()


def test_compose_builds_each_service_from_its_image_target():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services, stages = doc["services"], Dockerfile.read().stages
    built = {name: svc for name, svc in services.items() if "build" in svc}
    for name, svc in built.items():
        assert (ROOT / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        target = svc["build"]["target"]
        assert target in TARGETS and target in stages, f"{name}: unknown target {target}"
        assert svc["image"].split(":")[0] == TARGETS[target], f"{name}: image {svc['image']} is not built from {target}"
    targets = {name: svc["build"]["target"] for name, svc in built.items()}
    assert {targets[s] for s in ("registry", "scheduler", "router", "secrets")} == {"control"}
    assert targets["worker"] == "worker-cpu"
    assert targets["bootstrap"] == "worker-cpu"  # it forges the demo model: torch


def test_compose_keeps_the_registry_blobs_on_a_named_volume():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    registry = doc["services"]["registry"]
    blob_dir = build_parser().parse_args(legacy_argv(registry["command"])).blob_dir
    mounts = dict(reversed(m.split(":")[:2]) for m in registry["volumes"])
    assert blob_dir in mounts, f"the registry's --blob-dir {blob_dir} is on no volume: lost with the container"
    assert mounts[blob_dir] in doc["volumes"]


@dataclass
class Stage:
    name: str
    parent: str  # a stage of this file or an image
    instructions: list[dockerfile.Command] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: dict[str, Stage]

    @classmethod
    def read(cls) -> "Dockerfile":
        args: dict[str, str] = {}
        stages: dict[str, Stage] = {}
        current: Stage | None = None
        for command in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
            if command.cmd == "FROM":
                image, as_, name = command.value
                assert as_.upper() == "AS", command.original
                current = stages[name] = Stage(name, image)
            elif current is None:
                assert command.cmd == "ARG", f"only ARGs before the first FROM: {command.original}"
                key, _, default = command.value[0].partition("=")
                args[key] = default
            else:
                current.instructions.append(command)
        return cls(args, stages)

    def chain(self, target: str) -> list[dockerfile.Command]:
        """The instructions an image of `target` is built with, its ancestors' first."""
        stage = self.stages[target]
        inherited = self.chain(stage.parent) if stage.parent in self.stages else []
        return inherited + stage.instructions

    def env(self, target: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for command in self.chain(target):
            if command.cmd == "ENV":
                env.update(zip(command.value[::2], command.value[1::2], strict=True))
        return env

    def last(self, target: str, cmd: str) -> dockerfile.Command:
        found = [c for c in self.chain(target) if c.cmd == cmd]
        assert found, f"{target} has no {cmd}"
        return found[-1]


def requirements_installed(file: Dockerfile, target: str) -> list[str]:
    """Run the image's own step that lists the requirements it installs from pyproject.toml
    (`python -c ... /tmp/pyproject.toml [EXTRA...] > requirements.txt`) on pyproject.toml."""
    listed: list[str] = []
    for command in file.chain(target):
        if command.cmd != "RUN" or "pyproject.toml" not in " ".join(command.flags):
            continue
        words = shlex.split(command.value[0])
        start = words.index("-c")
        code, args = words[start + 1], words[start + 2:words.index(">")]
        mount = dict(kv.split("=", 1) for kv in command.flags[0].removeprefix("--mount=").split(","))
        assert args[0] == mount["target"] and mount["source"] == "pyproject.toml"
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml"), *args[1:]],
                             capture_output=True, text=True, check=True)
        listed += out.stdout.split()
    return listed


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[;@ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_dockerfile_builds_three_images_that_run_the_cli_as_a_non_root_user():
    file = Dockerfile.read()
    assert set(TARGETS) <= set(file.stages)
    for target in TARGETS:
        entrypoint = file.last(target, "ENTRYPOINT")
        assert entrypoint.json and list(entrypoint.value) == ["maas"], target
        user = file.last(target, "USER").value[0]
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, \
            f"{target} runs as {user}: a numeric non-root uid lets Kubernetes check runAsNonRoot"
        chain = file.chain(target)
        after_user = chain[chain.index(file.last(target, "USER")):]
        assert not [c for c in after_user if c.cmd in ("RUN", "COPY", "ADD")], f"{target}: build steps as the user"
        env = file.env(target)
        assert env["MAAS_HOST"] == "0.0.0.0", f"{target} would listen on 127.0.0.1 only"
        assert env["MAAS_METRICS_PORT"] == "9090"
        exposed = {p for c in file.chain(target) if c.cmd == "EXPOSE" for p in c.value}
        assert "9090" in exposed
        # a HOME and a working directory the user can write (caches, relative paths)
        useradd = next(c.value[0] for c in chain if c.cmd == "RUN" and "useradd" in c.value[0])
        assert f"--uid {uid} " in useradd and f"--home-dir {env['HOME']} --create-home" in useradd
        workdir = file.last(target, "WORKDIR").value[0]
        assert re.search(rf"install -d -o maas -g maas [^&]*{re.escape(workdir)}( |$)", useradd), workdir
    assert {"50051", "8000"} <= {p for c in file.chain("control") if c.cmd == "EXPOSE" for p in c.value}
    assert file.env("worker-cuda")["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_the_control_image_installs_no_torch_and_the_workers_pin_it():
    file = Dockerfile.read()
    worker_extra = set(WORKER_MODULES)
    control = names(requirements_installed(file, "control"))
    assert control and not control & worker_extra, f"the control image installs {control & worker_extra}"
    assert "maas-mesh" not in control
    for command in file.chain("control"):
        text = " ".join(map(str, command.value))
        assert "torch==" not in text and "worker" not in text.split(), command.original
    for target in ("worker-cpu", "worker-cuda"):
        installed = names(requirements_installed(file, target))
        assert worker_extra <= installed and control <= installed, target
        assert "maas-mesh" not in installed  # the worker extra names no other extra of the package
    # torch: the version the Makefile pins, the CPU build from PyTorch's CPU index, installed
    # before the requirements so that they keep it
    pinned = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pinned and file.args["TORCH_VERSION"] == pinned.group(1)
    cpu = [c.value[0] for c in file.stages["worker-cpu-deps"].instructions if c.cmd == "RUN"]
    assert cpu[0] == 'pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"'
    cuda = [c.value[0] for c in file.stages["worker-cuda-deps"].instructions if c.cmd == "RUN"]
    assert cuda[0] == 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"'


def test_dependencies_are_installed_before_the_code_and_no_build_tools_are_left():
    file = Dockerfile.read()
    code_steps = [c for s in file.stages.values() for c in s.instructions
                  if c.cmd in ("COPY", "ADD") and any(v.startswith("maas") for v in c.value[:-1])]
    assert [c.original for c in code_steps] == ["COPY maas /src/maas"]  # only the wheel stage reads the code
    assert file.stages["wheel"].instructions[-1].value[0].startswith("pip wheel --no-deps")
    for target in TARGETS:
        chain = file.chain(target)
        runs = [c for c in chain if c.cmd == "RUN"]
        code = [c for c in runs if "from=wheel" in " ".join(c.flags)]
        assert len(code) == 1 and runs[-1] is code[0], f"{target}: the code is not the last layer"
        assert code[0].value[0] == "pip install --no-deps /wheels/*.whl"
        assert not [c for c in chain if c.cmd in ("COPY", "ADD") and "--from=wheel" in c.flags], \
            f"{target}: the wheel is bind-mounted, not copied into a layer"
        for c in runs:
            assert not re.search(r"apt-get|apk |gcc|build-essential|make ", c.value[0]), c.original


def _pattern(rule: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression (`**` any directories, `*` and `?`
    within one name, `[...]` a class)."""
    out, i = "", 0
    while i < len(rule):
        if rule.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif rule.startswith("**", i):
            out, i = out + ".*", i + 2
        elif rule[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif rule[i] == "?":
            out, i = out + "[^/]", i + 1
        elif rule[i] == "[":
            end = rule.index("]", i)
            out, i = out + rule[i:end + 1], end + 1
        else:
            out, i = out + re.escape(rule[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether `path` is left out of the build context: the last rule matching it or a
    directory above it decides (`!` keeps)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        pattern = _pattern(rule.removeprefix("!").strip("/"))
        if any(pattern.match(p) for p in prefixes):
            ignored = not rule.startswith("!")
    return ignored


def test_dockerignore_sends_the_package_and_nothing_else():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    file = Dockerfile.read()
    for command in (c for s in file.stages.values() for c in s.instructions):
        sources = list(command.value[:-1]) if command.cmd == "COPY" and not command.flags else []
        sources += [f.split("source=")[1].split(",")[0] for f in command.flags if "type=bind,source=" in f]
        for source in sources:
            assert not dockerignored(source, rules), f"{command.original}: {source} is not in the build context"
    for kept in ("pyproject.toml", "README.md", "maas/cli/main.py", "maas/v1/mesh_pb2.py"):
        assert not dockerignored(kept, rules), kept
    for left_out in (".venv/bin/python", ".maas/admin-token", "tests/conftest.py", ".git/HEAD",
                     "maas/__pycache__/main.cpython-311.pyc", "deploy/Dockerfile"):
        assert dockerignored(left_out, rules), left_out
