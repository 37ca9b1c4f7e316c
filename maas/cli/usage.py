"""`maas usage`: metered requests and tokens, per tenant, model, key, deployment or day.

The admin (where `maas up` runs, or an admin key) sees every tenant, or the one `--tenant`
names; a developer key (`--api-key`, MAAS_API_KEY) sees its own tenant's usage only.
Records are kept in JetStream (see docs/usage.md); the registry reads and sums them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Callable

from maas.cli.main import mesh_client
from maas.v1 import registry_pb2_grpc, usage_pb2

ClientArgs = Callable[[argparse.ArgumentParser], None]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGO = re.compile(r"^(\d+)([smhdw])$")
GROUPS = ("tenant", "model", "key", "deployment", "day")
_HEADERS = {"tenant": [], "model": ["model", "adapter"], "key": ["key"], "deployment": ["deployment"],
            "day": ["day"]}


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    p = sub.add_parser("usage", help="metered requests and tokens per tenant, model, key or day")
    client_args(p)
    p.add_argument("--tenant", default="", help="one tenant (the admin; a developer key always sees its own)")
    p.add_argument("--since", default="", metavar="WHEN",
                   help="from 30m, 1h, 7d ago, or an ISO date or time (UTC unless it names a zone); "
                        "default: everything kept")
    p.add_argument("--until", default="", metavar="WHEN", help="to (same forms as --since); default: now")
    p.add_argument("--by", default="tenant", choices=GROUPS, help="rows per tenant (default) or, within each "
                                                                  "tenant, per model, key, deployment or day (UTC)")


def parse_when(text: str, now: float | None = None) -> int:
    """`30m`, `1h`, `7d`, `2w` ago, or an ISO date/time (UTC unless it says otherwise), as unix ms.
    ValueError, saying what is accepted, otherwise."""
    now = time.time() if now is None else now
    text = text.strip()
    if m := _AGO.match(text):
        return int((now - int(m.group(1)) * _UNITS[m.group(2)]) * 1000)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30m, 1h, 7d, 2w) nor an ISO date (2025-01-31, "
                         "2025-01-31T12:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds") if ms else ""


def _totals(t: usage_pb2.UsageTotals) -> dict[str, int]:
    return {"requests": t.requests, "errors": t.errors, "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens, "partial_completion_tokens": t.partial_completion_tokens}


def as_json(reply: usage_pb2.GetUsageResponse) -> dict[str, object]:
    """One object: the window, the totals, and the grouped rows (ints, not protobuf strings)."""
    rows = []
    for r in reply.rows:
        row: dict[str, object] = {"tenant": r.tenant}
        if reply.by != "tenant":
            row[reply.by] = r.group
        if reply.by == "model":
            row["adapter"] = r.adapter
        rows.append({**row, **_totals(r.totals)})
    return {"tenant": reply.tenant or None, "since": _iso(reply.since_ms) or None,
            "until": _iso(reply.until_ms) or None, "by": reply.by, **_totals(reply.totals), "rows": rows}


def as_table(reply: usage_pb2.GetUsageResponse) -> str:
    from maas.cli.commands import _table

    groups = _HEADERS.get(reply.by, [])
    header = ["tenant", *groups, "requests", "errors", "prompt", "completion", "total"]

    def numbers(t: usage_pb2.UsageTotals) -> list[str]:
        return [f"{t.requests:,}", f"{t.errors:,}", f"{t.prompt_tokens:,}", f"{t.completion_tokens:,}",
                f"{t.prompt_tokens + t.completion_tokens:,}"]

    rows = []
    for r in reply.rows:
        cells = [r.tenant]
        if groups:
            cells.append(r.group or "-")
        if reply.by == "model":
            cells.append(r.adapter or "-")
        rows.append([*cells, *numbers(r.totals)])
    rows.append(["total", *([""] * len(groups)), *numbers(reply.totals)])
    whose = f"tenant {reply.tenant}" if reply.tenant else "every tenant"
    window = f"since {_iso(reply.since_ms)}" if reply.since_ms else "everything kept"
    if reply.until_ms:
        window += f", until {_iso(reply.until_ms)}"
    lines = [f"usage of {whose}, {window} (UTC)", _table(rows, header)]
    if reply.totals.partial_completion_tokens:
        lines.append(f"plus {reply.totals.partial_completion_tokens:,} completion tokens streamed to clients "
                     "whose requests then failed or were cancelled (not in the totals)")
    return "\n".join(lines)


async def run(ns: argparse.Namespace, etcd: str) -> int:
    try:
        since = parse_when(ns.since) if ns.since else 0
        until = parse_when(ns.until) if ns.until else 0
    except ValueError as e:
        print(f"error: --since/--until: {e}", file=sys.stderr)
        return 2
    request = usage_pb2.GetUsageRequest(tenant=ns.tenant, since_ms=since, until_ms=until, by=ns.by)
    async with mesh_client(ns, etcd) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        reply = await stub.GetUsage(request, timeout=300)  # a year of a busy mesh takes a while
    print(json.dumps(as_json(reply), indent=2) if ns.json else as_table(reply))
    return 0
