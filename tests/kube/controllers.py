"""The Deployment and StatefulSet controllers, and PodSecurity admission of the pods they create.

Deployments roll out as the real controller does with the RollingUpdate
strategy (maxSurge and maxUnavailable, 25% each by default), but without
ReplicaSet objects: pods are owned by the Deployment directly and carry the
`pod-template-hash` label. StatefulSets create and roll pods one at a time by
ordinal (OrderedReady, RollingUpdate from the highest ordinal down).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from typing import Any

from tests.kube.store import ApiError, Obj, Store, now, parse_selector

BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}


def template_hash(template: Obj) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def admit_pod(namespace: Obj, pod: Obj) -> None:
    """PodSecurity admission (the `enforce` label), for the checks offramp's pods meet."""
    level = (namespace["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce")
    if level not in ("baseline", "restricted"):
        return
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    problems: list[str] = []
    for c in spec.get("containers") or []:
        sc = c.get("securityContext") or {}
        name = c["name"]
        added = set((sc.get("capabilities") or {}).get("add") or [])
        allowed = BASELINE_CAPS if level == "baseline" else {"NET_BIND_SERVICE"}
        if extra := sorted(added - allowed):
            problems.append(
                f'non-default capabilities (container "{name}" must not include '
                f"{', '.join(map(repr, extra))} in securityContext.capabilities.add)"
            )
        if sc.get("privileged"):
            problems.append(f'privileged (container "{name}" must not set privileged=true)')
        if level == "restricted":
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f'allowPrivilegeEscalation != false (container "{name}")')
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f'unrestricted capabilities (container "{name}" must drop ALL)')
            if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
                problems.append(f'runAsNonRoot != true (container "{name}")')
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(
                    f'seccompProfile (container "{name}" must set type to '
                    '"RuntimeDefault" or "Localhost")'
                )
    if problems:
        raise ApiError(
            403,
            "Forbidden",
            f'pods "{pod["metadata"]["name"]}" is forbidden: violates PodSecurity '
            f'"{level}:latest": ' + ", ".join(problems),
        )


def _pod_from_template(owner: Obj, kind: str, name: str, extra_labels: dict[str, str]) -> Obj:
    template = owner["spec"]["template"]
    meta = template.get("metadata") or {}
    pod: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner["metadata"]["namespace"],
            "labels": {**(meta.get("labels") or {}), **extra_labels},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": json.loads(json.dumps(template["spec"])),
    }
    if meta.get("annotations"):
        pod["metadata"]["annotations"] = dict(meta["annotations"])
    return pod


def _percent(value: Any, replicas: int, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    fraction = int(str(value).rstrip("%")) * replicas / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


class Controllers:
    def __init__(self, store: Store):
        self.store = store

    def sync(self) -> None:
        for d in self.store.list("deployments", ""):
            self._sync_deployment(d)
        for s in self.store.list("statefulsets", ""):
            self._sync_statefulset(s)

    def _owned(self, owner: Obj) -> list[Obj]:
        ns = owner["metadata"]["namespace"]
        selector = parse_selector(
            ",".join(
                f"{k}={v}" for k, v in owner["spec"]["selector"].get("matchLabels", {}).items()
            )
        )
        return [
            p
            for p in self.store.list("pods", ns, selector)
            if any(
                r["uid"] == owner["metadata"]["uid"]
                for r in p["metadata"].get("ownerReferences", [])
            )
        ]

    def _create(self, owner: Obj, pod: Obj) -> str | None:
        """Create the pod; the reason it was refused, or None."""
        ns = owner["metadata"]["namespace"]
        try:
            admit_pod(self.store.get("namespaces", "", ns), pod)
            self.store.create("pods", ns, pod)
        except ApiError as e:
            return e.message
        return None

    def _delete(self, pod: Obj) -> None:
        if not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"]["deletionTimestamp"] = now()
            pod["metadata"]["deletionGracePeriodSeconds"] = 30
            self.store.replace("pods", pod["metadata"]["namespace"], pod["metadata"]["name"], pod)

    def _set_status(self, plural: str, owner: Obj, status: Obj, failure: str | None) -> None:
        old = owner.get("status") or {}
        conditions = [c for c in old.get("conditions") or [] if c["type"] != "ReplicaFailure"]
        if failure:
            conditions.append(
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": failure,
                    "lastTransitionTime": now(),
                    "lastUpdateTime": now(),
                }
            )
        if conditions:
            status["conditions"] = conditions
        if status != old:
            owner["status"] = status
            meta = owner["metadata"]
            self.store.replace(plural, meta["namespace"], meta["name"], owner)

    def _sync_deployment(self, d: Obj) -> None:
        spec = d["spec"]
        replicas = spec.get("replicas", 1)
        h = template_hash(spec["template"])
        live = [p for p in self._owned(d) if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in live if p["metadata"]["labels"].get("pod-template-hash") == h]
        old = [p for p in live if p not in new]
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        surge = _percent(rolling.get("maxSurge", "25%"), replicas, round_up=True)
        unavailable = _percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            surge = 1
        failure = None
        total = len(live)
        while len(new) < replicas and total < replicas + surge and failure is None:
            name = f"{d['metadata']['name']}-{h}-{secrets.token_hex(3)[:5]}"
            pod = _pod_from_template(d, "Deployment", name, {"pod-template-hash": h})
            failure = self._create(d, pod)
            if failure is None:
                new.append(pod)
                total += 1
        # Old pods go as far as availability allows; unready ones first, at no cost.
        available = sum(map(ready, live))
        for pod in sorted(old, key=ready):
            if not ready(pod):
                self._delete(pod)
            elif available - 1 >= replicas - unavailable:
                self._delete(pod)
                available -= 1
        if len(new) > replicas and not old:
            for pod in sorted(new, key=lambda p: (ready(p), p["metadata"]["creationTimestamp"]))[
                : len(new) - replicas
            ]:
                self._delete(pod)
        live = [p for p in self._owned(d) if not p["metadata"].get("deletionTimestamp")]
        n_ready = sum(map(ready, live))
        status = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": len(live),
            "updatedReplicas": sum(
                p["metadata"]["labels"].get("pod-template-hash") == h for p in live
            ),
            "readyReplicas": n_ready,
            "availableReplicas": n_ready,
            "unavailableReplicas": max(replicas - n_ready, 0),
        }
        self._set_status(
            "deployments",
            d,
            {k: v for k, v in status.items() if v != 0 or k == "observedGeneration"},
            failure,
        )

    def _sync_statefulset(self, s: Obj) -> None:
        spec = s["spec"]
        name = s["metadata"]["name"]
        replicas = spec.get("replicas", 1)
        revision = f"{name}-{template_hash(spec['template'])}"
        pods = {p["metadata"]["name"]: p for p in self._owned(s)}
        failure = None
        all_ready_below = True
        for i in range(replicas):
            pod = pods.get(f"{name}-{i}")
            if pod is None:
                if all_ready_below:
                    fresh = _pod_from_template(
                        s,
                        "StatefulSet",
                        f"{name}-{i}",
                        {
                            "controller-revision-hash": revision,
                            "statefulset.kubernetes.io/pod-name": f"{name}-{i}",
                        },
                    )
                    failure = self._create(s, fresh)
                break
            if not ready(pod):
                all_ready_below = False
        for pod_name, pod in pods.items():
            ordinal = int(pod_name.rsplit("-", 1)[1])
            if ordinal >= replicas:
                self._delete(pod)
        live = [p for p in self._owned(s) if not p["metadata"].get("deletionTimestamp")]
        if len(live) == replicas and all(map(ready, live)):
            stale = [
                p
                for p in live
                if p["metadata"]["labels"].get("controller-revision-hash") != revision
            ]
            if stale:
                self._delete(max(stale, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1])))
        live = [p for p in self._owned(s) if not p["metadata"].get("deletionTimestamp")]
        updated = sum(
            p["metadata"]["labels"].get("controller-revision-hash") == revision for p in live
        )
        n_ready = sum(map(ready, live))
        old = s.get("status") or {}
        current = (
            revision if updated == replicas == len(live) else old.get("currentRevision", revision)
        )
        status = {
            "observedGeneration": s["metadata"].get("generation", 1),
            "replicas": len(live),
            "readyReplicas": n_ready,
            "availableReplicas": n_ready,
            "currentReplicas": sum(
                p["metadata"]["labels"].get("controller-revision-hash") == current for p in live
            ),
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": revision,
        }
        self._set_status(
            "statefulsets",
            s,
            {k: v for k, v in status.items() if v != 0 or k in ("observedGeneration", "replicas")},
            failure,
        )
