"""The injector webhook's decision: an AdmissionReview (v1) in, its answer out.

Pure; `sidecar.inject.webhook` serves it over HTTPS. Which pods are injected:
- the chart registers two webhooks: one for namespaces labelled
  `offramp.dev/inject=true` (`scope="namespace"`: every pod there), one for
  the remaining pods (`scope="pod"`: only a pod whose own labels or
  annotations carry `offramp.dev/inject: "true"`);
- never in kube-system nor in the webhook's own namespace, whatever the
  selectors say;
- a pod that already has the sidecar is left as it is.

A pod's annotations may choose, per pod, what the chart's values set for all:
`offramp.dev/ports` ("8080,9090"), `offramp.dev/capture` ("iptables" or
"none"), `offramp.dev/named-port`, `offramp.dev/token-secret`, and
`offramp.dev/copy-env` ("false": the sidecar gets no copy of the app's env, so
sessions get none).

The answer always allows the pod: a pod that cannot be injected (say, it
declares no port) is created without the sidecar, with a warning that says
why. A review too malformed to answer raises `BadReview`, which the server
turns into a 400.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from sidecar.inject.patch import COPY_ENV_ANNOTATION, InjectError, InjectOptions, copies_env, inject
from sidecar.settings import Capture

__all__ = ["OPT_IN", "BadReview", "WebhookPolicy", "review"]

OPT_IN = "offramp.dev/inject"
Scope = Literal["pod", "namespace"]


class BadReview(ValueError):
    pass


class WebhookPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    options: InjectOptions
    own_namespace: str
    never: frozenset[str] = frozenset({"kube-system"})


def review(body: Any, policy: WebhookPolicy, scope: Scope) -> dict[str, Any]:
    """The AdmissionReview to answer `body` with."""
    if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
        raise BadReview("expected an AdmissionReview object")
    api_version = body.get("apiVersion")
    if api_version != "admission.k8s.io/v1":
        raise BadReview(f"AdmissionReview {api_version!r} is not admission.k8s.io/v1")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("the AdmissionReview has no request with a uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}

    pod = request.get("object")
    if not isinstance(pod, dict) or pod.get("kind") != "Pod":
        response["warnings"] = ["offramp: not injected: the request's object is not a Pod"]
        return answer
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""
    if namespace in policy.never or namespace == policy.own_namespace:
        return answer
    metadata = pod.get("metadata") or {}
    if scope == "pod" and not _opted_in(metadata):
        return answer
    try:
        options = _options_for(metadata, policy.options)
        patch = inject(pod, options)
    except (InjectError, ValidationError, ValueError) as e:
        response["warnings"] = [f"offramp: not injected: {_one_line(e)}"]
        return answer
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return answer


def _opted_in(metadata: dict[str, Any]) -> bool:
    return any(
        isinstance(m := metadata.get(where), dict) and m.get(OPT_IN) == "true"
        for where in ("labels", "annotations")
    )


def _options_for(metadata: dict[str, Any], base: InjectOptions) -> InjectOptions:
    notes = metadata.get("annotations") or {}
    update: dict[str, Any] = {}
    if "offramp.dev/ports" in notes:
        text = str(notes["offramp.dev/ports"])
        try:
            update["ports"] = tuple(int(p) for p in text.split(",") if p.strip())
        except ValueError:
            raise ValueError(
                f"offramp.dev/ports is {text!r}; write port numbers separated by commas"
            ) from None
    if "offramp.dev/capture" in notes:
        update["capture"] = Capture(str(notes["offramp.dev/capture"]))
    if "offramp.dev/named-port" in notes:
        update["named_port"] = str(notes["offramp.dev/named-port"])
    if COPY_ENV_ANNOTATION in notes:
        update["copy_env"] = copies_env(notes)
    if "offramp.dev/token-secret" in notes:
        update["token_secret"] = str(notes["offramp.dev/token-secret"])
    return InjectOptions.model_validate({**base.model_dump(), **update}) if update else base


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
