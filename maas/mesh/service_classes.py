"""Service classes of generation requests (docs/fairness.md): the contract between the
router, which decides a request's class from its key and what it asked, and the engines,
which admit higher classes first and pre-empt lower ones for them."""

from __future__ import annotations

import math

from maas.mesh.errors import InvalidArgument
from maas.v1 import scheduler_pb2

CLASSES = ("interactive", "standard", "batch")  # priority 0 (highest), 1, 2
DEFAULT_CLASS = "standard"
# OpenAI's `service_tier` values, as classes ("auto" and "default": the key's own)
OPENAI_TIERS = {"auto": "", "default": "", "flex": "batch", "priority": "interactive"}


def priority(name: str, field: str = "service_class") -> int:
    """A class's priority (0 highest); "" is the default class."""
    if not name:
        return CLASSES.index(DEFAULT_CLASS)
    if name not in CLASSES:
        raise InvalidArgument(f"{field} must be one of {', '.join(CLASSES)}, not {name!r}", field=field)
    return CLASSES.index(name)


RESERVABLE = 0.8  # the share of a replica's throughput reservations may take; the rest is everyone's


def reserved_replicas(dep: scheduler_pb2.Deployment) -> int:
    """Replicas a deployment needs for its reservations (provisioned throughput): their sum
    over RESERVABLE of what one replica makes."""
    total = sum(dep.reservations.values())
    if not total or not dep.replica_tokens_per_s:
        return 0
    return math.ceil(total / (dep.replica_tokens_per_s * RESERVABLE))


__all__ = ["CLASSES", "DEFAULT_CLASS", "OPENAI_TIERS", "RESERVABLE", "priority", "reserved_replicas"]
