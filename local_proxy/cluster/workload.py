"""What `offramp steal TARGET` decides about a workload: pure functions on API objects.

Target kinds, the injection patch (re-injecting when the options changed),
privilege-free mode and its named port, rollout progress, and which pods a
session can use. No I/O: local_proxy/cluster/target.py feeds these the objects.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import jsonpatch
from pydantic import ValidationError

from sidecar.inject.patch import (
    ANNOTATION,
    SIDECAR_NAME,
    TOKEN_VOLUME,
    InjectError,
    InjectOptions,
    inject,
    injected,
    prefixed,
    stale_env,
    uninject,
)
from sidecar.settings import Capture

__all__ = [
    "KINDS",
    "PodFailure",
    "Rollout",
    "Target",
    "TargetError",
    "choose_capture",
    "declared_ports",
    "fronted_ports",
    "injected_image",
    "injection_patch",
    "named_target_port",
    "parse_target",
    "rollout",
    "rollout_failure",
    "session_pods",
    "session_ports",
    "uninjection_patch",
]

Obj = dict[str, Any]

KINDS = {
    "deploy": "deployments",
    "deployment": "deployments",
    "deployments": "deployments",
    "sts": "statefulsets",
    "statefulset": "statefulsets",
    "statefulsets": "statefulsets",
    "po": "pods",
    "pod": "pods",
    "pods": "pods",
}
SHORT = {"deployments": "deploy", "statefulsets": "sts", "pods": "pod"}
FORBIDS_NET_ADMIN = ("baseline", "restricted")
PSA_LABEL = "pod-security.kubernetes.io/enforce"
CONTROL_PORT_NAME = "offramp-control"


@dataclass(frozen=True)
class Target:
    resource: str
    name: str
    context: str | None = None
    namespace: str | None = None


class TargetError(ValueError):
    """The target or the options do not fit the workload; the message says how."""


def parse_target(text: str) -> tuple[str, str]:
    kind, sep, name = text.partition("/")
    if not sep or not name or kind.lower() not in KINDS:
        raise TargetError(
            f"cannot use {text!r} as a target: write KIND/NAME with KIND one of deploy, "
            "deployment, sts, statefulset, pod (e.g. deploy/api)"
        )
    return KINDS[kind.lower()], name


def describe(resource: str, name: str) -> str:
    return f"{SHORT[resource]}/{name}"


def selector(workload: Obj) -> str:
    labels = ((workload.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def choose_capture(namespace: Obj, no_iptables: bool) -> tuple[Capture, str]:
    """The capture mode and why it was chosen."""
    if no_iptables:
        return Capture.NONE, "--no-iptables"
    level = (namespace.get("metadata", {}).get("labels") or {}).get(PSA_LABEL)
    if level in FORBIDS_NET_ADMIN:
        return Capture.NONE, (
            f"namespace {namespace['metadata']['name']} enforces PodSecurity {level!r}, "
            "which forbids NET_ADMIN"
        )
    return Capture.IPTABLES, "iptables capture"


def _app(template: Obj, container: str | None) -> Obj:
    containers: list[Obj] = [c for c in template["spec"]["containers"] if c["name"] != SIDECAR_NAME]
    if container is None:
        return containers[0]
    for c in containers:
        if c["name"] == container:
            return c
    names = ", ".join(c["name"] for c in containers)
    raise TargetError(f"no container named {container!r}; the pod has: {names}")


def named_target_port(
    template: Obj, services: list[Obj], ports: tuple[int, ...], container: str | None
) -> str:
    """Privilege-free mode: the port name the workload's Service targets.

    Reads the template as it is without the sidecar (the app's port names)."""
    app = _app(template, container)
    labels = (template.get("metadata") or {}).get("labels") or {}
    by_name = {p["name"]: p["containerPort"] for p in app.get("ports") or [] if p.get("name")}
    wanted = set(ports) or {p["containerPort"] for p in app.get("ports") or []}
    routing = [
        s
        for s in services
        if (sel := (s.get("spec") or {}).get("selector"))
        and all(labels.get(k) == v for k, v in sel.items())
    ]
    if not routing:
        names = ", ".join(s["metadata"]["name"] for s in services) or "none"
        raise TargetError(
            "privilege-free mode points a Service at the sidecar, but no Service selects "
            f"these pods (labels {labels}); Services in the namespace: {names}"
        )
    numbered = []
    for svc in routing:
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and by_name.get(target) in wanted:
                return target
            if target in wanted:
                numbered.append((svc["metadata"]["name"], target))
    if numbered:
        svc, number = numbered[0]
        raise TargetError(
            f"privilege-free mode needs the Service's targetPort to be a port name, but "
            f"Service {svc!r} targets port {number} by number. Name the port in the container "
            f"(ports: [{{name: http, containerPort: {number}}}]) and set the Service's "
            "targetPort to http, or use iptables capture (no --no-iptables) where NET_ADMIN "
            "is allowed"
        )
    raise TargetError(
        f"no Service selecting these pods targets port {', '.join(map(str, sorted(wanted)))}"
    )


def service_host(services: list[Obj], template: Obj, namespace: str) -> str | None:
    """`name.namespace[:port]` of the first Service (by name) that selects the
    template's pods, for links people open; None if none does."""
    labels = (template.get("metadata") or {}).get("labels") or {}
    for svc in sorted(services, key=lambda s: s["metadata"]["name"]):
        wanted = (svc.get("spec") or {}).get("selector") or {}
        if wanted and all(labels.get(k) == v for k, v in wanted.items()):
            ports = (svc.get("spec") or {}).get("ports") or [{}]
            port = ports[0].get("port", 80)
            return f"{svc['metadata']['name']}.{namespace}" + (f":{port}" if port != 80 else "")
    return None


def original_template(template: Obj) -> Obj:
    """The template without offramp's injection."""
    undo = uninject(template)
    out: Obj = jsonpatch.apply_patch(template, undo) if undo else copy.deepcopy(template)
    return out


def _same_options(recorded: object, options: InjectOptions) -> bool:
    """Recorded options (by any earlier version, whose defaults fill what it did
    not know) equal to `options`."""
    try:
        return InjectOptions.model_validate(recorded) == options
    except ValidationError:
        return False


def injection_patch(workload: Obj, options: InjectOptions) -> list[Obj]:
    """The patch that leaves the workload injected with `options` ([] if it already is).

    Injected with other options (ports, capture mode, image), or with a copy of
    the app container's env that is no longer its env, it is re-injected in one
    patch, so one rollout. The patch tests the resourceVersion first, so
    it fails instead of overwriting a change made in the meantime."""
    template = workload["spec"]["template"]
    record = injected(template)
    if (
        record is not None
        and _same_options(record.get("options"), options)
        and not stale_env(template)
    ):
        return []
    base = original_template(template)
    try:
        after = jsonpatch.apply_patch(base, inject(base, options))
    except InjectError as e:
        raise TargetError(str(e)) from e
    ops = prefixed(jsonpatch.make_patch(template, after).patch, "/spec/template")
    guard = {
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": workload["metadata"]["resourceVersion"],
    }
    return [guard, *ops]


def uninjection_patch(workload: Obj) -> list[Obj]:
    ops = uninject(workload["spec"]["template"], "/spec/template")
    if not ops:
        return []
    guard = {
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": workload["metadata"]["resourceVersion"],
    }
    return [guard, *ops]


@dataclass(frozen=True)
class Rollout:
    done: bool
    want: int
    updated: int
    ready: int
    failure: str | None

    observed: bool = True

    def progress(self) -> str:
        if not self.observed:
            return "waiting for the controller"
        return f"{self.updated}/{self.want} updated, {self.ready}/{self.want} ready"


def rollout(resource: str, workload: Obj) -> Rollout:
    """Where a Deployment's or StatefulSet's rollout stands (as `kubectl rollout status`)."""
    spec, status = workload.get("spec") or {}, workload.get("status") or {}
    want = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas", 0))
    ready = int(status.get("readyReplicas", 0))
    observed = int(status.get("observedGeneration", 0)) >= int(
        workload["metadata"].get("generation", 1)
    )
    failure = next(
        (
            c.get("message")
            for c in status.get("conditions") or []
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
        ),
        None,
    )
    if resource == "statefulsets":
        done = (
            observed
            and updated == want
            and ready == want
            and (status.get("currentRevision") == status.get("updateRevision"))
        )
    else:
        done = (
            observed
            and updated == want
            and ready == want
            and int(status.get("replicas", 0)) == want
            and int(status.get("availableReplicas", 0)) == want
        )
    return Rollout(done, want, updated, ready, failure, observed)


CANNOT_START = frozenset(
    {
        "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
        "CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
        "RunContainerError",
    }
)  # fmt: skip
"""Container waiting reasons that a rollout does not get past by waiting."""


@dataclass(frozen=True)
class PodFailure:
    pod: str
    container: str
    reason: str
    message: str
    exit_code: int | None
    crashed: bool
    """It ran and exited (its previous run's logs say why)."""

    def describe(self) -> str:
        code = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        message = f": {self.message}" if self.message else ""
        return f"pod {self.pod}, container {self.container}: {self.reason}{code}{message}"


def rollout_failure(template: Obj, pods: list[Obj]) -> PodFailure | None:
    """A pod of this template's rollout that cannot start, if there is one.

    A pod belongs to the rollout when it carries the template's injection record
    (pods copy the template's annotations). The sidecar exiting with an error
    counts at once; the app's container only once the kubelet backs off, as an
    app may exit once while it starts."""
    record = ((template.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    for pod in pods:
        meta = pod["metadata"]
        if record is None or (meta.get("annotations") or {}).get(ANNOTATION) != record:
            continue
        if meta.get("deletionTimestamp"):
            continue
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            state = c.get("state") or {}
            waiting = state.get("waiting") or {}
            ended = (c.get("lastState") or {}).get("terminated") or state.get("terminated") or {}
            code = ended.get("exitCode")
            crashed = code is not None and code != 0
            if waiting.get("reason") in CANNOT_START or (crashed and c["name"] == SIDECAR_NAME):
                return PodFailure(
                    meta["name"],
                    c["name"],
                    waiting.get("reason") or ended.get("reason") or "Error",
                    waiting.get("message", ""),
                    code,
                    crashed,
                )
    return None


def session_pods(pods: list[Obj], keep: Collection[str] = ()) -> dict[str, int]:
    """Pod name -> the sidecar's control port, for every ready, running pod with a sidecar.

    A pod in `keep` (it has a session) stays while it runs, also once it is
    terminating or unready: the Service may still send it traffic until its
    endpoints are gone (a preStop hook holds it there for that), and its sidecar
    ends the session itself when it stops."""
    out = {}
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        if status.get("phase") != "Running":
            continue
        kept = meta["name"] in keep
        if meta.get("deletionTimestamp") and not kept:
            continue
        if not kept and not any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            continue
        for c in pod["spec"]["containers"]:
            if c["name"] == SIDECAR_NAME:
                for p in c.get("ports") or []:
                    if p.get("name") == CONTROL_PORT_NAME:
                        out[meta["name"]] = int(p["containerPort"])
    return out


def declared_ports(template: Obj, container: str | None) -> list[int]:
    """The app container's TCP ports: what an injection fronts."""
    app = _app(template, container)
    return [
        int(p["containerPort"])
        for p in app.get("ports") or []
        if p.get("protocol", "TCP") == "TCP" and "containerPort" in p
    ]


def fronted_ports(template_or_pod: Obj) -> list[int]:
    """The app ports the injected sidecar fronts, from its `--app-port` arguments."""
    for c in (template_or_pod.get("spec") or {}).get("containers") or []:
        if c["name"] == SIDECAR_NAME:
            return [
                int(arg.split("=", 1)[1].split(":")[0])
                for arg in c.get("args") or []
                if arg.startswith("--app-port=")
            ]
    return []


def session_ports(
    wanted: tuple[int, ...] | None, fronted: list[int]
) -> tuple[tuple[int, ...] | None, list[int]]:
    """The ports a session filters, and the wanted ones the sidecar does not front.

    mirrord's `http_filter.ports` names the ports whose requests are filtered; a
    listed port the workload does not serve is left out (the caller says so),
    and only if none is served is it an error."""
    if not wanted:
        return None, []
    kept = tuple(p for p in wanted if p in fronted)
    missing = [p for p in wanted if p not in fronted]
    if not kept:
        raise TargetError(
            f"the sidecar fronts port {', '.join(map(str, fronted)) or 'none'}, and none of the "
            f"ports to filter ({', '.join(map(str, wanted))}); name one of those (--port, or "
            "http_filter.ports in the config), or declare the port in the app container"
        )
    return kept, missing


def injected_image(template_or_pod: Obj) -> str | None:
    """The image of the injected sidecar, if there is one."""
    for c in (template_or_pod.get("spec") or {}).get("containers") or []:
        if c["name"] == SIDECAR_NAME:
            return str(c["image"])
    return None


def token_secret(template_or_pod: Obj) -> str | None:
    """The Secret the sidecar reads its token from, per the pod spec."""
    for vol in (template_or_pod.get("spec") or {}).get("volumes") or []:
        if vol.get("name") == TOKEN_VOLUME and "secret" in vol:
            return str(vol["secret"]["secretName"])
    return None


def secret_name(resource: str, name: str) -> str:
    return f"offramp-token-{SHORT[resource]}-{name}"[:253]
