"""Logging: every line of a request carries its request id (and, where known, its tenant
and model); JSON lines with the service and instance where a collector reads them (in a
container by default), text for a terminal."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
model_var: contextvars.ContextVar[str] = contextvars.ContextVar("model", default="")
_SERVICE = {"service": "", "instance": ""}


def in_container() -> bool:
    """Docker, Podman or a Kubernetes pod: where logs go to a collector, as JSON lines."""
    return (os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
            or "KUBERNETES_SERVICE_HOST" in os.environ)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.tenant = tenant_var.get()
        record.model = model_var.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "service": _SERVICE["service"],
            "instance": _SERVICE["instance"],
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for name in ("tenant", "model"):
            if value := getattr(record, name, ""):
                doc[name] = value
        if fields := getattr(record, "fields", None):  # a structured line (the HTTP access log)
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "INFO", *, json_output: bool = False, name: str = "", instance: str = "") -> None:
    _SERVICE.update(service=name, instance=instance)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_output:
        handler.setFormatter(_JsonFormatter())
    else:
        tag = f"{name} " if name else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname).1s {tag}%(name)s [%(request_id)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aetcd", "nats", "grpc", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
