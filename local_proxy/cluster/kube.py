"""The Kubernetes API as offramp uses it: the official client behind plain dicts.

The only module that imports `kubernetes`. Objects go in and come out as the
JSON the API server speaks (camelCase dicts, exactly as stored), never as the
client's model classes, so that a patch computed from one is exact. Calls
block; the caller runs them in a thread.

Errors::

    KubeError            anything the cluster or the client configuration refused
    ├── KubeConfigError   no usable kubeconfig, context or in-cluster config
    ├── NotFound          the object does not exist (404)
    ├── Forbidden         RBAC said no (403): the message names the verb and resource
    ├── Invalid           the API server rejected the request (4xx other than 404/403)
    └── Unreachable       no answer, or a server error (5xx)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.stream import portforward

__all__ = [
    "Forbidden",
    "Invalid",
    "Kube",
    "KubeConfigError",
    "KubeError",
    "NotFound",
    "Unreachable",
]

Obj = dict[str, Any]
Objects = list[Obj]
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeError(Exception):
    pass


class KubeConfigError(KubeError):
    pass


class NotFound(KubeError):
    pass


class Forbidden(KubeError):
    pass


class Invalid(KubeError):
    pass


class Unreachable(KubeError):
    pass


def _translate(e: Exception, doing: str) -> KubeError:
    if isinstance(e, ApiException):
        message = e.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(e.body).get("message") or message
        status = e.status or 0
        if status == 404:
            return NotFound(message)
        if status == 403:
            return Forbidden(
                f"{message} (ask a cluster admin to bind the offramp-user ClusterRole from "
                "charts/offramp to you in this namespace)"
            )
        if status == 401:
            return Forbidden(f"{doing}: the cluster did not accept your credentials ({message})")
        if 400 <= status < 500:
            return Invalid(f"{doing}: {message}")
        return Unreachable(f"{doing}: the API server answered {status}: {message}")
    return Unreachable(f"{doing}: cannot reach the API server: {e}")


def _translate_handshake(e: Exception, doing: str) -> KubeError:
    """A refused websocket handshake arrives wrapped (and, in the client's own error
    handling, sometimes as an AttributeError); the answer's status is in the chain."""
    cause: BaseException | None = e
    while cause is not None:
        status = getattr(cause, "status_code", None)
        if isinstance(status, int):
            body = getattr(cause, "resp_body", None) or b"{}"
            return _translate(_status_error(status, body), doing)
        cause = cause.__cause__ or cause.__context__
    return _translate(e, doing) if isinstance(e, _ERRORS) else Unreachable(f"{doing}: {e}")


def _status_error(status: int, body: bytes) -> ApiException:
    error = ApiException(status=status, reason=f"status {status}")
    error.body = body.decode(errors="replace")
    return error


_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)

# (group API, read, list, patch) method names of the generated client, per resource.
_METHODS = {
    "deployments": (
        "apps",
        "read_namespaced_deployment",
        "list_namespaced_deployment",
        "patch_namespaced_deployment",
    ),
    "statefulsets": (
        "apps",
        "read_namespaced_stateful_set",
        "list_namespaced_stateful_set",
        "patch_namespaced_stateful_set",
    ),
    "pods": ("core", "read_namespaced_pod", "list_namespaced_pod", "patch_namespaced_pod"),
    "services": (
        "core",
        "read_namespaced_service",
        "list_namespaced_service",
        "patch_namespaced_service",
    ),
    "secrets": (
        "core",
        "read_namespaced_secret",
        "list_namespaced_secret",
        "patch_namespaced_secret",
    ),
}


class Kube:
    """One cluster and namespace, chosen the way kubectl chooses them."""

    def __init__(self, context: str | None = None, namespace: str | None = None):
        configuration = client.Configuration()
        context_namespace = None
        self.context_user = ""
        try:
            config.load_kube_config(context=context, client_configuration=configuration)
            _, active = config.list_kube_config_contexts()
            if context is not None:
                contexts, _ = config.list_kube_config_contexts()
                active = next(c for c in contexts if c["name"] == context)
            context_namespace = (active.get("context") or {}).get("namespace")
            self.context_user = str((active.get("context") or {}).get("user") or "")
        except (ConfigException, OSError, StopIteration) as e:
            if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except ConfigException as e2:
                    raise KubeConfigError(f"in-cluster configuration: {e2}") from e2
                if IN_CLUSTER_NAMESPACE.exists():
                    context_namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
            else:
                where = os.environ.get("KUBECONFIG", "~/.kube/config")
                raise KubeConfigError(
                    f"no usable kubeconfig ({where}): {e}. Point KUBECONFIG at one, or choose "
                    "a context with --context"
                ) from e
        self.namespace = namespace or context_namespace or "default"
        self.server = configuration.host
        self._client = client.ApiClient(configuration)
        self._apis = {
            "core": client.CoreV1Api(self._client),
            "apps": client.AppsV1Api(self._client),
        }
        # Port-forwards swap the ApiClient's request method while they connect,
        # which is not thread-safe: they get a client of their own and a lock.
        self._pf_core = client.CoreV1Api(client.ApiClient(configuration))
        self._pf_lock = threading.Lock()

    def _call(self, doing: str, group: str, method: str, *args: Any, **kwargs: Any) -> Obj:
        try:
            resp = getattr(self._apis[group], method)(*args, _preload_content=False, **kwargs)
            out: Obj = json.loads(resp.data)
            return out
        except _ERRORS as e:
            raise _translate(e, doing) from e

    def get(self, resource: str, name: str) -> Obj:
        group, read, _, _ = _METHODS[resource]
        return self._call(f"get {resource}/{name}", group, read, name, self.namespace)

    def list(self, resource: str, selector: str | None = None) -> tuple[Objects, str]:
        """The objects and the list's resourceVersion (to watch from)."""
        group, _, list_, _ = _METHODS[resource]
        kwargs = {"label_selector": selector} if selector else {}
        out = self._call(f"list {resource}", group, list_, self.namespace, **kwargs)
        return out.get("items") or [], str((out.get("metadata") or {}).get("resourceVersion", ""))

    def patch(self, resource: str, name: str, ops: Objects) -> Obj:
        """Apply an RFC 6902 JSON Patch."""
        group, _, _, patch = _METHODS[resource]
        return self._call(f"patch {resource}/{name}", group, patch, name, self.namespace, ops)

    def whoami(self) -> str:
        """The user the API server knows this kubeconfig as (a SelfSubjectReview,
        Kubernetes 1.28+); where it cannot say, the kubeconfig context's user entry."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            resp = client.AuthenticationV1Api(self._client).create_self_subject_review(
                review, _preload_content=False
            )
            name = json.loads(resp.data)["status"]["userInfo"]["username"]
            if isinstance(name, str) and name:
                return name
        except (*_ERRORS, KeyError, TypeError, ValueError):
            pass
        return self.context_user or "unknown user"

    def get_namespace(self) -> Obj:
        return self._call(
            f"get namespace {self.namespace}", "core", "read_namespace", self.namespace
        )

    def create_secret(self, body: Obj) -> Obj:
        return self._call("create secret", "core", "create_namespaced_secret", self.namespace, body)

    def watch_pods(self, selector: str, since: str, seconds: int) -> Iterator[tuple[str, Obj]]:
        """Pod events after resourceVersion `since`, for up to `seconds`."""
        w = watch.Watch()
        try:
            for event in w.stream(
                self._apis["core"].list_namespaced_pod,
                self.namespace,
                label_selector=selector,
                resource_version=since,
                timeout_seconds=seconds,
                deserialize=False,
            ):
                yield event["type"], event["object"]
        except _ERRORS as e:
            raise _translate(e, "watch pods") from e
        finally:
            w.stop()

    def logs(self, pod: str, container: str, tail: int, previous: bool = False) -> str:
        """The last `tail` lines a container wrote (of its previous run, if asked)."""
        try:
            resp = self._apis["core"].read_namespaced_pod_log(
                pod, self.namespace, container=container, tail_lines=tail,
                previous=previous, _preload_content=False,
            )  # fmt: skip
            return str(resp.data.decode(errors="replace"))
        except _ERRORS as e:
            raise _translate(e, f"read the logs of {pod}/{container}") from e

    def port_forward(self, pod: str, port: int) -> socket.socket:
        """A connected stream socket to `port` inside `pod`, through the API server."""
        try:
            with self._pf_lock:
                pf = portforward(
                    self._pf_core.connect_get_namespaced_pod_portforward,
                    pod,
                    self.namespace,
                    ports=str(port),
                )
        except Exception as e:
            raise _translate_handshake(e, f"port-forward to {pod}:{port}") from e
        wrapper = pf.socket(port)
        # A plain socket object for asyncio (the client hands out a wrapper).
        sock = socket.socket(fileno=os.dup(wrapper.fileno()))
        wrapper.close()
        return sock
