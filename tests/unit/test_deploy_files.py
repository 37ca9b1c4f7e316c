"""deploy/ is checked statically (no Docker engine here): the files parse and every
maas command they run exists in the CLI."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from maas.cli.deployments import legacy_argv
from maas.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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


def test_kubernetes_manifests_run_real_cli_commands():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "maas-mesh.yaml").read_text()) if d]
    kinds = set()
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["image"].startswith("maas-mesh"):
                parses(c["args"])
                kinds.add(c["args"][0])
    assert kinds == {"registry", "scheduler", "router", "worker"}


def test_dockerfile_entrypoint_is_the_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["maas"]' in text
    assert "torch==2.13.0" in text
