"""The emulator's object store: versioned objects, validation, an event log for watches.

Everything runs on the emulator's event loop; nothing here blocks. Writes bump
one cluster-wide resourceVersion, append an event, and wake watchers and the
controllers. Every object stored, whoever writes it, is checked against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict) and the handful of
API-server rules the schemas cannot express that offramp's path touches.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import kubernetes_validate

K8S_VERSION = "1.30"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    plural: str
    kind: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


KINDS = {
    k.plural: k
    for k in (
        Kind("namespaces", "Namespace", namespaced=False),
        Kind("pods", "Pod"),
        Kind("services", "Service"),
        Kind("secrets", "Secret"),
        Kind("configmaps", "ConfigMap"),
        Kind("deployments", "Deployment", "apps"),
        Kind("statefulsets", "StatefulSet", "apps"),
    )
}
WORKLOADS = ("deployments", "statefulsets")


class ApiError(Exception):
    """Answered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{kind.qualified} "{name}" not found', {"name": name, "kind": kind.plural}
    )


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- label selectors (the equality-based part, which is what clients send for matchLabels)


Selector = list[tuple[str, str, str | None]]


def parse_selector(text: str | None) -> Selector:
    out: Selector = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        if m := re.fullmatch(r"([\w./-]+)\s*(!=|==|=)\s*([\w.-]*)", term):
            op = "!=" if m[2] == "!=" else "="
            out.append((m[1], op, m[3]))
        elif re.fullmatch(r"!?[\w./-]+", term):
            out.append((term.lstrip("!"), "!" if term.startswith("!") else "exists", None))
        else:
            raise ApiError(
                400,
                "BadRequest",
                f"unable to parse requirement: {term!r} (this emulator "
                "understands =, ==, != and existence)",
            )
    return out


def matches(selector: Selector, labels: dict[str, str]) -> bool:
    for key, op, value in selector:
        have = labels.get(key)
        if (
            (op == "=" and have != value)
            or (op == "!=" and have == value)
            or (op == "exists" and have is None)
            or (op == "!" and have is not None)
        ):
            return False
    return True


# --- validation ---------------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def validate(kind: Kind, obj: Obj) -> None:
    """Raise a 422 ApiError as an API server would for an invalid object."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    problems: list[str] = []
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(root)"
        problems.append(f"{where}: {e.message}")
    if not (len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name)):
        problems.append(f"metadata.name: Invalid value: {name!r}: must be a DNS-1123 subdomain")
    if kind.plural in ("configmaps", "secrets"):
        for key in {**(obj.get("data") or {}), **(obj.get("stringData") or {})}:
            if not _DATA_KEY.fullmatch(key):
                problems.append(f"data[{key}]: Invalid value: {key!r}: a valid config key must "
                                "consist of alphanumeric characters, '-', '_' or '.'")  # fmt: skip
    if kind.plural == "pods":
        problems += _pod_spec_problems(obj.get("spec") or {}, "spec")
    elif kind.plural in WORKLOADS:
        spec = obj.get("spec") or {}
        template = spec.get("template") or {}
        problems += _pod_spec_problems(template.get("spec") or {}, "spec.template.spec")
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            problems.append(
                "spec.template.metadata.labels: Invalid value: "
                f"{labels}: `selector` does not match template `labels`"
            )
    if problems:
        raise ApiError(
            422,
            "Invalid",
            f'{kind.kind} "{name}" is invalid: ' + "; ".join(problems),
            {"name": name, "kind": kind.plural},
        )


def _pod_spec_problems(spec: Obj, at: str) -> list[str]:
    out: list[str] = []
    names: set[str] = set()
    port_names: set[str] = set()
    for i, c in enumerate(spec.get("containers") or []):
        where = f"{at}.containers[{i}]"
        if c.get("name") in names:
            out.append(f"{where}.name: Duplicate value: {c.get('name')!r}")
        names.add(c.get("name"))
        own: set[str] = set()
        for j, p in enumerate(c.get("ports") or []):
            pname = p.get("name")
            if pname is None:
                continue
            if not (len(pname) <= 15 and _PORT_NAME.fullmatch(pname) and "--" not in pname):
                out.append(
                    f"{where}.ports[{j}].name: Invalid value: {pname!r}: must be an "
                    "IANA_SVC_NAME (at most 15 characters, a-z, 0-9 and '-')"
                )
            if pname in port_names:
                out.append(f"{where}.ports[{j}].name: Duplicate value: {pname!r}")
            port_names.add(pname)
            own.add(pname)
        for j, var in enumerate(c.get("env") or []):
            if not _ENV_NAME.fullmatch(str(var.get("name", ""))):
                out.append(f"{where}.env[{j}].name: Invalid value: {var.get('name')!r}: a valid "
                           "environment variable name must consist of alphabetic characters, "
                           "digits, '_', '-', or '.', and must not start with a digit")  # fmt: skip
            if "value" in var and "valueFrom" in var:
                out.append(f"{where}.env[{j}].valueFrom: Invalid value: may not be specified "
                           "when `value` is not empty")  # fmt: skip
        for j, source in enumerate(c.get("envFrom") or []):
            prefix = source.get("prefix")
            if prefix and not _ENV_NAME.fullmatch(prefix):
                out.append(f"{where}.envFrom[{j}].prefix: Invalid value: {prefix!r}")
            if ("configMapRef" in source) == ("secretRef" in source):
                out.append(f"{where}.envFrom[{j}]: Invalid value: may not have more than one "
                           "field specified at a time")  # fmt: skip
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
            port = (action or {}).get("port")
            if isinstance(port, str) and port not in own:
                out.append(
                    f"{where}.{probe}.port: Invalid value: {port!r}: must be a port "
                    "number or the name of one of this container's ports"
                )
    return out


def _normalize(plural: str, obj: Obj) -> None:
    """What the API server does to an object before storing it."""
    if plural == "secrets" and "stringData" in obj:
        data = obj.setdefault("data", {})
        for key, value in obj.pop("stringData").items():
            data[key] = base64.b64encode(value.encode()).decode()


# --- the store ----------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    plural: str
    namespace: str
    type: str
    obj: Obj


class Store:
    def __init__(self) -> None:
        self._objects: dict[tuple[str, str, str], Obj] = {}
        self._rv = 1
        self._log: list[Event] = []
        self._changed = asyncio.Condition()
        self.listeners: list[Callable[[], None]] = []

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    # reads

    def get(self, plural: str, namespace: str, name: str) -> Obj:
        obj = self._objects.get((plural, namespace, name))
        if obj is None:
            raise not_found(KINDS[plural], name)
        return copy.deepcopy(obj)

    def find(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self._objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str, selector: Selector | None = None) -> list[Obj]:
        return [
            copy.deepcopy(o)
            for (p, ns, _), o in sorted(self._objects.items(), key=lambda kv: kv[0])
            if p == plural
            and (ns == namespace or not KINDS[plural].namespaced or namespace == "")
            and matches(selector or [], o["metadata"].get("labels") or {})
        ]

    # writes

    def create(self, plural: str, namespace: str, obj: Obj) -> Obj:
        kind = KINDS[plural]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if meta.setdefault("namespace", namespace) != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                )
            if ("namespaces", "", namespace) not in self._objects:
                raise not_found(KINDS["namespaces"], namespace)
        else:
            namespace = ""
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if plural in WORKLOADS:
            meta["generation"] = 1
        _normalize(plural, obj)
        validate(kind, obj)
        key = (plural, namespace, meta.get("name", ""))
        if key in self._objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{kind.qualified} "{key[2]}" already exists',
                {"name": key[2], "kind": plural},
            )
        return self._write(key, obj, "ADDED")

    def replace(self, plural: str, namespace: str, name: str, obj: Obj) -> Obj:
        """Store a new version of an existing object (patches, controllers, kubelet)."""
        kind = KINDS[plural]
        key = (plural, namespace if kind.namespaced else "", name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(kind, name)
        obj = copy.deepcopy(obj)
        meta, old_meta = obj.setdefault("metadata", {}), old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp"):
            if meta.get(field) != old_meta.get(field):
                raise ApiError(
                    422,
                    "Invalid",
                    f"{kind.kind} {name!r} is invalid: metadata.{field}: field is immutable",
                )
        if meta.get("resourceVersion", old_meta["resourceVersion"]) != old_meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {kind.qualified} "
                f'"{name}": the object has been modified; please apply your changes '
                "to the latest version and try again",
            )
        if plural in WORKLOADS:
            spec_changed = obj.get("spec") != old.get("spec")
            meta["generation"] = old_meta.get("generation", 1) + (1 if spec_changed else 0)
        _normalize(plural, obj)
        validate(kind, obj)
        return self._write(key, obj, "MODIFIED")

    def remove(self, plural: str, namespace: str, name: str) -> None:
        key = (plural, namespace, name)
        obj = self._objects.pop(key, None)
        if obj is None:
            return
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._log.append(Event(self._rv, plural, namespace, "DELETED", obj))
        self._notify()

    def _write(self, key: tuple[str, str, str], obj: Obj, kind: str) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj
        self._log.append(Event(self._rv, key[0], key[1], kind, copy.deepcopy(obj)))
        self._notify()
        return copy.deepcopy(obj)

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    # watches

    async def watch(
        self, plural: str, namespace: str, selector: Selector, since: int, seconds: float
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Events after resourceVersion `since`, for `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        position = 0
        while True:
            while position < len(self._log):
                event = self._log[position]
                position += 1
                if (
                    event.rv > since
                    and event.plural == plural
                    and (event.namespace == namespace or namespace == "")
                    and matches(selector, event.obj["metadata"].get("labels") or {})
                ):
                    yield event.type, copy.deepcopy(event.obj)
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            async with self._changed:
                if position < len(self._log):
                    continue
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    return
