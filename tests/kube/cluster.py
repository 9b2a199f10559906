"""A running emulated cluster: the API server, the controllers and the kubelet on
one event loop in a thread of the test process, and a kubeconfig for it.

Two identities: `admin` (the test, allowed everything) and `developer` (the
CLI under test, allowed only what the chart's offramp-user ClusterRole grants,
bound in the namespaces the test names).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.kube.api import Api
from tests.kube.controllers import Controllers, ready
from tests.kube.kubelet import Image, Kubelet
from tests.kube.rbac import User, offramp_user_rules
from tests.kube.store import Obj, Store, parse_selector

SYNC_PERIOD = 0.1


class Cluster:
    def __init__(self, state: Path, images: dict[str, Image], developer_namespaces: list[str]):
        self.state = state
        self.tag = secrets.token_hex(2)
        self.store: Store
        self.admin_token = secrets.token_urlsafe(16)
        self.developer_token = secrets.token_urlsafe(16)
        self.colleague_token = secrets.token_urlsafe(16)
        """A second developer, with the same offramp-user role."""
        rules = offramp_user_rules()
        self.users = {
            self.admin_token: User("admin", superuser=True),
            self.developer_token: User(
                "developer", bindings={ns: rules for ns in developer_namespaces}
            ),
            self.colleague_token: User(
                "colleague", bindings={ns: rules for ns in developer_namespaces}
            ),
        }
        self.kubelet_images = images
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.api: Api
        self.kubelet: Kubelet
        self._runner: web.AppRunner | None = None
        self._sync_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        self.store = Store()
        net = _free_net(int(self.tag, 16) % 250 + 1)
        self.kubelet = Kubelet(self.store, self.kubelet_images, self.state, self.tag, net)
        await asyncio.to_thread(self.kubelet.setup)
        self.api = Api(self.store, self.users, self.kubelet.dial, self.kubelet.container_log)
        self._runner = web.AppRunner(self.api.app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sock: socket.socket = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        self._sync_task = asyncio.create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        controllers = Controllers(self.store)
        while True:
            controllers.sync()
            await self.kubelet.sync()
            await asyncio.sleep(SYNC_PERIOD)

    def close(self) -> None:
        async def stop() -> None:
            if self._sync_task:
                self._sync_task.cancel()
            for pod in list(self.kubelet.pods.values()):
                for task in pod.tasks:
                    task.cancel()
            if self._runner:
                await self._runner.cleanup()
            await asyncio.to_thread(self.kubelet.teardown)

        try:
            self.run(stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    def run[T](self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call[T](self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    # --- for the test: kubeconfig and admin operations -----------------------------------

    def kubeconfig(self, path: Path, namespace: str = "default", user: str = "developer") -> Path:
        """A kubeconfig for `user`: "developer" or "colleague"."""
        token = {"developer": self.developer_token, "colleague": self.colleague_token}[user]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulated",
            "clusters": [
                {"name": "emulated", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "emulated",
                    "context": {"cluster": "emulated", "user": user, "namespace": namespace},
                }
            ],
        }
        path.write_text(json.dumps(config))
        return path

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """An admin request over HTTP, as a client would make it."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.admin_token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read().decode()}") from e

    def apply(self, obj: Obj) -> Obj:
        kind = obj["kind"]
        ns = obj["metadata"].get("namespace", "default")
        base = {
            "Namespace": "/api/v1/namespaces",
            "Service": f"/api/v1/namespaces/{ns}/services",
            "Secret": f"/api/v1/namespaces/{ns}/secrets",
            "ConfigMap": f"/api/v1/namespaces/{ns}/configmaps",
            "Deployment": f"/apis/apps/v1/namespaces/{ns}/deployments",
            "StatefulSet": f"/apis/apps/v1/namespaces/{ns}/statefulsets",
        }[kind]
        created: Obj = self.request("POST", base, obj)
        return created

    def patch(self, path: str, ops: list[Obj]) -> Obj:
        out: Obj = self.request("PATCH", path, ops, "application/json-patch+json")
        return out

    def pods(self, namespace: str, **labels: str) -> list[Obj]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return self.call(lambda: self.store.list("pods", namespace, parse_selector(selector)))

    def ready_pods(self, namespace: str, **labels: str) -> list[Obj]:
        return [p for p in self.pods(namespace, **labels) if ready(p)]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n" + self.describe()
                )
            time.sleep(0.1)

    def endpoints(self, namespace: str, service: str) -> list[tuple[str, int]]:
        """What an EndpointSlice would list: ready pods behind the Service, with the
        targetPort resolved against each pod's container ports (named or numbered)."""
        svc = self.call(lambda: self.store.get("services", namespace, service))
        port = svc["spec"]["ports"][0]
        target = port.get("targetPort", port["port"])
        out = []
        selector = svc["spec"].get("selector") or {}
        for pod in self.ready_pods(namespace, **selector):
            if isinstance(target, int):
                out.append((pod["status"]["podIP"], target))
                continue
            for c in pod["spec"]["containers"]:
                for p in c.get("ports") or []:
                    if p.get("name") == target:
                        out.append((pod["status"]["podIP"], p["containerPort"]))
        return out

    def describe(self) -> str:
        def text() -> str:
            lines = []
            for pod in self.store.list("pods", ""):
                status = pod.get("status") or {}
                states = {
                    c["name"]: (c["ready"], c["state"]) for c in status.get("containerStatuses", [])
                }
                lines.append(
                    f"pod {pod['metadata']['name']} ip={status.get('podIP')} "
                    f"deleting={bool(pod['metadata'].get('deletionTimestamp'))} {states}"
                )
            for kind in ("deployments", "statefulsets"):
                for w in self.store.list(kind, ""):
                    lines.append(
                        f"{kind} {w['metadata']['name']} gen={w['metadata'].get('generation')} "
                        f"status={w.get('status')}"
                    )
            return "\n".join(lines)

        return self.call(text)

    def logs(self) -> dict[str, str]:
        return self.kubelet.logs()


def _free_net(wanted: int) -> int:
    """A /24 of 10.214.0.0/16 that no interface here has: a run that was killed
    may have left a pod network behind, and a pod address that answers from it
    would be another cluster's pod."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for net in [wanted, *range(1, 251)]:
        if f" 10.214.{net}." not in used:
            return net
    raise RuntimeError("every 10.214.N.0/24 is in use here; remove stale ofrk* bridges")
