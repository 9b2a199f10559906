"""A container's environment, as kubelet makes it from the pod spec.

In order, as kubelet's makeEnvironmentVariables does:
- `envFrom`: every key of the ConfigMap or Secret, under the source's
  `prefix`; a key that is not a valid variable name is skipped (as kubelet
  1.30 does, with an event); a missing source is an error unless `optional`;
- `env`, entry by entry: `value` with `$(NAME)` expanded against what is
  defined so far (envFrom and earlier entries; `$$` is a literal `$`, an
  unknown name stays `$(NAME)`); `valueFrom` with `fieldRef`, `configMapKeyRef`,
  `secretKeyRef` (missing object or key: an error unless `optional`, then the
  variable is not set) or `resourceFieldRef` (the named container's, by default
  this one's, limit or request divided by `divisor` and rounded up; an unset
  limit is the node's: this machine's CPUs and memory).
- Not emulated: service link variables (`enableServiceLinks`); nothing here
  makes Service cluster IPs.

Errors are ContainerConfigError with kubelet's wording, so the pod shows
CreateContainerConfigError.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]
Lookup = Callable[[str, str], Obj | None]
"""(plural, name) -> the object in the pod's namespace, or None."""

ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_SUFFIXES = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


class ContainerConfigError(LookupError):
    """The container cannot be created as its spec says (kubelet's CreateContainerConfigError)."""


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' `$(NAME)` expansion."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            close = value.find(")", i + 2) if nxt == "(" else -1
            if close != -1:
                name = value[i + 2 : close]
                out.append(defined.get(name, f"$({name})"))
                i = close + 1
            else:
                out.append("$" if nxt == "$" else value[i : i + 2])
                i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def quantity(text: str) -> Decimal:
    found = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if found is None:
        raise ContainerConfigError(f"quantity {text!r} is not one this emulator reads")
    return Decimal(found[1]) * Decimal(_SUFFIXES[found[2] or ""])


def _data(obj: Obj, plural: str) -> dict[str, str]:
    if plural == "secrets":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def _node(resource: str) -> Decimal:
    if resource.endswith("cpu"):
        return Decimal(os.cpu_count() or 1)
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return Decimal(kib * 1024)


def _resource(pod: Obj, this: Obj, ref: Obj) -> str:
    name = ref.get("containerName") or this["name"]
    container = next((c for c in pod["spec"]["containers"] if c["name"] == name), None)
    if container is None:
        raise ContainerConfigError(f"container {name!r} of resourceFieldRef is not in the pod")
    resource = str(ref["resource"])
    kind, _, what = resource.partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(what)
    amount = quantity(value) if value is not None else _node(resource)
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(amount / divisor))


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, fields: dict[str, str]
) -> dict[str, str]:
    """The variables kubelet gives `container` (less the runtime's and the image's)."""
    namespace = pod["metadata"].get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        plural = "configmaps" if "configMapRef" in source else "secrets"
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        obj = lookup(plural, ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f'{plural[:-1]} "{ref["name"]}" not found')
        for key, value in _data(obj, plural).items():
            name = (source.get("prefix") or "") + key
            if ENV_NAME.fullmatch(name):
                env[name] = value
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path in fields:
                env[name] = fields[path]
            elif path.startswith(("metadata.annotations['", "metadata.labels['")):
                env[name] = ""
            else:
                raise ContainerConfigError(
                    f"env {name}: fieldRef {path!r} is not emulated ({', '.join(fields)})"
                )
        elif "resourceFieldRef" in source:
            env[name] = _resource(pod, container, source["resourceFieldRef"])
        else:
            plural = "configmaps" if "configMapKeyRef" in source else "secrets"
            ref = source.get("configMapKeyRef") or source.get("secretKeyRef") or {}
            obj = lookup(plural, ref["name"])
            data = _data(obj, plural) if obj is not None else None
            if data is not None and ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                if data is None:
                    raise ContainerConfigError(f'{plural[:-1]} "{ref["name"]}" not found')
                kind = "ConfigMap" if plural == "configmaps" else "Secret"
                raise ContainerConfigError(
                    f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}"
                )
    return env
