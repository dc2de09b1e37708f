"""deploy/k8s/ validated against the Kubernetes JSON schemas (strict: unknown fields fail)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.33.0"
SERVICES = ("core", "egress", "api", "sms", "voice", "email")


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validation_fails_on_a_typo() -> None:
    deployment = copy.deepcopy(by_kind("Deployment")["switchboard-core"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_probes_resources_a_service_and_a_budget(name: str) -> None:
    deployment = by_kind("Deployment")[f"switchboard-{name}"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [name]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e}
    assert f"switchboard-{name}" in by_kind("Service")
    assert f"switchboard-{name}" in by_kind("PodDisruptionBudget")


def test_core_and_egress_autoscale() -> None:
    assert set(by_kind("HorizontalPodAutoscaler")) == {"switchboard-core", "switchboard-egress"}


def test_nats_is_a_three_node_jetstream_cluster_and_streams_get_three_replicas() -> None:
    nats = by_kind("StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    conf = by_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in conf
    assert conf.count("nats://nats-") == 3
    assert by_kind("ConfigMap")["switchboard-config"]["data"]["SWITCHBOARD_STREAM_REPLICAS"] == "3"
