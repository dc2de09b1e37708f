"""docker-compose.yml validated against the Compose specification's JSON schema (no engine needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "reference" / "compose" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    if not SCHEMA.exists():
        pytest.skip(f"the Compose schema is not at {SCHEMA} (a plain clone without ../shared)")
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_validation_catches_a_typo(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["restrat"] = "always"
    assert list(validator.iter_errors(broken))


def test_every_service_has_a_container_with_a_health_check(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("nats", "valkey", "core", "egress", "api", "sms", "voice", "email"):
        assert "healthcheck" in services[name], name
        assert services[name]["restart"] == "unless-stopped", name
    assert "--jetstream" in services["nats"]["command"]
    assert "--appendonly" in services["valkey"]["command"]
    for name in ("core", "egress", "api", "sms", "voice", "email"):
        assert services[name]["command"] == [name]
        assert services[name]["environment"]["NATS_URL"] == "nats://nats:4222"
