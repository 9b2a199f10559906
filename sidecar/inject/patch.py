"""Injection: a pod template in, an RFC 6902 JSON Patch that adds the sidecar out.

Pure: no I/O, no Kubernetes client. The same functions serve `offramp steal`
(patching a Deployment's or StatefulSet's `spec.template`) and the admission
webhook (patching a Pod). A *template* here is `{"metadata": ..., "spec": ...}`
with a pod spec, as both a Pod and `spec.template` are; `prefix` is where it
sits in the object being patched ("" for a Pod, "/spec/template" for a
Deployment).

What `inject` changes, and records in the `offramp.dev/injected` annotation
together with the patch that undoes it, so that `uninject` restores the
template exactly:
- adds the `offramp-sidecar` container: the image, one listener per app port,
  the session port, the token from a Secret mounted as a file, a readiness
  probe on /healthz, resources, and NET_ADMIN only for iptables capture;
- passes the app container's HTTP probe paths to it (`--probe-path`), so
  kubelet probes are never stolen;
- copies the app container's `env` and `envFrom` into it, every name under a
  prefix (`sidecar.appenv`), so that kubelet resolves the app's environment for
  the sidecar to hand to a session (`copy_env`, on by default);
- privilege-free mode (`capture="none"` with `named_port`): the app's port of
  that name is renamed `app-<number>` and the sidecar's listener takes the
  name, so a Service whose targetPort is that name sends its traffic to the
  sidecar; the app's probes that named the port are rewritten to the new name
  so that kubelet keeps probing the app directly.

Injecting a template that carries the annotation changes nothing.

Errors: `InjectError` (a ValueError) says what in the template or the options
does not fit, and lists what there is.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
from pydantic import BaseModel, ConfigDict, Field

from sidecar.appenv import PREFIX as APP_ENV_PREFIX
from sidecar.appenv import copy_app_env
from sidecar.outgoing.policy import ALLOW_ANNOTATION, ALLOW_ENV
from sidecar.sessions.preview import PREFIX_ANNOTATION, PREFIX_ENV
from sidecar.settings import HEALTH_PORT, IDLE_TIMEOUT_ANNOTATION, IDLE_TIMEOUT_ENV, Capture

__all__ = [
    "ANNOTATION",
    "COPY_ENV_ANNOTATION",
    "SIDECAR_NAME",
    "TOKEN_DIR",
    "InjectError",
    "InjectOptions",
    "copies_env",
    "inject",
    "injected",
    "prefixed",
    "stale_env",
    "uninject",
]

ANNOTATION = "offramp.dev/injected"
COPY_ENV_ANNOTATION = "offramp.dev/copy-env"
"""On a pod or pod template: "false" keeps the app's env out of the sidecar."""
SIDECAR_NAME = "offramp-sidecar"
TOKEN_VOLUME = "offramp-token"
TMP_VOLUME = "offramp-tmp"
"""The image's root filesystem is read-only; iptables' lock file goes here."""
TOKEN_DIR = "/var/run/offramp"
TOKEN_KEY = "token"
RECORD_VERSION = 1
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def default_resources(workers: int = 1) -> dict[str, dict[str, str]]:
    """What an injected sidecar asks for. The requests fit an idle sidecar (the
    primary alone, about 26 MiB, and 0.2 s of CPU to start), so that on a busy node
    its start yields to the app's. The memory limit fits an open session: the
    engine (about 100 MiB while busy) and each further --workers process (about
    90 MiB)."""
    return {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"memory": f"{256 + 96 * (workers - 1)}Mi"},
    }


Template = dict[str, Any]
Patch = list[dict[str, Any]]


class InjectError(ValueError):
    pass


class InjectOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(min_length=1)
    ports: tuple[int, ...] = ()
    """App ports to front; empty: every TCP port the app container declares."""
    container: str | None = None
    """The app container; None: the first container."""
    capture: Capture = Capture.IPTABLES
    named_port: str | None = None
    """Privilege-free mode: the port name a Service targets, to hand to the sidecar."""
    token_secret: str = Field(default="offramp-token", min_length=1)
    listen_port: int = Field(default=15080, ge=1, le=65535)
    control_port: int = Field(default=15081, ge=1, le=65535)
    health_port: int = Field(default=HEALTH_PORT, ge=1, le=65535)
    protect_probes: bool = True
    resources: dict[str, dict[str, str]] | None = None
    """The sidecar container's resources; None: `default_resources(workers)`."""
    run_as_user: int = Field(default=10001, ge=1)
    workers: int = Field(default=1, ge=1, le=64)
    """The sidecar's proxy processes (`offramp-sidecar --workers`)."""
    copy_env: bool = True
    """Copy the app container's env and envFrom into the sidecar (prefixed), for sessions."""


def copies_env(annotations: dict[str, Any]) -> bool:
    """What the `offramp.dev/copy-env` annotation asks ("true" if absent)."""
    value = str(annotations.get(COPY_ENV_ANNOTATION, "true")).strip().lower()
    if value not in ("true", "false"):
        raise InjectError(f'{COPY_ENV_ANNOTATION} is {value!r}; write "true" or "false"')
    return value == "true"


def injected(template: Template) -> dict[str, Any] | None:
    """The injection record of a template, or None if it is not injected."""
    raw = ((template.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise InjectError(f"the {ANNOTATION} annotation is not JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("undo"), list):
        raise InjectError(f"the {ANNOTATION} annotation has no undo patch")
    return record


def inject(template: Template, options: InjectOptions, prefix: str = "") -> Patch:
    """The patch that injects the sidecar into `template` ([] if it already is)."""
    if injected(template) is not None:
        return []
    before = template
    after = copy.deepcopy(template)
    spec = after.setdefault("spec", {})
    containers: list[dict[str, Any]] = spec.setdefault("containers", [])
    app = _app_container(containers, options.container)
    app_ports = _app_ports(app, options.ports)
    used = {
        p.get("containerPort")
        for c in containers
        for p in c.get("ports") or []
        if isinstance(p, dict)
    }
    listen = _listen_ports(app_ports, options, used)

    named: dict[int, str] = {}
    if options.capture is Capture.NONE and options.named_port:
        named = _hand_over_named_port(app, options.named_port, app_ports)

    probe_paths = sorted(
        {
            str(probe["httpGet"]["path"])
            for name in _PROBES
            if isinstance(probe := app.get(name), dict)
            and isinstance(probe.get("httpGet"), dict)
            and probe["httpGet"].get("path")
        }
    )
    sidecar = _sidecar(options, app_ports, listen, named, probe_paths)
    if options.copy_env:
        env, env_from = copy_app_env(app)
        sidecar["env"] += env
        if env_from:
            sidecar["envFrom"] = env_from
    containers.append(sidecar)
    volumes: list[dict[str, Any]] = spec.setdefault("volumes", [])
    for name in (TOKEN_VOLUME, TMP_VOLUME):
        if any(v.get("name") == name for v in volumes):
            raise InjectError(f"the pod already has a volume named {name!r}")
    # Optional: without its Secret the pod still starts; the sidecar serves
    # traffic and refuses sessions until the Secret (and so the file) exists.
    secret = {"secretName": options.token_secret, "optional": True}
    volumes.append({"name": TOKEN_VOLUME, "secret": secret})
    volumes.append({"name": TMP_VOLUME, "emptyDir": {}})

    undo = jsonpatch.make_patch(after, before).patch
    # Undoing must also take away a map the injection made to hold the record.
    if "metadata" not in after:
        undo.append({"op": "remove", "path": "/metadata"})
    elif "annotations" not in after["metadata"]:
        undo.append({"op": "remove", "path": "/metadata/annotations"})
    record = {"version": RECORD_VERSION, "options": options.model_dump(mode="json"), "undo": undo}
    annotations = after.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[ANNOTATION] = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return prefixed(jsonpatch.make_patch(before, after).patch, prefix)


def stale_env(template: Template) -> bool:
    """Whether an injected template's sidecar carries another env than its app
    container has now (the app's env was changed after injection)."""
    record = injected(template)
    if record is None:
        return False
    try:
        options = InjectOptions.model_validate(record.get("options"))
    except ValueError:
        return True
    containers = (template.get("spec") or {}).get("containers") or []
    sidecar = next((c for c in containers if c.get("name") == SIDECAR_NAME), None)
    apps = [c for c in containers if c.get("name") != SIDECAR_NAME]
    if sidecar is None or not apps:
        return True
    app = next((c for c in apps if c.get("name") == options.container), apps[0])
    want_env, want_from = copy_app_env(app) if options.copy_env else ([], [])
    have_env = [
        e for e in sidecar.get("env") or [] if str(e.get("name", "")).startswith(APP_ENV_PREFIX)
    ]
    return bool(have_env != want_env or (sidecar.get("envFrom") or []) != want_from)


def uninject(template: Template, prefix: str = "") -> Patch:
    """The patch that restores the template as it was before `inject` ([] if not injected)."""
    record = injected(template)
    if record is None:
        return []
    remove = {"op": "remove", "path": "/metadata/annotations/" + _escape(ANNOTATION)}
    undo = list(record["undo"])
    # Injection made the annotations map (or metadata) to hold its record; if
    # something else was put there since (`kubectl rollout restart` adds an
    # annotation), the map stays.
    meta = template.get("metadata") or {}
    others = set(meta.get("annotations") or {}) - {ANNOTATION}
    if others:
        undo = [op for op in undo if op != {"op": "remove", "path": "/metadata/annotations"}]
    if others or set(meta) - {"annotations"}:
        undo = [op for op in undo if op != {"op": "remove", "path": "/metadata"}]
    return prefixed([remove, *undo], prefix)


# --- the parts -------------------------------------------------------------------------


def _app_container(containers: list[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
    names = [str(c.get("name")) for c in containers]
    if SIDECAR_NAME in names:
        raise InjectError(f"the pod already has a container named {SIDECAR_NAME!r}")
    if not containers:
        raise InjectError("the pod has no containers")
    if wanted is None:
        return containers[0]
    for c in containers:
        if c.get("name") == wanted:
            return c
    raise InjectError(f"no container named {wanted!r}; the pod has: {', '.join(names)}")


def _app_ports(app: dict[str, Any], wanted: tuple[int, ...]) -> list[int]:
    declared = [
        int(p["containerPort"])
        for p in app.get("ports") or []
        if p.get("protocol", "TCP") == "TCP" and "containerPort" in p
    ]
    if not wanted:
        if not declared:
            raise InjectError(
                f"container {app.get('name')!r} declares no TCP port; declare the port the app "
                "serves in the container's ports (the sidecar fronts the declared ports)"
            )
        return declared
    missing = [p for p in wanted if p not in declared]
    if missing:
        have = ", ".join(map(str, declared)) or "none"
        raise InjectError(
            f"container {app.get('name')!r} declares no port {', '.join(map(str, missing))}; "
            f"it declares: {have}"
        )
    return list(wanted)


def _listen_ports(app_ports: list[int], options: InjectOptions, used: set[Any]) -> list[int]:
    for port, what in ((options.control_port, "session"), (options.health_port, "health")):
        if port in used:
            raise InjectError(
                f"port {port} (the sidecar's {what} port) is already used in the pod; "
                f"choose another {what} port"
            )
    taken = {*used, options.control_port, options.health_port}
    if options.listen_port in taken:
        raise InjectError(
            f"port {options.listen_port} (the sidecar's listener) is already used in the pod; "
            "choose another listen port"
        )
    out = [options.listen_port]
    candidate = options.listen_port + 1
    while len(out) < len(app_ports):
        if candidate not in taken and candidate not in out:
            out.append(candidate)
        candidate += 1
    return out


def _hand_over_named_port(app: dict[str, Any], name: str, app_ports: list[int]) -> dict[int, str]:
    """Privilege-free mode: the app's port `name` becomes the sidecar's."""
    for port in app.get("ports") or []:
        if port.get("name") == name:
            number = int(port["containerPort"])
            if number not in app_ports:
                raise InjectError(
                    f"port {name!r} is {number}, which is not among the ports to front "
                    f"({', '.join(map(str, app_ports))})"
                )
            renamed = f"app-{number}"
            port["name"] = renamed
            for probe_name in _PROBES:
                probe = app.get(probe_name)
                if not isinstance(probe, dict):
                    continue
                for kind in ("httpGet", "tcpSocket"):
                    action = probe.get(kind)
                    if isinstance(action, dict) and action.get("port") == name:
                        action["port"] = renamed
            return {number: name}
    names = [str(p.get("name")) for p in app.get("ports") or [] if p.get("name")]
    raise InjectError(
        f"container {app.get('name')!r} has no port named {name!r}; its named ports: "
        f"{', '.join(names) or 'none'}"
    )


def _sidecar(
    options: InjectOptions,
    app_ports: list[int],
    listen: list[int],
    named: dict[int, str],
    probe_paths: list[str],
) -> dict[str, Any]:
    args = [f"--app-port={app}:{port}" for app, port in zip(app_ports, listen, strict=True)]
    args += [
        f"--control-port={options.control_port}",
        f"--health-port={options.health_port}",
        f"--token-file={TOKEN_DIR}/{TOKEN_KEY}",
        f"--capture={options.capture.value}",
    ]
    if options.protect_probes:
        args += [f"--probe-path={path}" for path in probe_paths]
    if options.workers > 1:
        args.append(f"--workers={options.workers}")
    ports: list[dict[str, Any]] = []
    for app, port in zip(app_ports, listen, strict=True):
        entry: dict[str, Any] = {"containerPort": port, "protocol": "TCP"}
        if app in named:
            entry["name"] = named[app]
        ports.append(entry)
    ports.append({"name": "offramp-control", "containerPort": options.control_port})
    ports.append({"name": "offramp-health", "containerPort": options.health_port})
    security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": options.run_as_user,
        "readOnlyRootFilesystem": True,
        # PodSecurity "restricted" asks for it; it is the runtime's default profile.
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if options.capture is Capture.IPTABLES:
        # The image gives the iptables and ss binaries this capability as a file
        # capability; no_new_privs (allowPrivilegeEscalation: false) would void it.
        security["capabilities"] = {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    else:
        security["capabilities"] = {"drop": ["ALL"]}
        security["allowPrivilegeEscalation"] = False
    resources = copy.deepcopy(options.resources)
    if resources is None:
        resources = default_resources(options.workers)
    return {
        "name": SIDECAR_NAME,
        "image": options.image,
        "args": args,
        # The admin's outgoing allow-list, from the pod's annotation ("" when unset).
        "env": [
            {
                "name": ALLOW_ENV,
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{ALLOW_ANNOTATION}']"}
                },
            },
            # Where the sidecar answers the preview link, and how long a session's
            # client may stay silent ("" when unset: the defaults).
            *(
                {
                    "name": env,
                    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}},
                }
                for env, key in (
                    (PREFIX_ENV, PREFIX_ANNOTATION),
                    (IDLE_TIMEOUT_ENV, IDLE_TIMEOUT_ANNOTATION),
                )
            ),
        ],
        "ports": ports,
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
        # The primary answers it; a probe never starts the engine.
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": options.health_port},
            "periodSeconds": 5,
        },
        "resources": resources,
        "securityContext": security,
    }


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def prefixed(patch: Patch, prefix: str) -> Patch:
    """The patch with `prefix` before every path (a template inside a bigger object)."""
    out = []
    for op in patch:
        op = dict(op)
        op["path"] = prefix + op["path"]
        if "from" in op:
            op["from"] = prefix + op["from"]
        out.append(op)
    return out
