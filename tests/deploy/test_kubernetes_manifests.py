"""deploy/kubernetes: the base and the GPU overlay rendered by ``kubectl kustomize`` (Debian's
kubernetes-client 1.20 embeds kustomize v2.0.3; newer kubectl works too; ``$KUBECTL`` picks a binary),
every core object validated against the Kubernetes schemas (kubernetes-validate, strict: unknown fields
are errors), and the invariants between the objects, the serve settings and the server's code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from loraswap.server.grpc.server import STOP_GRACE_S
from loraswap.server.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("base", "overlays/gpu")
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.cpu"  # the same user and paths as Dockerfile.gpu
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
# The oldest Kubernetes with GA native gRPC probes, and the newest the installed schemas cover.
K8S_VERSIONS = ("1.27.0", "latest")
# Custom resources: their schemas come with the CRD (Prometheus Operator), not with Kubernetes, so
# kubernetes-validate has none; they are checked field by field below instead.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

NO_KUBECTL = "kubectl is not installed (Debian: kubernetes-client)"


def render(overlay: str) -> dict[str, dict]:
    """``kind/name`` → object of the rendered overlay."""
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZE / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    objects = {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(out.stdout) if o}
    assert len(objects) == len([o for o in yaml.safe_load_all(out.stdout) if o]), "duplicate kind/name"
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return request.param, render(request.param)


def one(objects: dict[str, dict], kind: str) -> dict:
    [obj] = [o for key, o in objects.items() if key.startswith(kind + "/")]
    return obj


def pod_spec(objects: dict[str, dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: dict[str, dict]) -> dict:
    [c] = pod_spec(objects)["containers"]
    return c


def serve_config(objects: dict[str, dict], tmp_path: Path):
    """The ServeSettings the pod reads: the mounted ConfigMap's serve.yaml through the real loader."""
    [volume] = [v for v in pod_spec(objects)["volumes"] if "configMap" in v]
    config = objects[f"ConfigMap/{volume['configMap']['name']}"]
    path = tmp_path / "serve.yaml"
    path.write_text(config["data"]["serve.yaml"])
    [mount] = [m for m in container(objects)["volumeMounts"] if m["name"] == volume["name"]]
    assert container(objects)["args"] == ["serve", "--config", f"{mount['mountPath']}/serve.yaml"]
    # The mount replaces the image's own settings file (deploy/docker/serve.yaml, at the same path).
    assert f"COPY deploy/docker/serve.yaml {mount['mountPath']}/serve.yaml" in DOCKERFILE.read_text()
    return load_settings(config_file=path, env={})


def test_every_core_object_matches_the_kubernetes_schemas(rendered) -> None:
    import kubernetes_validate

    _, objects = rendered
    kinds = {o["kind"] for o in objects.values()}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    for version in K8S_VERSIONS:
        v = kubernetes_validate.latest_version() if version == "latest" else version
        for key, obj in objects.items():
            if (obj["apiVersion"], obj["kind"]) in CRDS:
                continue
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{key} does not match the Kubernetes {v} schema: {exc.message} at {exc.path}")


def test_schema_validation_catches_a_misplaced_field() -> None:
    """The check above is strict: a field that Kubernetes would drop silently fails it."""
    import kubernetes_validate

    deployment = yaml.safe_load((KUSTOMIZE / "base" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_grace_period_outlasts_the_drain(rendered, tmp_path: Path) -> None:
    _, objects = rendered
    settings = serve_config(objects, tmp_path)
    pre_stop = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + settings.grace_seconds + STOP_GRACE_S
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > budget


def test_probes_ask_the_grpc_port_and_liveness_survives_load_and_drain(rendered, tmp_path: Path) -> None:
    _, objects = rendered
    settings, c = serve_config(objects, tmp_path), container(objects)
    # Readiness and startup: the gRPC health service (NOT_SERVING while loading and draining).
    assert c["readinessProbe"]["grpc"]["port"] == settings.port
    assert c["startupProbe"]["grpc"]["port"] == settings.port
    # Liveness: not the health service (it would kill a pod that loads or drains), a TCP check instead.
    assert set(c["livenessProbe"]) & {"grpc", "httpGet", "exec"} == set()
    assert c["livenessProbe"]["tcpSocket"]["port"] == settings.port
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a base model load fits


def test_ports_agree_between_settings_container_and_service(rendered, tmp_path: Path) -> None:
    _, objects = rendered
    settings, c = serve_config(objects, tmp_path), container(objects)
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    service = one(objects, "Service")
    for p in service["spec"]["ports"]:
        assert ports[p["targetPort"]] == p["port"], p
    assert {p["name"] for p in service["spec"]["ports"]} == set(ports)
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)


def test_referenced_configmaps_and_secrets_exist(rendered) -> None:
    _, objects = rendered
    spec, c = pod_spec(objects), container(objects)
    configmaps = [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v]
    configmaps += [e["configMapRef"]["name"] for e in c.get("envFrom", ()) if "configMapRef" in e]
    secrets = [e["secretRef"]["name"] for e in c.get("envFrom", ()) if "secretRef" in e]
    for env in c.get("env", ()):
        ref = env.get("valueFrom", {})
        if "secretKeyRef" in ref:
            secrets.append(ref["secretKeyRef"]["name"])
        if "configMapKeyRef" in ref:
            configmaps.append(ref["configMapKeyRef"]["name"])
    assert configmaps and secrets
    assert [n for n in configmaps if f"ConfigMap/{n}" not in objects] == []
    assert [n for n in secrets if f"Secret/{n}" not in objects] == []
    [secret] = [objects[f"Secret/{n}"] for n in set(secrets)]
    keys = set(secret["data"])
    assert {"LORASWAP_INFERENCE_TOKENS", "LORASWAP_ADMIN_TOKENS"} <= keys
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    import base64

    values = [base64.b64decode(v).decode() for v in secret["data"].values()]
    assert all(v.startswith("REPLACE-ME") for v in values), "the committed Secret holds placeholders only"


def test_pod_runs_as_the_images_non_root_user(rendered) -> None:
    _, objects = rendered
    spec, c = pod_spec(objects), container(objects)
    dockerfile = DOCKERFILE.read_text()
    uid, gid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).groups()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # A read-only root: LORASWAP_HOME (disk cache) and /tmp are writable volumes.
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert env["LORASWAP_HOME"] in mounts and "/tmp" in mounts
    [cache] = [v for v in spec["volumes"] if v["name"] == mounts[env["LORASWAP_HOME"]]]
    claim = cache["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"]


def test_selectors_and_targets_point_at_the_pods(rendered) -> None:
    _, objects = rendered
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(objects, "Service")["spec"]["selector"])
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # with maxUnavailable 1 a drain never leaves no pod
    [metric] = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((KUSTOMIZE / "prometheus-adapter.yaml").read_text())
    assert metric["pods"]["metric"]["name"] in [r["name"]["as"] for r in adapter["rules"]["custom"]]
    # The ServiceMonitor (a CRD, not schema-validated): it selects the Service and scrapes its metrics port.
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert all(
        service["metadata"]["labels"].get(k) == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert (
        endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    )
    # The job label Prometheus gives a ServiceMonitor's series is the Service's name: the rules' job.
    assert service["metadata"]["name"] == "loraswap"


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image(tmp_path: Path) -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    base, gpu = render("base"), render("overlays/gpu")
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert container(base)["image"] == f"loraswap-cpu:{version}"
    assert container(gpu)["image"] == f"loraswap-gpu:{version}"
    assert "nvidia.com/gpu" not in str(container(base)["resources"])
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    settings = serve_config(gpu, tmp_path)
    assert settings.engine.device == "cuda:0" and settings.engine.quantization == "nf4"
    assert sorted(o["kind"] for o in base.values()) == sorted(o["kind"] for o in gpu.values())
