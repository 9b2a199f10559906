"""Injection is a pure function from a pod template to a JSON Patch: what it
adds, that it is idempotent, that uninject restores the template exactly, that
its results pass the Kubernetes schemas, and its errors."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from sidecar.appenv import PREFIX as APP_ENV_PREFIX
from sidecar.inject.patch import (
    ANNOTATION,
    COPY_ENV_ANNOTATION,
    SIDECAR_NAME,
    InjectError,
    InjectOptions,
    copies_env,
    inject,
    injected,
    stale_env,
    uninject,
)
from sidecar.settings import Capture

K8S = "1.30"
IMAGE = "registry.example/offramp-sidecar:0.1.0"


def deployment(**template_metadata: Any) -> dict[str, Any]:
    template: dict[str, Any] = {
        "spec": {
            "containers": [
                {
                    "name": "api",
                    "image": "registry.example/api:1",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    "startupProbe": {"tcpSocket": {"port": "http"}},
                }
            ]
        }
    }
    if template_metadata:
        template["metadata"] = template_metadata
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "api"}},
            "template": {"metadata": {"labels": {"app": "api"}}, **template},
        },
    }


def apply(obj: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(obj, patch)
    return result


def injected_deployment(
    options: InjectOptions, obj: dict[str, Any] | None = None
) -> dict[str, Any]:
    obj = obj or deployment()
    patch = inject(obj["spec"]["template"], options, "/spec/template")
    out = apply(obj, patch)
    kubernetes_validate.validate(out, K8S, strict=True)
    return out


def sidecar_of(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == SIDECAR_NAME)


def test_iptables_mode_adds_the_sidecar_with_net_admin_and_the_probe_paths() -> None:
    out = injected_deployment(InjectOptions(image=IMAGE, ports=(8080,)))
    sidecar = sidecar_of(out)
    assert sidecar["image"] == IMAGE
    assert sidecar["args"] == [
        "--app-port=8080:15080",
        "--control-port=15081",
        "--health-port=15079",
        "--token-file=/var/run/offramp/token",
        "--capture=iptables",
        "--probe-path=/healthz",
        "--probe-path=/ready",
    ]
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert "privileged" not in sidecar["securityContext"]
    # The probe goes to the primary's health port: it never starts the engine.
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 15079}
    assert {"name": "offramp-health", "containerPort": 15079} in sidecar["ports"]
    assert sidecar["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"memory": "256Mi"},
    }
    token = {"secretName": "offramp-token", "optional": True}
    assert {"name": "offramp-token", "secret": token} in out["spec"]["template"]["spec"]["volumes"]
    # The app container is untouched in this mode.
    assert (
        out["spec"]["template"]["spec"]["containers"][0]
        == deployment()["spec"]["template"]["spec"]["containers"][0]
    )
    assert injected(out["spec"]["template"]) is not None


def test_every_declared_port_is_fronted_when_none_is_named() -> None:
    sidecar = sidecar_of(injected_deployment(InjectOptions(image=IMAGE)))
    assert sidecar["args"][:2] == ["--app-port=8080:15080", "--app-port=9090:15082"]


def test_the_memory_limit_grows_with_the_workers_unless_resources_are_given() -> None:
    sidecar = sidecar_of(injected_deployment(InjectOptions(image=IMAGE, workers=3)))
    assert sidecar["resources"]["limits"] == {"memory": "448Mi"}
    given = {"requests": {"cpu": "1"}}
    sidecar = sidecar_of(
        injected_deployment(InjectOptions(image=IMAGE, workers=3, resources=given))
    )
    assert sidecar["resources"] == given


def test_a_pod_port_equal_to_the_health_port_is_refused() -> None:
    with pytest.raises(InjectError, match=r"port 9090 .*health port"):
        injected_deployment(InjectOptions(image=IMAGE, ports=(8080,), health_port=9090))


def test_probe_protection_can_be_turned_off() -> None:
    sidecar = sidecar_of(injected_deployment(InjectOptions(image=IMAGE, protect_probes=False)))
    assert not any(a.startswith("--probe-path") for a in sidecar["args"])


def test_injecting_twice_changes_nothing() -> None:
    once = injected_deployment(InjectOptions(image=IMAGE))
    assert inject(once["spec"]["template"], InjectOptions(image=IMAGE), "/spec/template") == []


@pytest.mark.parametrize(
    "metadata",
    [
        {"labels": {"app": "api"}},
        {"labels": {"app": "api"}, "annotations": {"team": "shop"}},
    ],
    ids=["no annotations", "with annotations"],
)
@pytest.mark.parametrize("capture", [Capture.IPTABLES, Capture.NONE])
def test_uninject_restores_the_template_exactly(metadata: dict[str, Any], capture: Capture) -> None:
    original = deployment()
    original["spec"]["template"]["metadata"] = metadata
    options = InjectOptions(image=IMAGE, capture=capture, named_port="http")
    out = injected_deployment(options, copy.deepcopy(original))
    restored = apply(out, uninject(out["spec"]["template"], "/spec/template"))
    assert restored == original
    assert uninject(restored["spec"]["template"]) == []


def test_uninject_restores_a_pod_without_metadata_in_its_template() -> None:
    template = {"spec": copy.deepcopy(deployment()["spec"]["template"]["spec"])}
    out = apply(template, inject(template, InjectOptions(image=IMAGE)))
    assert apply(out, uninject(out)) == template


@pytest.mark.parametrize(
    "metadata", [None, {"labels": {"app": "api"}}], ids=["no metadata", "labels"]
)
def test_uninject_keeps_annotations_added_since_injection(metadata: dict[str, Any] | None) -> None:
    """`kubectl rollout restart` annotates the template of an injected workload; the
    annotations map the injection created must then stay, with that annotation."""
    template = {"spec": copy.deepcopy(deployment()["spec"]["template"]["spec"])}
    if metadata is not None:
        template["metadata"] = metadata
    out = apply(template, inject(template, InjectOptions(image=IMAGE)))
    out["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2026-11-23T10:00:00Z"
    restored = apply(out, uninject(out))
    expected = copy.deepcopy(template)
    expected.setdefault("metadata", {})["annotations"] = {
        "kubectl.kubernetes.io/restartedAt": "2026-11-23T10:00:00Z"
    }
    assert restored == expected


def test_privilege_free_mode_hands_the_named_port_to_the_sidecar() -> None:
    options = InjectOptions(image=IMAGE, capture=Capture.NONE, named_port="http", ports=(8080,))
    out = injected_deployment(options)
    app = out["spec"]["template"]["spec"]["containers"][0]
    assert app["ports"][0] == {"name": "app-8080", "containerPort": 8080}
    # Probes that named the port now name the app's renamed port; numbers stay.
    assert app["livenessProbe"]["httpGet"]["port"] == "app-8080"
    assert app["startupProbe"]["tcpSocket"]["port"] == "app-8080"
    assert app["readinessProbe"]["httpGet"]["port"] == 8080
    sidecar = sidecar_of(out)
    assert {"name": "http", "containerPort": 15080, "protocol": "TCP"} in sidecar["ports"]
    assert "--capture=none" in sidecar["args"]
    security = sidecar["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False


def test_a_pod_is_patched_at_its_root_as_the_webhook_does() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-1", "namespace": "shop"},
        "spec": copy.deepcopy(deployment()["spec"]["template"]["spec"]),
    }
    out = apply(pod, inject(pod, InjectOptions(image=IMAGE)))
    kubernetes_validate.validate(out, K8S, strict=True)
    record = json.loads(out["metadata"]["annotations"][ANNOTATION])
    assert record["options"]["image"] == IMAGE


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"container": "web"},
            "no container named 'web'; the pod has: api",
        ),
        (
            {"ports": (8081,)},
            "container 'api' declares no port 8081; it declares: 8080, 9090",
        ),
        (
            {"capture": Capture.NONE, "named_port": "grpc"},
            "container 'api' has no port named 'grpc'; its named ports: http, metrics",
        ),
        (
            {"listen_port": 9090},
            "port 9090 (the sidecar's listener) is already used in the pod",
        ),
    ],
)
def test_what_does_not_fit_is_refused_with_what_there_is(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InjectError) as refused:
        inject(deployment()["spec"]["template"], InjectOptions(image=IMAGE, **options))
    assert message in str(refused.value)


def test_a_container_without_ports_needs_one_named() -> None:
    template = deployment()["spec"]["template"]
    del template["spec"]["containers"][0]["ports"]
    with pytest.raises(InjectError, match="declares no TCP port"):
        inject(template, InjectOptions(image=IMAGE))


def test_workers_are_passed_to_the_sidecar_only_when_more_than_one() -> None:
    assert not any(
        a.startswith("--workers")
        for a in sidecar_of(injected_deployment(InjectOptions(image=IMAGE)))["args"]
    )
    sidecar = sidecar_of(injected_deployment(InjectOptions(image=IMAGE, workers=3)))
    assert sidecar["args"][-1] == "--workers=3"


def test_the_cli_reinjects_only_when_the_options_differ() -> None:
    """`offramp steal` leaves an injected workload alone when its options are the
    same, also those recorded by a version that knew fewer of them."""
    from local_proxy.cluster.workload import injection_patch

    options = InjectOptions(image=IMAGE)
    obj = {**injected_deployment(options), "metadata": {"name": "api", "resourceVersion": "7"}}
    assert injection_patch(obj, options) == []

    older = copy.deepcopy(obj)
    annotations = older["spec"]["template"]["metadata"]["annotations"]
    record = json.loads(annotations[ANNOTATION])
    del record["options"]["workers"]  # as recorded before there were workers
    annotations[ANNOTATION] = json.dumps(record)
    assert injection_patch(older, options) == []

    more = InjectOptions(image=IMAGE, workers=2)
    patch = injection_patch(obj, more)
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "7"}
    after = apply(obj, patch)
    assert sidecar_of(after)["args"][-1] == "--workers=2"
    assert injected(after["spec"]["template"])["options"]["workers"] == 2  # type: ignore[index]


OWN_ENV = ["OFFRAMP_OUTGOING_ALLOW", "OFFRAMP_PREVIEW_PREFIX", "OFFRAMP_SESSION_IDLE_TIMEOUT"]
"""The sidecar's own variables, from the pod's annotations."""


def deployment_with_env() -> dict[str, Any]:
    obj = deployment()
    app = obj["spec"]["template"]["spec"]["containers"][0]
    app["env"] = [
        {"name": "PYTHONPATH", "value": "/junk"},
        {"name": "DB_URL", "value": "postgres://$(DB_HOST)/x"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
    ]
    app["envFrom"] = [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}]
    return obj


def test_the_apps_env_is_copied_into_the_sidecar_under_the_prefix() -> None:
    out = injected_deployment(InjectOptions(image=IMAGE), deployment_with_env())
    sidecar = sidecar_of(out)
    names = [e["name"] for e in sidecar["env"]]
    assert names == OWN_ENV + [
        f"{APP_ENV_PREFIX}{n}" for n in ("PYTHONPATH", "DB_URL", "POD", "MEM")
    ]
    copied = sidecar["env"][len(OWN_ENV) :]
    assert copied[1]["value"] == f"postgres://$({APP_ENV_PREFIX}DB_HOST)/x"
    assert copied[3]["valueFrom"]["resourceFieldRef"]["containerName"] == "api"
    assert sidecar["envFrom"] == [
        {"configMapRef": {"name": "settings"}, "prefix": APP_ENV_PREFIX + "CFG_"}
    ]
    assert not any(n.startswith("PYTHON") for n in names), "the sidecar's Python is untouched"


def test_uninject_removes_the_copied_env_exactly() -> None:
    original = deployment_with_env()
    out = injected_deployment(InjectOptions(image=IMAGE), copy.deepcopy(original))
    assert apply(out, uninject(out["spec"]["template"], "/spec/template")) == original


def test_copy_env_off_by_annotation_or_option() -> None:
    out = injected_deployment(InjectOptions(image=IMAGE, copy_env=False), deployment_with_env())
    assert [e["name"] for e in sidecar_of(out)["env"]] == OWN_ENV
    assert "envFrom" not in sidecar_of(out)
    assert copies_env({COPY_ENV_ANNOTATION: "false"}) is False
    assert copies_env({}) is True
    with pytest.raises(InjectError, match='write "true" or "false"'):
        copies_env({COPY_ENV_ANNOTATION: "no"})


def test_the_cli_reinjects_when_the_apps_env_changed_since() -> None:
    """The sidecar's copy must follow the app's env: `kubectl set env` on an injected
    workload makes the next `offramp steal` re-inject (one rollout)."""
    from local_proxy.cluster.workload import injection_patch

    options = InjectOptions(image=IMAGE)
    obj = {
        **injected_deployment(options, deployment_with_env()),
        "metadata": {"name": "api", "resourceVersion": "7"},
    }
    assert not stale_env(obj["spec"]["template"])
    assert injection_patch(obj, options) == []
    obj["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "/other"
    assert stale_env(obj["spec"]["template"])
    after = apply(obj, injection_patch(obj, options))
    assert not stale_env(after["spec"]["template"])
    assert sidecar_of(after)["env"][len(OWN_ENV)] == {
        "name": APP_ENV_PREFIX + "PYTHONPATH",
        "value": "/other",
    }
    # Uninjecting then gives the app as it is now.
    restored = apply(after, uninject(after["spec"]["template"], "/spec/template"))
    assert restored["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "/other"
    assert len(restored["spec"]["template"]["spec"]["containers"]) == 1
