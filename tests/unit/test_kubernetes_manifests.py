"""deploy/kubernetes/ validated against the Kubernetes schemas (no cluster runs here), and tied to
what the project really serves: probe routes, ports and the autoscaling metric."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from poolserve_adapter.metrics import get_metrics
from poolserve_adapter.security import OPEN_PATHS

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KINDS = {"deployment.yaml": "Deployment", "service.yaml": "Service", "hpa.yaml": "HorizontalPodAutoscaler",
         "networkpolicy.yaml": "NetworkPolicy"}


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
    # Triton's HTTP endpoint stays off: its probes are gRPC health checks on the gRPC port.
    assert "--http" not in triton["args"]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"triton-grpc": 8001, "triton-metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["grpc"]["port"] == 8001
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


def test_network_policy_opens_the_api_to_all_and_triton_grpc_to_labelled_clients_only():
    policy = load("networkpolicy.yaml")["spec"]
    pod_labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    opened = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            opened[port["port"]] = rule.get("from", "anyone")
    # Named ports of the pod: the adapter's API to anyone, Triton's gRPC to labelled pods, nothing else.
    assert opened["http"] == "anyone"
    assert opened["triton-grpc"] == [{"podSelector": {"matchLabels": {"triton-pooling-serve/grpc-client": "true"}}}]
    assert set(opened) == {"http", "triton-grpc"}
    service_ports = {p["targetPort"] for p in load("service.yaml")["spec"]["ports"]}
    assert service_ports <= set(opened)  # what the Service publishes is reachable through the policy
