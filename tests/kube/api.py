"""The emulator's HTTP API: the REST paths, verbs and content types the official
client uses for get, list, watch, create, patch and delete, pods/log (container and
tailLines), and pods/portforward over a websocket with the channel framing of
`v4.channel.k8s.io`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from typing import Any

import jsonpatch
from aiohttp import WSMsgType, web

from tests.kube.rbac import Request, User, forbidden_message
from tests.kube.store import KINDS, ApiError, Kind, Obj, Store, now, parse_selector

PORTFORWARD_PROTOCOL = "v4.channel.k8s.io"

Dial = Callable[[str, str, int], socket.socket]
"""(namespace, pod, port) -> a socket connected to that port inside the pod; blocking."""


def status_response(error: ApiError) -> web.Response:
    return web.json_response(error.status(), status=error.code)


class Api:
    def __init__(
        self, store: Store, users: dict[str, User], dial: Dial, logs: Callable[[str, str, str], str]
    ):
        self.store = store
        self.users = users
        self.dial = dial
        self.logs = logs
        self.requests: list[tuple[str, Request]] = []
        """(user, request) of every authorized request, for tests that check the CLI's calls."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except ApiError as e:
            return status_response(e)

    def _user(self, request: web.Request) -> User:
        auth = request.headers.get("Authorization", "")
        user = (
            self.users.get(auth.removeprefix("Bearer ").strip())
            if auth.startswith("Bearer ")
            else None
        )
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def _authorize(self, user: User, req: Request) -> None:
        if not user.allowed(req):
            raise ApiError(
                403,
                "Forbidden",
                forbidden_message(user, req),
                {"name": req.name, "kind": req.resource},
            )
        self.requests.append((user.name, req))

    async def _self_subject_review(self, request: web.Request, user: User) -> web.Response:
        """Who the caller is. Every authenticated user may ask (the default
        system:basic-user ClusterRole grants it), so no RBAC rule is checked."""
        if request.method != "POST":
            raise ApiError(405, "MethodNotAllowed", "selfsubjectreviews accept only create")
        body = await self._json(request)
        if body.get("kind") != "SelfSubjectReview":
            raise ApiError(
                400, "BadRequest", f"expected a SelfSubjectReview, got {body.get('kind')}"
            )
        groups = ["system:authenticated"] + (["system:masters"] if user.superuser else [])
        return web.json_response(
            {
                "kind": "SelfSubjectReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "status": {"userInfo": {"username": user.name, "groups": groups}},
            },
            status=201,
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        parts = [p for p in request.path.split("/") if p]
        if parts == ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"]:
            return await self._self_subject_review(request, user)
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:3] == ["apis", "apps", "v1"]:
            group, rest = "apps", parts[3:]
        else:
            raise ApiError(
                404,
                "NotFound",
                f"the server could not find the requested resource "
                f"({request.method} {request.path})",
            )
        namespace = ""
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = [*rest, "", "", ""][:3]
        kind = KINDS.get(plural)
        if kind is None or kind.group != group or len(rest) > 3:
            raise ApiError(
                404,
                "NotFound",
                f"the server could not find the requested resource "
                f"({request.method} {request.path})",
            )
        if plural == "namespaces" and name:
            namespace = name  # RBAC sees a namespace's own object as inside it
        if (plural, sub) == ("pods", "log") and request.method == "GET":
            self._authorize(user, Request("get", group, "pods/log", namespace, name))
            return self._log(request, namespace, name)
        if sub:
            if (plural, sub) != ("pods", "portforward"):
                raise ApiError(404, "NotFound", f"subresource {sub!r} is not emulated")
            # A websocket upgrade is a GET; since 1.30 the API server also asks for `create`.
            for verb in ("get", "create"):
                self._authorize(user, Request(verb, group, "pods/portforward", namespace, name))
            return await self._portforward(request, namespace, name)

        q = request.query
        if request.method == "GET":
            verb = "get" if name else ("watch" if q.get("watch") in ("true", "1") else "list")
        else:
            verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(
                request.method, request.method.lower()
            )
        self._authorize(user, Request(verb, group, plural, namespace, name))
        store_ns = namespace if kind.namespaced else ""
        if verb == "get":
            return web.json_response(self.store.get(plural, store_ns, name))
        if verb == "list":
            selector = parse_selector(q.get("labelSelector"))
            items = self.store.list(plural, store_ns, selector)
            return web.json_response(
                {
                    "kind": f"{kind.kind}List",
                    "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": self.store.resource_version},
                    "items": items,
                }
            )
        if verb == "watch":
            return await self._watch(request, kind, store_ns)
        if verb == "create":
            return web.json_response(
                self.store.create(plural, store_ns, await self._json(request)), status=201
            )
        if verb == "patch":
            return web.json_response(await self._patch(request, kind, store_ns, name))
        if verb == "delete":
            return web.json_response(self._delete(kind, store_ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not emulated")

    def _log(self, request: web.Request, namespace: str, name: str) -> web.Response:
        pod = self.store.get("pods", namespace, name)
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = request.query.get("container")
        if container is None:
            if len(containers) > 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(containers)}]",
                )
            container = containers[0]
        try:
            text = self.logs(namespace, name, container)
        except LookupError as e:
            raise ApiError(400, "BadRequest", str(e)) from e
        if "tailLines" in request.query:
            tail = int(request.query["tailLines"])
            text = "".join(text.splitlines(keepends=True)[-tail:] if tail else [])
        return web.Response(text=text, content_type="text/plain")

    async def _json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {e}") from e

    async def _patch(self, request: web.Request, kind: Kind, namespace: str, name: str) -> Obj:
        content_type = request.content_type
        current = self.store.get(kind.plural, namespace, name)
        body = await self._json(request)
        if content_type == "application/json-patch+json":
            try:
                patched = jsonpatch.JsonPatch(body).apply(current)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(
                    422, "Invalid", f"the test operation of the patch failed: {e}"
                ) from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the patch cannot be applied: {e}") from e
            except (TypeError, KeyError) as e:
                raise ApiError(400, "BadRequest", f"the body is not a JSON Patch: {e}") from e
        elif content_type == "application/merge-patch+json":
            patched = jsonpatch.apply_patch(
                current, jsonpatch.make_patch(current, _merge(current, body))
            )
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the emulator does not apply "
                f"{content_type!r} patches (JSON Patch and merge patch only)",
            )
        return self.store.replace(kind.plural, namespace, name, patched)

    def _delete(self, kind: Kind, namespace: str, name: str) -> Obj:
        obj = self.store.get(kind.plural, namespace, name)
        if kind.plural == "pods":
            # The kubelet stops the containers and then removes the object.
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 30
                obj = self.store.replace("pods", namespace, name, obj)
            return obj
        self.store.remove(kind.plural, namespace, name)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Success",
            "details": {"name": name, "kind": kind.plural},
        }

    async def _watch(self, request: web.Request, kind: Kind, namespace: str) -> web.StreamResponse:
        q = request.query
        selector = parse_selector(q.get("labelSelector"))
        timeout = min(float(q.get("timeoutSeconds", "1800")), 1800.0)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        since_text = q.get("resourceVersion", "")
        if since_text in ("", "0"):
            # No version: the current objects as ADDED, then what changes from now.
            since = int(self.store.resource_version)
            for obj in self.store.list(kind.plural, namespace, selector):
                await response.write(_line("ADDED", obj))
        else:
            since = int(since_text)
        with contextlib.suppress(ConnectionResetError):
            async for event_type, obj in self.store.watch(
                kind.plural, namespace, selector, since, timeout
            ):
                await response.write(_line(event_type, obj))
            await response.write_eof()
        return response

    async def _portforward(
        self, request: web.Request, namespace: str, name: str
    ) -> web.StreamResponse:
        pod = self.store.get("pods", namespace, name)
        if pod.get("status", {}).get("phase") != "Running":
            raise ApiError(400, "BadRequest", f"pod {name} is not running")
        try:
            ports = [int(p) for p in request.query.getall("ports", []) for p in p.split(",")]
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid port: {e}") from e
        if not ports:
            raise ApiError(400, "BadRequest", "at least one port must be given (ports=)")
        ws = web.WebSocketResponse(protocols=(PORTFORWARD_PROTOCOL,), autoping=True)
        await ws.prepare(request)
        if ws.ws_protocol != PORTFORWARD_PROTOCOL:
            await ws.close(code=1002, message=b"v4.channel.k8s.io is the only protocol emulated")
            return ws
        writers: dict[int, asyncio.StreamWriter] = {}
        pumps: list[asyncio.Task[None]] = []
        for i, port in enumerate(ports):
            # Each channel first carries its port number, little-endian.
            await ws.send_bytes(bytes([2 * i]) + port.to_bytes(2, "little"))
            await ws.send_bytes(bytes([2 * i + 1]) + port.to_bytes(2, "little"))
        for i, port in enumerate(ports):
            try:
                sock = await asyncio.to_thread(self.dial, namespace, name, port)
            except OSError as e:
                message = (
                    f"error forwarding port {port} to pod {name}, uid : failed to connect "
                    f"to localhost:{port} inside namespace: {e}"
                )
                await ws.send_bytes(bytes([2 * i + 1]) + message.encode())
                continue
            reader, writer = await asyncio.open_connection(sock=sock)
            writers[2 * i] = writer
            pumps.append(asyncio.create_task(_pod_to_ws(reader, ws, 2 * i)))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                writer = writers.get(msg.data[0])
                if writer is not None and not writer.is_closing():
                    writer.write(msg.data[1:])
                    await writer.drain()
        except ConnectionResetError:
            pass
        finally:
            for writer in writers.values():
                writer.close()
            for pump in pumps:
                pump.cancel()
            await ws.close()
        return ws


async def _pod_to_ws(reader: asyncio.StreamReader, ws: web.WebSocketResponse, channel: int) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            await ws.send_bytes(bytes([channel]) + data)
    # The pod closed the connection: the client sees the websocket end.
    await ws.close()


def _line(event_type: str, obj: Obj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out
