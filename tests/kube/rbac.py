"""RBAC as the API server evaluates it, for the rules and bindings the emulator is given.

The developer's rules are read from the chart's `offramp-user` ClusterRole, so
a verb the CLI uses and the role lacks fails the end-to-end tests with a 403.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RBAC_TEMPLATE = (
    Path(__file__).resolve().parents[2] / "charts" / "offramp" / "templates" / "rbac.yaml"
)


def offramp_user_rules() -> list[dict[str, Any]]:
    """The rules of the chart's offramp-user ClusterRole.

    The ClusterRole document's only template directive is its labels line; the
    rules themselves are plain YAML (tests/charts checks the rendered chart)."""
    text = RBAC_TEMPLATE.read_text().split("{{- with", 1)[0]
    text = "\n".join(line for line in text.splitlines() if "{{" not in line)
    doc = yaml.safe_load(text)
    assert doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == "offramp-user"
    rules: list[dict[str, Any]] = doc["rules"]
    return rules


@dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str
    """With its subresource, e.g. "pods/portforward"."""
    namespace: str
    name: str = ""


@dataclass
class User:
    name: str
    superuser: bool = False
    bindings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Namespace -> rules bound there (RoleBindings)."""

    def allowed(self, req: Request) -> bool:
        if self.superuser:
            return True
        return any(_covers(rule, req) for rule in self.bindings.get(req.namespace, []))


def _covers(rule: dict[str, Any], req: Request) -> bool:
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    return (
        has("apiGroups", req.group)
        and has("resources", req.resource)
        and has("verbs", req.verb)
        and (not rule.get("resourceNames") or req.name in rule["resourceNames"])
    )


def forbidden_message(user: User, req: Request) -> str:
    what = f'{req.resource.split("/")[0]} "{req.name}"' if req.name else req.resource
    scope = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    return (
        f'{what} is forbidden: User "{user.name}" cannot {req.verb} resource '
        f'"{req.resource}" in API group "{req.group}" {scope}'
    )
