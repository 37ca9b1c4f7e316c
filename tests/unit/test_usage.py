"""Usage metering without servers: how records are summed, which queries are valid, where
records go, and that a full outbox drops (and counts) rather than blocks."""

from __future__ import annotations

import datetime

import pytest

from maas.cli.usage import as_json, as_table, parse_when
from maas.mesh import usage
from maas.mesh.config import MeshConfig
from maas.mesh.errors import InvalidArgument
from maas.mesh.events import subject_token
from maas.v1 import usage_pb2

DAY = 86_400_000
T0 = 1_750_000_000_000  # 2025-06-15T15:06:40Z


def rec(rid: str, tenant: str = "acme", *, model: str = "chat", adapter: str = "", key: str = "k1",
        deployment: str = "chat", t: int = T0, prompt: int = 10, completion: int = 5, status: str = "OK",
        partial: int = 0) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(id=rid, request_id=rid, time_ms=t, tenant=tenant, key_id=key, model=model,
                                 adapter=adapter, deployment=deployment, prompt_tokens=prompt,
                                 completion_tokens=completion, status=status, partial_completion_tokens=partial)


RECORDS = [
    rec("a1"),
    rec("a2", model="chat", adapter="ft", key="k2", completion=7),
    rec("a3", model="embed", deployment="embed", completion=0, prompt=4),
    rec("a4", status="UNAVAILABLE", prompt=0, completion=0, partial=3, t=T0 + DAY),
    rec("b1", tenant="beta", key="k9", prompt=100, completion=50),
    rec("n1", tenant="", key="admin", prompt=1, completion=1),
]


def totals(t: usage_pb2.UsageTotals) -> tuple[int, int, int, int, int]:
    return t.requests, t.errors, t.prompt_tokens, t.completion_tokens, t.partial_completion_tokens


def test_rows_per_tenant_by_default_and_totals_over_all():
    got = usage.Aggregator().extend(RECORDS).result()
    assert got.by == "tenant"
    assert [(r.tenant, r.group, totals(r.totals)) for r in got.rows] == [
        ("-", "", (1, 0, 1, 1, 0)),             # the admin's own requests: no tenant
        ("acme", "", (4, 1, 24, 12, 3)),
        ("beta", "", (1, 0, 100, 50, 0)),
    ]
    assert totals(got.totals) == (6, 1, 125, 63, 3)


@pytest.mark.parametrize(("by", "rows"), [
    ("model", [("acme", "chat", "", (2, 1, 10, 5)), ("acme", "chat", "ft", (1, 0, 10, 7)),
               ("acme", "embed", "", (1, 0, 4, 0))]),
    ("key", [("acme", "k1", "", (3, 1, 14, 5)), ("acme", "k2", "", (1, 0, 10, 7))]),
    ("deployment", [("acme", "chat", "", (3, 1, 20, 12)), ("acme", "embed", "", (1, 0, 4, 0))]),
    ("day", [("acme", "2025-06-15", "", (3, 0, 24, 12)), ("acme", "2025-06-16", "", (1, 1, 0, 0))]),
])
def test_rows_group_within_one_tenant(by: str, rows: list[tuple[str, str, str, tuple[int, ...]]]):
    got = usage.Aggregator(by, tenant="acme").extend(RECORDS).result()
    assert [(r.tenant, r.group, r.adapter, totals(r.totals)[:4]) for r in got.rows] == rows
    assert got.tenant == "acme" and totals(got.totals) == (4, 1, 24, 12, 3)


def test_a_record_id_is_counted_once_even_if_stored_twice():
    agg = usage.Aggregator()
    assert agg.add(rec("x"), stored_ms=T0)
    assert not agg.add(rec("x"), stored_ms=T0 + 60_000)  # a republish that came past the stream's window
    assert agg.duplicates == 1
    got = agg.result()
    assert got.totals.requests == 1 and got.duplicates_skipped == 1


def test_ids_are_remembered_for_the_horizon_only():
    agg = usage.Aggregator(dedup_horizon_ms=1000)
    for i in range(100):
        agg.add(rec(f"r{i}", t=T0 + i * 100), stored_ms=T0 + i * 100)
    assert len(agg._seen) <= 11  # memory stays bounded by the horizon
    assert agg.result().totals.requests == 100


def test_the_window_and_the_tenant_filter_records():
    agg = usage.Aggregator(since_ms=T0 + 1, until_ms=T0 + DAY + 1)
    agg.extend(RECORDS)
    assert agg.result().totals.requests == 1  # a4 only
    only_admin = usage.Aggregator(tenant=usage.NO_TENANT).extend(RECORDS).result()
    assert [r.tenant for r in only_admin.rows] == ["-"]
    assert usage.Aggregator(until_ms=T0).extend(RECORDS).result().totals.requests == 0  # until is exclusive


@pytest.mark.parametrize(("request_kw", "field"), [
    ({"by": "hour"}, "by"),
    ({"since_ms": -1}, "since_ms"),
    ({"since_ms": T0 + 1}, "since_ms"),          # in the future
    ({"until_ms": -5}, "until_ms"),
    ({"since_ms": T0 - 10, "until_ms": T0 - 10}, "until_ms"),
    ({"tenant": "Not A Name"}, "tenant"),
])
def test_invalid_queries_name_the_field(request_kw: dict[str, object], field: str):
    with pytest.raises(InvalidArgument) as e:
        usage.check_query(usage_pb2.GetUsageRequest(**request_kw), now_ms=T0)  # type: ignore[arg-type]
    assert e.value.field == field


def test_valid_queries():
    assert usage.check_query(usage_pb2.GetUsageRequest(), now_ms=T0) == ("tenant", 0, 0)
    assert usage.check_query(usage_pb2.GetUsageRequest(by="day", since_ms=T0 - DAY, until_ms=T0, tenant="a.b"),
                             now_ms=T0) == ("day", T0 - DAY, T0)
    assert usage.check_query(usage_pb2.GetUsageRequest(tenant="-"), now_ms=T0)[0] == "tenant"


def test_subjects_keep_meshes_and_tenants_apart():
    assert usage.subject("/maas/", "acme") == "maas.usage.maas.acme"
    assert usage.subject("/maas/", "") == "maas.usage.maas.~"
    # a '.' would split the token: tenant "a.b" must not look like tenant "a" with more after it
    assert usage.subject("/maas/", "a.b") == "maas.usage.maas.a~2eb"
    assert usage.subject("/a/b/", "t") == "maas.usage.a~2fb.t"
    assert usage.mesh_subjects("/maas/") == "maas.usage.maas.*"
    tokens = {subject_token(t) for t in ("", "~", "a.b", "a~2eb", "a*", "a>", "a b", "é")}
    assert len(tokens) == 8  # no two names share a subject
    assert not any(c in "".join(tokens) for c in ".*> ")


def _config() -> MeshConfig:
    return MeshConfig(kind="router", instance="r1", prefix="/m/", metrics_port=-1)


async def test_a_full_outbox_drops_and_counts_instead_of_blocking():
    meter = usage.UsageMeter(_config(), outbox_size=2)  # never started: nothing drains it
    before = usage.DROPPED.labels("outbox_full")._value.get()
    for i in range(5):
        meter.record(rec(f"q{i}"))
    assert usage.DROPPED.labels("outbox_full")._value.get() - before == 3
    assert meter.unstored == 2
    subject, data, msg_id = meter._outbox.get_nowait()
    stored = usage_pb2.UsageRecord.FromString(data)
    assert subject == "maas.usage.m.acme"
    assert msg_id == stored.id and len(stored.id) == 32 and stored.id != "q0"  # the meter's own unique id
    assert stored.router == "r1" and stored.time_ms == T0
    shutdown = usage.DROPPED.labels("shutdown")._value.get()
    await meter.close()
    assert usage.DROPPED.labels("shutdown")._value.get() - shutdown == 2  # never stored: counted as lost


def test_since_accepts_durations_and_iso_dates():
    now = T0 / 1000
    assert parse_when("30m", now) == T0 - 30 * 60_000
    assert parse_when("1h", now) == T0 - 3_600_000
    assert parse_when("7d", now) == T0 - 7 * DAY
    assert parse_when("2025-06-01", now) == int(datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC).timestamp() * 1000)
    assert parse_when("2025-06-01T12:00+02:00", now) == int(
        datetime.datetime(2025, 6, 1, 10, tzinfo=datetime.UTC).timestamp() * 1000)
    for bad in ("yesterday", "1y", "-1h", ""):
        with pytest.raises(ValueError, match="duration"):
            parse_when(bad, now)


def test_json_and_table_output():
    reply = usage.Aggregator("model", tenant="acme", since_ms=T0 - DAY).extend(RECORDS).result()
    out = as_json(reply)
    assert (out["requests"], out["errors"], out["prompt_tokens"], out["completion_tokens"]) == (4, 1, 24, 12)
    assert out["tenant"] == "acme" and out["by"] == "model" and out["since"] == "2025-06-14T15:06:40+00:00"
    assert out["rows"][1] == {"tenant": "acme", "model": "chat", "adapter": "ft", "requests": 1, "errors": 0,
                              "prompt_tokens": 10, "completion_tokens": 7, "partial_completion_tokens": 0}
    table = as_table(reply)
    assert table.splitlines()[0] == "usage of tenant acme, since 2025-06-14T15:06:40+00:00 (UTC)"
    assert table.splitlines()[1].split() == ["TENANT", "MODEL", "ADAPTER", "REQUESTS", "ERRORS", "PROMPT",
                                             "COMPLETION", "TOTAL"]
    assert table.splitlines()[-2].split() == ["total", "4", "1", "24", "12", "36"]
    assert "3 completion tokens streamed" in table.splitlines()[-1]
