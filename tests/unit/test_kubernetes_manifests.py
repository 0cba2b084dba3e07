"""deploy/kubernetes/ validated against the Kubernetes schemas (no cluster runs here), and tied to
what the project really serves: probe routes, ports and the autoscaling metric."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from poolserve_adapter.metrics import get_metrics
from poolserve_adapter.security import OPEN_PATHS

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KINDS = {"deployment.yaml": "Deployment", "service.yaml": "Service", "hpa.yaml": "HorizontalPodAutoscaler"}


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


@pytest.mark.parametrize("name", sorted(KINDS))
def test_manifest_validates_strictly(name):
    document = load(name)
    assert document["kind"] == KINDS[name]
    kubernetes_validate.validate(document, kubernetes_validate.utils.latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    assert sorted(load("kustomization.yaml")["resources"]) == sorted(KINDS)


def test_pod_probes_and_ports_match_the_stack():
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    containers = {container["name"]: container for container in pod["containers"]}
    triton, adapter = containers["triton"], containers["adapter"]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert adapter["readinessProbe"]["httpGet"]["path"] in OPEN_PATHS  # answered while draining, without a key
    env = {item["name"]: item.get("value") for item in adapter["env"]}
    port = int(env["ADAPTER_PORT"])
    assert port not in {p["containerPort"] for p in triton["ports"]}  # one network namespace per pod
    assert {p["containerPort"] for p in adapter["ports"]} == {port}
    assert env["ADAPTER_TRITON_GRPC_URL"] == "127.0.0.1:8001"
    drain = float(env.get("ADAPTER_DRAIN_TIMEOUT_S") or 30)
    assert pod["terminationGracePeriodSeconds"] > drain


def test_autoscaler_scales_the_deployment_on_a_metric_the_adapter_exports():
    hpa = load("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    assert metric == get_metrics().in_flight._name
