"""Log lines: JSON with the service, instance, request id, tenant and model where known."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from maas.mesh.logs import model_var, request_id_var, setup_logging, tenant_var


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_service_and_what_the_request_set(restore_logging: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", json_output=True, name="router", instance="router-7")
    log = logging.getLogger("maas.test")
    log.info("before any request")
    tokens = request_id_var.set("abc123"), tenant_var.set("acme"), model_var.set("demo")
    try:
        log.info("inside %s", "a request", extra={"fields": {"http_status": 200}})
    finally:
        request_id_var.reset(tokens[0]), tenant_var.reset(tokens[1]), model_var.reset(tokens[2])
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["service"] == "router" and first["instance"] == "router-7" and first["request_id"] == "-"
    assert "tenant" not in first and "model" not in first
    assert second["message"] == "inside a request" and second["request_id"] == "abc123"
    assert (second["tenant"], second["model"], second["http_status"]) == ("acme", "demo", 200)


def test_the_format_is_json_in_a_container_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from maas.mesh.config import MeshConfig

    def config(*args: str) -> MeshConfig:
        parser = argparse.ArgumentParser()
        MeshConfig.add_arguments(parser)
        return MeshConfig.from_args("router", parser.parse_args(list(args)))

    monkeypatch.delenv("MAAS_LOG_FORMAT", raising=False)
    monkeypatch.delenv("MAAS_LOG_JSON", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert config().log_json and not config("--log-format", "text").log_json
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.setattr("os.path.exists", lambda path: False)  # not in Docker either
    assert not config().log_json and config("--log-format", "json").log_json and config("--log-json").log_json
