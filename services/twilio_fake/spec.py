"""Twilio's OpenAPI description as a request checker and a response shaper."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpecError(Exception):
    """A request the spec refuses; carries Twilio's error code and HTTP status."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Operation:
    template: str
    method: str
    path_params: dict[str, dict[str, Any]]
    form: dict[str, Any] | None
    response_status: int
    response_schema: dict[str, Any] | None


class TwilioSpec:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in document["paths"]:
            pattern = re.sub(
                r"\{(\w+)\}",
                r"(?P<\1>[^/]+)",
                re.escape(template).replace(r"\{", "{").replace(r"\}", "}"),
            )
            self._routes.append((re.compile(f"^{pattern}$"), template))

    @classmethod
    def load(cls, path: Path) -> TwilioSpec:
        return cls(json.loads(path.read_text()))

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def operation(self, method: str, path: str) -> tuple[Operation, dict[str, str]]:
        for pattern, template in self._routes:
            match = pattern.match(path)
            if not match:
                continue
            item = self.document["paths"][template]
            op = item.get(method.lower())
            if op is None:
                raise SpecError(405, 20004, f"Method {method} not allowed on {template}")
            params = {
                p["name"]: p.get("schema", {})
                for p in op.get("parameters", [])
                if p.get("in") == "path"
            }
            body = op.get("requestBody", {}).get("content", {})
            form = body.get("application/x-www-form-urlencoded", {}).get("schema")
            status = next(int(s) for s in op["responses"] if s.startswith("2"))
            content = op["responses"][str(status)].get("content", {})
            schema = content.get("application/json", {}).get("schema")
            return Operation(
                template,
                method.upper(),
                params,
                self.resolve(form) if form else None,
                status,
                self.resolve(schema) if schema else None,
            ), match.groupdict()
        raise SpecError(404, 20404, f"The requested resource {path} was not found")

    def check(self, op: Operation, path_values: dict[str, str], form: dict[str, list[str]]) -> None:
        for name, value in path_values.items():
            self._check_value(f"path parameter {name}", op.path_params.get(name, {}), value)
        schema = op.form or {"properties": {}}
        properties = schema.get("properties", {})
        for name, values in form.items():
            if name not in properties:
                raise SpecError(400, 20001, f"Unknown parameter {name!r} for {op.template}")
            prop = self.resolve(properties[name])
            if prop.get("type") != "array" and len(values) > 1:
                raise SpecError(400, 20001, f"Parameter {name!r} given more than once")
            item = self.resolve(prop.get("items", {})) if prop.get("type") == "array" else prop
            for value in values:
                self._check_value(name, item, value)
        for name in schema.get("required", []):
            if name not in form:
                raise SpecError(400, 20001, f"Missing required parameter {name!r}")

    def _check_value(self, name: str, schema: dict[str, Any], value: str) -> None:
        schema = self.resolve(schema)
        if "enum" in schema and value not in schema["enum"]:
            raise SpecError(400, 20001, f"{name} must be one of {schema['enum']}, not {value!r}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SpecError(400, 20001, f"{name} does not match {schema['pattern']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SpecError(400, 20001, f"{name} is shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SpecError(400, 20001, f"{name} is longer than {schema['maxLength']}")
        kind = schema.get("type")
        if kind == "integer" and not re.fullmatch(r"-?\d+", value):
            raise SpecError(400, 20001, f"{name} must be an integer")
        if kind == "boolean" and value.lower() not in ("true", "false"):
            raise SpecError(400, 20001, f"{name} must be true or false")
        if schema.get("format") == "uri" and not re.match(r"^https?://[^\s/_]+", value):
            raise SpecError(400, 20001, f"{name} must be an absolute URL")

    def shape(self, schema: dict[str, Any] | None, values: dict[str, Any]) -> dict[str, Any]:
        """Every documented property, from `values` where known, else null."""
        if schema is None:
            return values
        return {name: values.get(name) for name in schema.get("properties", {})}
