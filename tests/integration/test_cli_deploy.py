"""`maas deploy ACTION` as a user runs it: create, list, show, scale, update, canary, promote,
rollback, delete (and the original `maas deploy NAME [flags]` form), checked through the
scheduler API; mistakes end with one `error:` line and exit 2 (usage) or 1 (refused by the
mesh), never a traceback."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest

from maas.cli.main import main
from maas.v1 import mesh_pb2, scheduler_pb2

from .conftest import MeshHarness, eventually


async def cli(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `maas ARGS` in-process (in a thread: the CLI runs its own event loop)."""
    capsys.readouterr()
    try:
        rc = await asyncio.to_thread(main, [*args, "--etcd", mesh.etcd, "--prefix", mesh.prefix])
    except SystemExit as e:  # what the interpreter does with it in a real `maas` process
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


async def get(mesh: MeshHarness, name: str) -> scheduler_pb2.DeploymentStatus:
    sched = await mesh.stub("scheduler")
    return await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=5)  # type: ignore[attr-defined]


async def ready_versions(mesh: MeshHarness, name: str) -> list[str]:
    st = await get(mesh, name)
    return sorted(f"{r.model_name}@{r.model_version}" for r in st.replicas
                  if r.state == mesh_pb2.REPLICA_STATE_READY)


async def versions_are(mesh: MeshHarness, name: str, want: list[str]) -> bool:
    return await ready_versions(mesh, name) == want


def refused(rc: int, err: str, code: int, *words: str) -> bool:
    """Exit `code`, one `error:` line naming `words`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    return (rc == code and "Traceback" not in err and len(lines) >= 1 and lines[-1].startswith("error: ")
            and all(w in lines[-1] for w in words))


async def test_deploy_lifecycle_create_scale_update_canary_promote_rollback_delete(
        mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.register("echo", token_delay_ms="1")

    # create, fixed replicas
    rc, out, err = await cli(mesh, capsys, "deploy", "create", "echo", "--model", "echo@1", "--replicas", "1")
    assert rc == 0, err
    assert out.strip() == "created deployment echo: echo@1 x1", out
    st = await get(mesh, "echo")
    assert st.deployment.resolved_version == "echo@1" and st.deployment.replicas == 1
    assert not st.deployment.HasField("autoscale")
    st = await mesh.wait_ready("echo")
    replica = st.replicas[0].replica_id

    # creating it twice is refused by the scheduler
    rc, out, err = await cli(mesh, capsys, "deploy", "create", "echo", "--replicas", "1")
    assert refused(rc, err, 1, "ALREADY_EXISTS", "echo"), (rc, err)
    assert out == ""

    # list: a table, and JSON
    rc, out, err = await cli(mesh, capsys, "deploy", "list")
    assert rc == 0, err
    header, row = out.splitlines()[:2]
    assert header.lower().split()[:4] == ["deployment", "model", "ready", "scaling"]
    assert row.split()[:4] == ["echo", "echo@1", "1/1", "fixed"], out
    rc, out, err = await cli(mesh, capsys, "deploy", "list", "--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert [d["deployment"]["name"] for d in listed] == ["echo"]
    assert listed[0]["deployment"]["resolvedVersion"] == "echo@1" and listed[0]["readyReplicas"] == 1

    # show: the deployment and its replica; and JSON
    rc, out, err = await cli(mesh, capsys, "deploy", "show", "echo")
    assert rc == 0, err
    assert "deployment  echo" in out and "echo@1 -> echo@1" in out and "1/1 ready" in out, out
    assert replica in out and "ready" in out.split(replica, 1)[1].splitlines()[0], out
    rc, out, err = await cli(mesh, capsys, "deploy", "show", "echo", "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["deployment"]["name"] == "echo" and [r["replicaId"] for r in shown["replicas"]] == [replica]
    assert shown["replicas"][0]["state"] == "REPLICA_STATE_READY"

    # scale to a fixed 2, then to autoscaling bounds (the count stays within them)
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "echo", "--replicas", "2")
    assert rc == 0, err
    assert out.strip() == "scaled deployment echo: echo@1 x2", out
    assert (await get(mesh, "echo")).deployment.replicas == 2
    await mesh.wait_ready("echo", replicas=2)
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "echo", "--min", "1", "--max", "3")
    assert rc == 0, err
    assert "auto 1..3" in out, out
    dep = (await get(mesh, "echo")).deployment
    assert (dep.autoscale.min_replicas, dep.autoscale.max_replicas, dep.replicas) == (1, 3, 2)
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "echo", "--replicas", "2")  # back to fixed
    assert rc == 0, err
    dep = (await get(mesh, "echo")).deployment
    assert not dep.HasField("autoscale") and dep.replicas == 2

    # update: a rolling update to version 2
    rc, out, err = await cli(mesh, capsys, "deploy", "update", "echo", "--model", "echo@2")
    assert rc == 0, err
    assert out.strip() == "updated deployment echo: echo@2 x2", out
    dep = (await get(mesh, "echo")).deployment
    assert dep.resolved_version == "echo@2" and dep.replicas == 2
    await eventually(lambda: versions_are(mesh, "echo", ["echo@2", "echo@2"]), timeout=20)

    # canary at 20 %, then promote: the canary becomes the deployed version
    rc, out, err = await cli(mesh, capsys, "deploy", "canary", "echo", "echo@1", "--weight", "20")
    assert rc == 0, err
    assert out.strip() == "canary on deployment echo: echo@2 x2, canary echo@1 at 20%", out
    dep = (await get(mesh, "echo")).deployment
    assert dep.resolved_version == "echo@2"
    assert [(t.model, t.weight) for t in dep.traffic] == [("echo@1", 20)]
    await eventually(lambda: versions_are(mesh, "echo", ["echo@1", "echo@2", "echo@2"]), timeout=20)
    rc, out, err = await cli(mesh, capsys, "deploy", "list")
    assert rc == 0, err
    assert "echo@2 + echo@1 20%" in out, out
    rc, out, err = await cli(mesh, capsys, "deploy", "promote", "echo")
    assert rc == 0, err
    assert out.strip() == "promoted deployment echo: echo@1 x2", out
    dep = (await get(mesh, "echo")).deployment
    assert dep.resolved_version == "echo@1" and not dep.traffic
    await eventually(lambda: versions_are(mesh, "echo", ["echo@1", "echo@1"]), timeout=20)

    # canary, then rollback: the canary goes, the deployed version stays
    rc, out, err = await cli(mesh, capsys, "deploy", "canary", "echo", "echo@2", "--json")
    assert rc == 0, err
    assert json.loads(out)["deployment"]["traffic"] == [{"model": "echo@2", "weight": 10}]
    rc, out, err = await cli(mesh, capsys, "deploy", "rollback", "echo")
    assert rc == 0, err
    assert out.strip() == "rolled back deployment echo: echo@1 x2", out
    dep = (await get(mesh, "echo")).deployment
    assert dep.resolved_version == "echo@1" and not dep.traffic

    # without a canary, rollback returns to the version deployed before (echo@2, before the promote)
    assert dep.previous_version == "echo@2"
    rc, out, err = await cli(mesh, capsys, "deploy", "rollback", "echo")
    assert rc == 0, err
    dep = (await get(mesh, "echo")).deployment
    assert dep.resolved_version == "echo@2" and dep.previous_version == "echo@1"

    # delete
    rc, out, err = await cli(mesh, capsys, "deploy", "delete", "echo")
    assert rc == 0, err
    assert out.strip() == "deleted deployment echo"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(mesh, "echo")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    rc, out, err = await cli(mesh, capsys, "deploy", "show", "echo")
    assert refused(rc, err, 1, "NOT_FOUND:", "echo"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "list", "--json")
    assert rc == 0 and json.loads(out) == [], (out, err)


async def test_autoscaled_create_starts_at_zero(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.register("lazy", token_delay_ms="1")

    rc, out, err = await cli(mesh, capsys, "deploy", "create", "lazy", "--min", "0", "--max", "2",
                             "--target", "4", "--cooldown", "30")
    assert rc == 0, err
    assert out.strip() == "created deployment lazy: lazy@1 x0 (auto 0..2, target 4)", out
    dep = (await get(mesh, "lazy")).deployment
    assert dep.replicas == 0
    a = dep.autoscale
    assert (a.min_replicas, a.max_replicas, a.target_in_flight, a.cooldown_seconds) == (0, 2, 4, 30)

    rc, out, err = await cli(mesh, capsys, "deploy", "list")
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith("lazy "))
    assert "0/0" in row and "auto 0..2" in row, out
    rc, out, err = await cli(mesh, capsys, "deploy", "list", "--json")
    assert rc == 0, err
    (listed,) = json.loads(out)
    assert listed["deployment"]["autoscale"]["maxReplicas"] == 2
    rc, out, err = await cli(mesh, capsys, "deploy", "show", "lazy")
    assert rc == 0, err
    assert "0/0 ready" in out and "auto 0..2, target 4" in out, out

    # scale: only the bounds given change; the rest are kept
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "lazy", "--max", "5")
    assert rc == 0, err
    a = (await get(mesh, "lazy")).deployment.autoscale
    assert (a.min_replicas, a.max_replicas, a.target_in_flight, a.cooldown_seconds) == (0, 5, 4, 30)

    # min above max: the scheduler refuses it (exit 1), for create and for scale
    rc, out, err = await cli(mesh, capsys, "deploy", "create", "other", "--model", "lazy", "--min", "3", "--max", "2")
    assert refused(rc, err, 1, "INVALID_ARGUMENT:", "min_replicas"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "lazy", "--min", "6")
    assert refused(rc, err, 1, "INVALID_ARGUMENT:"), (rc, err)
    assert (await get(mesh, "lazy")).deployment.autoscale.min_replicas == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(mesh, "other")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_legacy_deploy_name_form_creates_and_updates(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.register("old", token_delay_ms="1")
    await mesh.register("old", token_delay_ms="1")

    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--model", "old@1", "--replicas", "1")
    assert rc == 0, err
    assert out.strip() == "created deployment old: old@1 x1", out
    dep = (await get(mesh, "old")).deployment
    assert dep.resolved_version == "old@1" and dep.replicas == 1

    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--replicas", "2")
    assert rc == 0, err
    assert out.strip() == "updated deployment old: old@1 x2", out
    dep = (await get(mesh, "old")).deployment
    assert dep.resolved_version == "old@1" and dep.replicas == 2

    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--canary", "old@2", "--weight", "30")
    assert rc == 0, err
    assert [(t.model, t.weight) for t in (await get(mesh, "old")).deployment.traffic] == [("old@2", 30)]
    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--promote")
    assert rc == 0, err
    dep = (await get(mesh, "old")).deployment
    assert dep.resolved_version == "old@2" and not dep.traffic and dep.replicas == 2

    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--replicas", "-1")
    assert refused(rc, err, 2, ">= 0"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "old", "--rollback")
    assert refused(rc, err, 2, "no canary"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "missing", "--promote")
    assert refused(rc, err, 2, "does not exist"), (rc, err)
    with pytest.raises(grpc.aio.AioRpcError):
        await get(mesh, "missing")


async def test_usage_errors_exit_2_with_one_line_and_change_nothing(
        mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.register("m", token_delay_ms="1")
    rc, out, err = await cli(mesh, capsys, "deploy", "create", "m", "--replicas", "0")
    assert rc == 0, err
    before = (await get(mesh, "m")).deployment

    cases = [
        (("create", "n", "--model", "m", "--replicas", "1", "--min", "0"), "either --replicas"),
        (("scale", "m", "--replicas", "1", "--max", "2"), "either --replicas"),
        (("scale", "m"), "nothing to change"),
        (("create", "n", "--model", "m", "--replicas", "-1"), "--replicas must be >= 0"),
        (("scale", "m", "--replicas", "-3"), "--replicas must be >= 0"),
        (("scale", "m", "--min", "1"), "needs --max"),
        (("scale", "m", "--target", "-1", "--max", "2"), ">= 0"),
        (("promote", "m"), "has no canary"),
        (("rollback", "m"), "has no canary and no previous version"),
        (("create", "n", "--model", "m", "--selector", "gpu"), "--selector wants KEY=VALUE"),
        (("update", "m", "--selector", "=a100"), "--selector wants KEY=VALUE"),
        (("update", "m", "--memory-gib", "0"), "--memory-gib"),
        (("update", "m", "--devices", "0"), "--devices"),
    ]
    for args, words in cases:
        rc, out, err = await cli(mesh, capsys, "deploy", *args)
        assert refused(rc, err, 2, words), (args, rc, err)
        assert out == "", (args, out)

    after = (await get(mesh, "m")).deployment
    assert after == before  # nothing was written, not even updated_ms
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(mesh, "n")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # argparse's own refusals are exit 2 as well (a usage line, not a traceback)
    rc, out, err = await cli(mesh, capsys, "deploy", "scale", "m", "--replicas", "two")
    assert rc == 2 and "invalid int value" in err and "Traceback" not in err, err
    rc, out, err = await cli(mesh, capsys, "deploy", "show")
    assert rc == 2 and "error:" in err and "Traceback" not in err, err

    # refused by the mesh: exit 1 with the status code
    rc, out, err = await cli(mesh, capsys, "deploy", "show", "nope")
    assert refused(rc, err, 1, "NOT_FOUND:", "nope"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "delete", "nope")
    assert refused(rc, err, 1, "NOT_FOUND:"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "canary", "m", "m@7")
    assert refused(rc, err, 1, "NOT_FOUND:"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "canary", "m", "m@1", "--weight", "20")
    assert refused(rc, err, 1, "INVALID_ARGUMENT:", "already deployed"), (rc, err)
    rc, out, err = await cli(mesh, capsys, "deploy", "create", "m2", "--model", "m", "--replicas", "300")
    assert refused(rc, err, 1, "INVALID_ARGUMENT:", "replicas"), (rc, err)
    assert (await get(mesh, "m")).deployment == before



# Values that do not fit the API's unsigned fields are usage errors, not tracebacks.
@pytest.mark.parametrize("args", [
    ("scale", "m", "--min", "-1", "--max", "2"),
    ("scale", "m", "--max", "-1"),
    ("create", "x", "--model", "m", "--min", "-1", "--max", "2"),
    ("canary", "m", "m@2", "--weight", "-5"),
    ("m", "--canary", "m@2", "--weight", "-5"),  # the `deploy NAME` form
    ("scale", "m", "--replicas", "5000000000"),
    ("update", "m", "--devices", "5000000000"),
], ids=["neg-min", "neg-max", "create-neg-min", "neg-weight", "legacy-neg-weight", "huge-replicas", "huge-devices"])
async def test_out_of_range_numbers_are_usage_errors(mesh: MeshHarness, capsys: pytest.CaptureFixture[str],
                                                     args: tuple[str, ...]):
    await mesh.core()
    await mesh.register("m", token_delay_ms="1")
    await mesh.register("m", token_delay_ms="1")
    await mesh.deploy("m", model="m@1", replicas=0)
    before = (await get(mesh, "m")).deployment
    rc, out, err = await cli(mesh, capsys, "deploy", *args)
    assert refused(rc, err, 2), (rc, err)
    assert (await get(mesh, "m")).deployment == before


def test_deploy_help_does_not_list_the_hidden_apply(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as done:
        main(["deploy", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "canary" in out
    assert "SUPPRESS" not in out and "apply" not in out, out


async def test_legacy_form_with_options_before_the_name(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    await mesh.register("old", token_delay_ms="1")
    rc, out, err = await cli(mesh, capsys, "deploy", "--json", "old", "--replicas", "1")
    assert rc == 0, err
    assert json.loads(out)["deployment"]["replicas"] == 1
