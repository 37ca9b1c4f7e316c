"""Monitoring as an operator runs it: the alert rules pass `promtool`, and a real Prometheus
scraping `maas up` (targets from `maas admin scrape-targets`) evaluates every rule and finds
data for every series the Grafana dashboard plots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from maas.stack.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
NEED = "promtool and prometheus (Debian's `prometheus` package; `make test` installs it where it can: as root)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: {NEED}")
    return path


def test_the_alert_rules_and_the_config_pass_promtool() -> None:
    promtool = _tool("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(MONITORING / "alerts.yml")],
                           capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run([promtool, "check", "config", "--syntax-only", str(MONITORING / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_the_etcd_alerts_fire_on_a_lost_member_and_not_where_etcd_is_not_scraped(tmp_path: Path) -> None:
    """`promtool test rules` on made-up series: a member down or Pending (no target), every
    member down, a member without a leader; and silence with all three up or no etcd target."""
    promtool = _tool("promtool")
    rules = {r["alert"]: r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    up = 'up{job="etcd", instance="etcd-%d"}'
    members_down = "MaasEtcdMembersDown"
    cases: list[tuple[dict[str, str], str, dict[str, str]]] = [  # (series, alert firing at 10m, its labels)
        ({up % 0: "1x20", up % 1: "1x20", up % 2: "1x20"}, "", {}),
        ({up % 0: "1x20", up % 1: "1x20", up % 2: "0x20"}, members_down, {"summary": "2 of 3 etcd members are up"}),
        ({up % 0: "1x20", up % 1: "1x20"}, members_down, {"summary": "2 of 3 etcd members are up"}),  # one Pending
        ({up % 0: "0x20", up % 1: "0x20", up % 2: "0x20"}, members_down, {"summary": "0 of 3 etcd members are up"}),
        ({'up{job="maas-router", instance="r"}': "1x20"}, "", {}),  # `maas up`: etcd is not scraped
        ({'etcd_server_has_leader{job="etcd", instance="etcd-0"}': "0x20"}, "MaasEtcdNoLeader",
         {"summary": "etcd member etcd-0 has no leader", "job": "etcd", "instance": "etcd-0"}),
    ]
    tests = []
    for series, firing, expected in cases:
        checks = []
        for name in (members_down, "MaasEtcdNoLeader"):
            exp = []
            if name == firing:
                labels = {k: v for k, v in expected.items() if k != "summary"} | rules[name]["labels"]
                exp = [{"exp_labels": labels, "exp_annotations": {
                    "summary": expected["summary"], "description": rules[name]["annotations"]["description"]}}]
            checks.append({"eval_time": "10m", "alertname": name, "exp_alerts": exp})
        tests.append({"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
                      "alert_rule_test": checks})
    (tmp_path / "etcd-alerts.test.yml").write_text(json.dumps(
        {"rule_files": [str(MONITORING / "alerts.yml")], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / "etcd-alerts.test.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def _query(base: str, path: str, **params: str) -> dict[str, object]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_prometheus_scrapes_maas_up_and_every_dashboard_series_has_data(tmp_path: Path, demo_model_dir: Path) -> None:
    prometheus = _tool("prometheus")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_DATA_DIR": str(tmp_path / ".maas")}
    (tmp_path / ".maas" / "models").mkdir(parents=True)
    os.symlink(demo_model_dir, tmp_path / ".maas" / "models" / "demo")
    up = subprocess.Popen([sys.executable, "-m", "maas", "up", "--router-port", str(free_port()),
                           "--http-port", str(free_port())],
                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    prom = None
    traffic = None
    try:
        def maas(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "maas", *args], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=timeout)

        status = maas("status", "--wait", "240", timeout=260)
        assert status.returncode == 0, status.stdout + status.stderr
        targets = maas("admin", "scrape-targets", "-o", str(tmp_path / "targets.json"))
        assert targets.returncode == 0, targets.stderr
        jobs = {g["labels"]["job"] for g in json.loads((tmp_path / "targets.json").read_text())}
        assert jobs == {"maas-router", "maas-worker", "maas-registry", "maas-scheduler"}

        config = (MONITORING / "prometheus.yml").read_text().replace("scrape_interval: 15s", "scrape_interval: 1s") \
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s").replace("refresh_interval: 30s",
                                                                                   "refresh_interval: 1s")
        (tmp_path / "prometheus.yml").write_text(config)
        shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
        port = free_port()
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                cwd=tmp_path, stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        # traffic for the router's and engines' series, while Prometheus scrapes
        traffic = subprocess.Popen([sys.executable, "-c", (
            "import subprocess, sys, time\n"
            "while True:\n"
            "    subprocess.run([sys.executable, '-m', 'maas', 'generate', '--model', 'demo', '--max-tokens', '8',"
            " 'def add(a, b):'], capture_output=True)\n")], cwd=tmp_path, env=env)

        missing: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            missing = []
            try:
                for title, expr in _dashboard_queries():
                    result = _query(base, "/api/v1/query", query=expr)
                    if result["status"] != "success":
                        raise AssertionError(f"{title}: {expr} is refused: {result}")
                    if not result["data"]["result"]:  # type: ignore[index]
                        missing.append(f"{title}: {expr}")
            except OSError:
                missing = ["prometheus is not answering yet"]
            if not missing:
                break
            time.sleep(2)
        assert not missing, "dashboard series without data:\n" + "\n".join(missing) + \
            "\n" + (tmp_path / "prometheus.log").read_text()[-2000:]

        for name in ("vllm:num_requests_running", "vllm:generation_tokens_total",
                     "vllm:time_to_first_token_seconds_bucket"):  # vLLM's names, for its dashboards
            assert _query(base, "/api/v1/query", query=name)["data"]["result"], name  # type: ignore[index]
        up_series = _query(base, "/api/v1/query", query='up{job=~"maas-.*"}')["data"]["result"]  # type: ignore[index]
        assert {s["metric"]["job"] for s in up_series} == jobs and all(s["value"][1] == "1" for s in up_series)
        groups = _query(base, "/api/v1/rules")["data"]["groups"]  # type: ignore[index]
        rules = [r for g in groups for r in g["rules"]]
        # every rule evaluates, those on etcd's own metrics too, with no etcd target here
        assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), rules
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        assert not set(firing) & {"MaasSchedulerLeaderLost", "MaasEtcdUnreachable", "MaasNatsUnreachable",
                                  "MaasServiceDown", "MaasNoReadyReplica", "MaasEtcdNoLeader",
                                  "MaasEtcdMembersDown"}, firing
    finally:
        for child in (traffic, prom):
            if child is not None:
                child.kill()
                child.wait(10)
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
