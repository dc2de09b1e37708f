"""deploy/k8s/valkey-ha/: the Valkey Cluster and Sentinel alternatives to 20-valkey.yaml, validated
against the Kubernetes schemas (strict), and the REDIS_URL each documents is one the store reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.store.connection import parse_url

HA = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "valkey-ha"
VERSION = "1.33.0"


def documents() -> list[dict[str, Any]]:
    return [
        d for path in sorted(HA.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d
    ]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize(
    ("file", "kind", "pods"), [("cluster.yaml", "cluster", 6), ("sentinel.yaml", "sentinel", 3)]
)
def test_each_names_a_redis_url_for_its_own_pods(file: str, kind: str, pods: int) -> None:
    text = (HA / file).read_text()
    url = re.search(r"REDIS_URL: (\S+)", text)
    assert url, file
    topology = parse_url(url.group(1))
    assert topology.kind == kind
    sets = {
        d["metadata"]["name"]: d["spec"]["replicas"]
        for d in yaml.safe_load_all(text)
        if d and d["kind"] == "StatefulSet"
    }
    for host, _ in topology.hosts:
        statefulset = host.split(".")[1]
        assert statefulset in sets, host
    assert pods in sets.values()
    if kind == "sentinel":
        assert topology.service == "switchboard"
        assert topology.options["wait_replicas"] == "1"
        assert "sentinel monitor switchboard" in text
