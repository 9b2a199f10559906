"""`offramp steal|status|uninject KIND/NAME`: the cluster side of a session.

Steal: resolve the workload, make sure its token Secret exists, inject the
sidecar (one JSON Patch, one rollout), wait for the rollout, then keep one
tunnel to the sidecar of every ready pod through the API's port-forward,
following the pods with a watch: new replicas join, deleted ones leave, and a
rollout never ends the session. The sidecar stays injected afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from local_proxy.cluster.kube import Forbidden, Invalid, Kube, KubeError, NotFound
from local_proxy.cluster.workload import (
    PodFailure,
    Target,
    TargetError,
    choose_capture,
    declared_ports,
    describe,
    fronted_ports,
    injected_image,
    injection_patch,
    named_target_port,
    original_template,
    rollout,
    rollout_failure,
    secret_name,
    selector,
    service_host,
    session_pods,
    session_ports,
    token_secret,
    uninjection_patch,
)
from local_proxy.config import LocalSettings, announce_preview, preview_link
from local_proxy.env import describe as describe_env
from local_proxy.env import fetch_env
from local_proxy.forward.dial import SocketFactory
from local_proxy.session import LocalSession, Refused, SessionError
from sidecar.inject.patch import (
    SIDECAR_NAME,
    InjectError,
    InjectOptions,
    copies_env,
    injected,
    stale_env,
)
from sidecar.sessions.preview import DEFAULT_PREFIX, PREFIX_ANNOTATION
from sidecar.sessions.spec import OutgoingSpec
from sidecar.settings import Capture

__all__ = ["StealTarget", "Target", "run_status", "run_uninject"]

Obj = dict[str, Any]
Report = Callable[[str], None]
WATCH_SECONDS = 30
LOG_LINES = 10
RESYNC = 5.0


PLACEHOLDER_REGISTRY = "registry.example"
NO_IMAGE = (
    "no sidecar image is set, and there is no public one: build it from this repository's "
    "Dockerfile and push it where your cluster pulls from (README: 'In a cluster: the "
    "image'), then pass --image IMAGE, set OFFRAMP_SIDECAR_IMAGE, or run "
    "'offramp set-image IMAGE' once. Nothing was changed in the cluster"
)


CONFLICT_RETRIES = 5
"""Times the injection patch is computed anew when the workload changed under it."""


class Failed(Exception):
    """The command cannot go on; the message says why and what to do."""


def _list_names(kube: Kube, resource: str) -> str:
    with contextlib.suppress(KubeError):
        names = [o["metadata"]["name"] for o in kube.list(resource)[0]]
        return ", ".join(names) or "none"
    return "unknown (cannot list them)"


def resolve(kube: Kube, target: Target) -> Obj:
    try:
        return kube.get(target.resource, target.name)
    except NotFound:
        raise Failed(
            f"no {target.resource[:-1]} {target.name!r} in namespace {kube.namespace!r}; "
            f"{target.resource} there: {_list_names(kube, target.resource)}"
        ) from None


@dataclass
class StealTarget:
    target: Target
    settings: LocalSettings
    """sidecar_url and token are filled in per pod."""
    image: str | None
    """None: the image the workload already has, else refused (no default exists)."""
    no_iptables: bool = False
    container: str | None = None
    sidecar_workers: int = 1
    rollout_timeout: float = 300.0
    report: Report = print
    outgoing: OutgoingSpec | None = None
    """Ask for outgoing traffic through a pod: a session of its own carries it."""
    factory: SocketFactory | None = None
    """The local process runs in a namespace: sockets to it are made there."""
    incoming: bool = True
    """False: no session steals (`offramp proxy KIND/NAME`); only outgoing traffic."""
    preview_host: str | None = None
    """Where people open the app, for the preview link; None: the Service's name."""
    kube: Kube | None = None
    sessions: dict[str, tuple[LocalSession, asyncio.Task[None]]] = field(default_factory=dict)
    ended: list[LocalSession] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _ending: list[LocalSession] = field(default_factory=list)
    _fatal: Failed | None = None
    _ready: tuple[str, str] = ("", "")
    """Once prepared: the pods' label selector and the session token."""

    def stop(self) -> None:
        """End the command; called again (a second Ctrl-C), abandon the requests held."""
        if self._stop.is_set():
            for session in self._ending:
                session.stop()
        self._stop.set()

    async def _k(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def prepare(self) -> tuple[Obj, str]:
        """Resolve, inject, roll out. Returns the workload and the session token."""
        t = self.target
        try:
            kube = self.kube = await asyncio.to_thread(Kube, t.context, t.namespace)
        except KubeError as e:
            raise Failed(str(e)) from e
        self.report(
            f"offramp: resolving {describe(t.resource, t.name)} in namespace "
            f"{kube.namespace} ({kube.server})"
        )
        # Who opens the sessions, as other developers' sessions show it: the
        # Kubernetes user, and the machine's user and name.
        who = f"{await self._k(kube.whoami)} ({self.settings.spec.client})"[:200]
        spec = self.settings.spec.model_copy(update={"client": who})
        self.settings = self.settings.model_copy(update={"spec": spec})
        try:
            workload = await self._k(resolve, kube, t)
            if t.resource == "pods":
                if not any(c["name"] == SIDECAR_NAME for c in workload["spec"]["containers"]):
                    raise Failed(
                        f"pod {t.name} has no offramp sidecar, and a pod's containers cannot "
                        "be changed: steal from its workload (deploy/NAME or sts/NAME), or "
                        "let the injector webhook add the sidecar (see charts/offramp)"
                    )
                self._choose_ports(fronted_ports(workload))
                return workload, await self._token(token_secret(workload) or "offramp-token")
            namespace = await self._k(kube.get_namespace)
            capture, why = choose_capture(namespace, self.no_iptables)
            template = workload["spec"]["template"]
            image = self.image or injected_image(template)
            if image is None:
                raise Failed(NO_IMAGE)
            if image.split("/")[0] == PLACEHOLDER_REGISTRY:
                raise Failed(f"{image} is the documentation's placeholder; " + NO_IMAGE)
            self._choose_ports(declared_ports(original_template(template), self.container))
            named = None
            if capture is Capture.NONE:
                services, _ = await self._k(kube.list, "services")
                named = named_target_port(original_template(template), services, (), self.container)
            # Every declared port is fronted, whichever the session filters: a
            # session's ports are the session's matter, so a different --port
            # (or a colleague's) restarts nothing. With no session on a port the
            # sidecar is not on its path.
            options = InjectOptions(
                image=image,
                container=self.container,
                capture=capture,
                named_port=named,
                token_secret=secret_name(t.resource, t.name),
                workers=self.sidecar_workers,
                copy_env=copies_env(
                    (original_template(template).get("metadata") or {}).get("annotations") or {}
                ),
            )
            token = await self._token(options.token_secret)
            ops = injection_patch(workload, options)
            if ops:
                verb = "re-injecting" if injected(template) else "injecting"
                if injected(template) and stale_env(template):
                    why = "the app container's env changed; the sidecar carries a copy"
                self.report(
                    f"offramp: {verb} the sidecar ({why}{', port ' + named if named else ''})"
                )
                workload = await self._patch_guarded(workload, options, ops)
            else:
                self.report("offramp: the sidecar is already injected")
            workload = await self._wait_rollout(workload)
            await self._announce_preview(original_template(workload["spec"]["template"]))
        except KubeError as e:
            raise Failed(str(e)) from e
        except (TargetError, InjectError) as e:
            raise Failed(f"{describe(t.resource, t.name)}: {e}") from e
        return workload, token

    async def _announce_preview(self, template: Obj) -> None:
        """With a preview key: the link that sets its cookie, for the host people use."""
        key = self.settings.spec.http_filter.preview
        if key is None or self.kube is None:
            return
        prefix = ((template.get("metadata") or {}).get("annotations") or {}).get(
            PREFIX_ANNOTATION
        ) or DEFAULT_PREFIX
        if prefix.strip().lower() == "off":
            self.report(announce_preview(key, None))
            return
        host = self.preview_host
        if host is None:
            services, _ = await self._k(self.kube.list, "services")
            host = service_host(services, template, self.kube.namespace) or "<the app's host>"
        self.report(announce_preview(key, preview_link(host, key, prefix)))

    async def _patch_guarded(self, workload: Obj, options: InjectOptions, ops: list[Obj]) -> Obj:
        """Apply the injection patch. Its guard fails when the object changed since it
        was read (a controller writing status does that right after an apply): then
        read it again and patch anew, a few times, as kubectl's retry on conflict does."""
        assert self.kube is not None
        t = self.target
        for _ in range(CONFLICT_RETRIES):
            try:
                return dict(await self._k(self.kube.patch, t.resource, t.name, ops))
            except Invalid:
                fresh = await self._k(resolve, self.kube, t)
                if fresh["metadata"]["resourceVersion"] == workload["metadata"]["resourceVersion"]:
                    raise  # not a conflict: the patch itself was refused
                workload = fresh
                ops = injection_patch(workload, options)
                if not ops:
                    return workload
        return dict(await self._k(self.kube.patch, t.resource, t.name, ops))

    def _choose_ports(self, fronted: list[int]) -> None:
        """Keep the ports to filter that the sidecar fronts; note the others."""
        spec = self.settings.spec
        kept, missing = session_ports(spec.http_filter.ports, fronted)
        if missing:
            self.report(
                f"offramp: {describe(self.target.resource, self.target.name)} serves no port "
                f"{', '.join(map(str, missing))}; filtering port {', '.join(map(str, kept or ()))}"
            )
        http_filter = spec.http_filter.model_copy(update={"ports": kept})
        self.settings = self.settings.model_copy(
            update={"spec": spec.model_copy(update={"http_filter": http_filter})}
        )

    async def _token(self, name: str) -> str:
        assert self.kube is not None
        try:
            secret = await self._k(self.kube.get, "secrets", name)
            return base64.b64decode(secret["data"]["token"]).decode()
        except NotFound:
            pass
        except (KeyError, TypeError, ValueError) as e:
            raise Failed(
                f"Secret {name!r} has no usable 'token' key ({e}); delete it, and "
                "offramp creates a new one"
            ) from e
        token = secrets.token_urlsafe(32)
        self.report(f"offramp: creating the session token Secret {name}")
        await self._k(
            self.kube.create_secret,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "offramp"}},
                "type": "Opaque",
                "stringData": {"token": token},
            },
        )
        return token

    async def _wait_rollout(self, workload: Obj) -> Obj:
        """Until the rollout is done; a pod that cannot start ends it within a poll."""
        assert self.kube is not None
        t = self.target
        where = describe(t.resource, t.name)
        deadline = time.monotonic() + self.rollout_timeout
        last = ""
        while True:
            state = rollout(t.resource, workload)
            if state.failure:
                raise Failed(
                    f"the rollout of {where} cannot create pods: {state.failure}\n"
                    + self._still_injected()
                )
            if state.progress() != last:
                last = state.progress()
                self.report(f"offramp: rolling out {where}: {last}")
            if state.done:
                return workload
            pods, _ = await self._k(self.kube.list, "pods", selector(workload))
            failure = rollout_failure(workload["spec"]["template"], pods)
            if failure is not None:
                raise Failed(
                    f"{where}: a new pod cannot start: {failure.describe()}"
                    + await self._log_tail(failure)
                    + "\n"
                    + self._still_injected()
                )
            if self._stop.is_set():
                raise Failed(
                    f"interrupted while rolling out {where} ({last}); the rollout goes on in "
                    "the cluster without offramp.\n" + self._still_injected()
                )
            if time.monotonic() > deadline:
                raise Failed(
                    f"the rollout did not finish in {self.rollout_timeout:.0f} s "
                    f"({last}); pods: {_pod_problems(pods)}\n" + self._still_injected()
                )
            await _first(asyncio.sleep(0.5), self._stop.wait())
            workload = await self._k(self.kube.get, t.resource, t.name)

    def _still_injected(self) -> str:
        t = self.target
        where = describe(t.resource, t.name)
        ns = f" -n {self.kube.namespace}" if self.kube is not None else ""
        return (
            f"offramp: {where} is still injected: undo it with 'offramp uninject {where}{ns}', "
            "or fix the cause and run offramp steal again (--image IMAGE for another image)"
        )

    async def _log_tail(self, failure: PodFailure) -> str:
        """The failing container's last log lines, indented, or why there are none."""
        assert self.kube is not None
        if failure.reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            return ""
        text = ""
        with contextlib.suppress(KubeError):
            if failure.crashed:
                text = await self._k(
                    self.kube.logs, failure.pod, failure.container, LOG_LINES, True
                )
        if not text.strip():
            try:
                text = await self._k(self.kube.logs, failure.pod, failure.container, LOG_LINES)
            except KubeError as e:
                return f"\n  (its logs cannot be read: {e})"
        lines = text.rstrip().splitlines()
        if not lines:
            return "\n  (it wrote nothing to its log)"
        return "\n  its last log lines:\n" + "\n".join(f"    {line}" for line in lines)

    # --- sessions on every ready pod ----------------------------------------------------

    async def run(
        self, before_sessions: Callable[[LocalSession | None], Awaitable[None]] | None = None
    ) -> None:
        """Inject, then keep a session on every ready pod until stop(). `before_sessions`,
        if given, runs once the pods are ready and before any session steals; it gets
        the (not yet started) session for outgoing traffic, if one was asked for."""
        workload, token = await self.prepare()
        assert self.kube is not None
        labels = selector(workload) if self.target.resource != "pods" else ""
        self._ready = (labels, token)
        if before_sessions is not None:
            try:
                await before_sessions(self._outgoing_session(labels, token))
            except BaseException:
                await self._end_all()
                raise
        if not self.incoming:
            await self._stop.wait()
            return
        changed = asyncio.Event()
        watcher = _PodWatcher(self.kube, labels, asyncio.get_running_loop(), changed)
        watcher.start()
        try:
            while not self._stop.is_set():
                changed.clear()
                pods, _ = await self._k(self.kube.list, "pods", labels or None)
                if self.target.resource == "pods":
                    pods = [p for p in pods if p["metadata"]["name"] == self.target.name]
                self._reconcile(session_pods(pods, keep=self.sessions.keys()), token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(changed.wait(), self._stop.wait()), RESYNC)
        finally:
            watcher.stop()
            await self._end_all()
        if self._fatal is not None:
            raise self._fatal

    def _reconcile(self, pods: dict[str, int], token: str) -> None:
        for name in [n for n in self.sessions if n not in pods]:
            session, _ = self.sessions.pop(name)
            session.stop()
            self.ended.append(session)
            self.report(f"offramp: pod {name} left ({len(self.sessions)} pods)")
        for name, port in pods.items():
            if name in self.sessions:
                continue
            settings = self.settings.model_copy(
                update={
                    "sidecar_url": f"ws://{name}.{self.target.namespace or 'pod'}:{port}",
                    "token": token,
                }
            )
            session = LocalSession(
                settings,
                report=_prefixed(self.report, name),
                dial=self._dialer(name, port),
                factory=self.factory,
            )
            task = asyncio.create_task(self._serve(name, session))
            self.sessions[name] = (session, task)
            self.report(f"offramp: pod {name} joined ({len(self.sessions)} pods)")

    async def _ready_pod(self, labels: str, why: str) -> tuple[str, int]:
        """A ready pod's name and its sidecar's control port. Raises OSError."""
        assert self.kube is not None
        pods, _ = await self._k(self.kube.list, "pods", labels or None)
        if self.target.resource == "pods":
            pods = [p for p in pods if p["metadata"]["name"] == self.target.name]
        ready = session_pods(pods, keep=())
        if not ready:
            raise OSError(f"no pod of the workload is ready to {why}")
        return next(iter(sorted(ready.items())))

    async def environment(self) -> dict[str, str]:
        """The app container's environment, as one ready pod's sidecar holds it (fieldRefs
        such as the pod's name are that pod's). Call from `before_sessions`. Raises
        EnvError or OSError."""
        labels, token = self._ready
        name, port = await self._ready_pod(labels, "give its environment")
        sock = await self._dialer(name, port)()
        env = await asyncio.to_thread(fetch_env, sock, name, token)
        self.report(f"offramp: the environment is pod {name}'s")
        return env

    def _outgoing_session(self, labels: str, token: str) -> LocalSession | None:
        """The session that carries outgoing traffic, through whichever pod is ready
        when it (re)connects."""
        if self.outgoing is None:
            return None

        async def dial() -> socket.socket:
            name, port = await self._ready_pod(labels, "carry outgoing traffic")
            sock: socket.socket = await self._dialer(name, port)()
            return sock

        spec = self.settings.spec.model_copy(update={"incoming": False, "outgoing": self.outgoing})
        settings = self.settings.model_copy(
            update={"sidecar_url": f"ws://outgoing.{self.target.namespace or 'pod'}",
                    "token": token, "spec": spec}
        )  # fmt: skip
        return LocalSession(settings, report=_prefixed(self.report, "outgoing"), dial=dial)

    def _dialer(self, pod: str, port: int) -> Callable[[], Any]:
        async def dial() -> socket.socket:
            assert self.kube is not None
            try:
                return await asyncio.to_thread(self.kube.port_forward, pod, port)
            except Forbidden as e:
                # Retrying cannot help: end the command and say what is missing.
                self._fatal = Failed(str(e))
                self.stop()
                raise OSError(str(e)) from e
            except KubeError as e:
                raise OSError(str(e)) from e

        return dial

    async def _serve(self, name: str, session: LocalSession) -> None:
        try:
            await session.run()
        except SessionError as e:
            self.report(f"offramp: pod {name}: {e}")
            if isinstance(e, Refused) and e.code in ("conflict", "taken_over", "ended"):
                # Another developer's session: retrying would not change that.
                self._fatal = Failed(str(e))
                self.stop()
            # Forget it; the next resync tries again if the pod is still there.
            if self.sessions.get(name, (None,))[0] is session:
                del self.sessions[name]
                self.ended.append(session)

    async def _end_all(self) -> None:
        """End every pod's session; each finishes the requests it holds (bounded by
        --timeout, or until a second stop())."""
        self._ending = [s for s, _ in self.sessions.values()]
        for session in self._ending:
            session.stop()
        tasks = [task for _, task in self.sessions.values()]
        self.ended += self._ending
        self.sessions.clear()
        if tasks:
            await asyncio.wait(tasks)

    def counters(self) -> tuple[int, int, int]:
        """Stolen, mirrored and filter timeouts, over every pod's session."""
        sessions = self.ended + [s for s, _ in self.sessions.values()]
        return (
            sum(s.forwarder.counters.stolen for s in sessions),
            sum(s.forwarder.counters.mirrored for s in sessions),
            sum(s.forwarder.counters.match_timeouts for s in sessions),
        )


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _prefixed(report: Report, pod: str) -> Report:
    return lambda line: report(f"[{pod}] {line}")


def _pod_problems(pods: list[Obj]) -> str:
    out = []
    for pod in pods:
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (c.get("state") or {}).get("waiting")
            if not c.get("ready"):
                why = (
                    f"{waiting.get('reason')}: {waiting.get('message', '')}"
                    if waiting
                    else "not ready"
                )
                out.append(f"{pod['metadata']['name']}/{c['name']} {why}")
    return "; ".join(out) or "none listed"


class _PodWatcher:
    """A watch on the pods in a thread (the client's watch blocks); any event sets `changed`."""

    def __init__(
        self, kube: Kube, labels: str, loop: asyncio.AbstractEventLoop, changed: asyncio.Event
    ):
        self.kube, self.labels, self.loop, self.changed = kube, labels, loop, changed
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offramp pod watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        since = ""
        while not self._stopped.is_set():
            try:
                if not since:
                    _, since = self.kube.list("pods", self.labels or None)
                for _, obj in self.kube.watch_pods(self.labels, since, WATCH_SECONDS):
                    since = obj["metadata"].get("resourceVersion", since)
                    if self._stopped.is_set():
                        return
                    self.loop.call_soon_threadsafe(self.changed.set)
            except KubeError:
                since = ""  # start over from a fresh list (e.g. 410 Gone)
                self._stopped.wait(1.0)


# --- status and uninject ------------------------------------------------------------------


def run_status(target: Target, report: Report) -> None:
    try:
        kube = Kube(target.context, target.namespace)
        workload = resolve(kube, target)
        template = workload if target.resource == "pods" else workload["spec"]["template"]
        record = injected(template)
        where = describe(target.resource, target.name)
        if record is None and target.resource != "pods":
            report(f"{where}: the sidecar is not injected")
            return
        options = (record or {}).get("options", {})
        if record:
            report(
                f"{where}: injected (image {options.get('image')}, capture "
                f"{options.get('capture')}, ports {options.get('ports') or 'all declared'})"
            )
        labels = selector(workload) if target.resource != "pods" else None
        pods, _ = kube.list("pods", labels)
        if target.resource == "pods":
            pods = [p for p in pods if p["metadata"]["name"] == target.name]
        terminating = sum(1 for p in pods if p["metadata"].get("deletionTimestamp"))
        ready = session_pods(pods)
        name = token_secret(template) or "offramp-token"
        try:
            token = base64.b64decode(kube.get("secrets", name)["data"]["token"]).decode()
        except (KubeError, KeyError):
            token = None
        report(
            f"{len(ready)} of {len(pods) - terminating} pods have a ready sidecar"
            + (f" ({terminating} more terminating)" if terminating else "")
        )
        for pod, port in sorted(ready.items()):
            report(f"  {pod}: {_sidecar_status(kube, pod, port, token)}")
    except KubeError as e:
        raise Failed(str(e)) from e


def _sidecar_status(kube: Kube, pod: str, port: int, token: str | None) -> str:
    if token is None:
        return "token Secret unreadable; sessions unknown"
    try:
        code, body = _control(kube, pod, port, token, "GET", "/v1/status")
    except KubeError as e:
        return f"unreachable ({e})"
    if code != 200:
        return f"status not available ({code} {body.decode(errors='replace').strip()})"
    status = json.loads(body)
    sessions = status.get("sessions") or []
    lines = [f"sidecar {status.get('version')}, {len(sessions)} open session(s)"]
    if "env" in status:
        lines.append(f"    the app's environment: {describe_env(status['env'])}")
    for s in sessions:
        counts = f"{s.get('stolen', 0)} stolen, {s.get('mirrored', 0)} mirrored"
        if s.get("match_timeouts"):
            counts += f", {s['match_timeouts']} filter timeouts"
        who = s.get("client") or "?"
        outgoing = s.get("outgoing")
        if s.get("incoming", True):
            lines.append(f"    {s['id']} {s['mode']} by {who}: {s['filter']} ({counts})")
        if outgoing:
            lines.append(
                f"    {s['id']} outgoing ({'+'.join(outgoing.get('granted', []))}) by {who}: "
                f"{outgoing.get('connections', 0)} connection(s) from the pod"
            )
    return "\n".join(lines)


def _control(
    kube: Kube, pod: str, port: int, token: str, method: str, path: str, by: str = ""
) -> tuple[int, bytes]:
    """One request to a pod's sidecar control server, through port-forward."""
    sock = kube.port_forward(pod, port)
    conn = http.client.HTTPConnection(pod, timeout=10)
    sock.settimeout(10)
    conn.sock = sock
    headers = {"Authorization": f"Bearer {token}", "Content-Length": "0"}
    if by:
        headers["X-Offramp-By"] = by
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        raise KubeError(f"pod {pod}'s sidecar did not answer {path}: {e}") from e
    finally:
        conn.close()


def run_sessions(target: Target, report: Report, end: list[str], by: str) -> None:
    """`offramp sessions KIND/NAME`: every open session on every ready replica; with
    `end`, end those named (POD/ID as listed, or everything of one WHO)."""
    try:
        kube = Kube(target.context, target.namespace)
        workload = resolve(kube, target)
        template = workload if target.resource == "pods" else workload["spec"]["template"]
        labels = selector(workload) if target.resource != "pods" else None
        pods, _ = kube.list("pods", labels)
        if target.resource == "pods":
            pods = [p for p in pods if p["metadata"]["name"] == target.name]
        name = token_secret(template) or "offramp-token"
        try:
            token = base64.b64decode(kube.get("secrets", name)["data"]["token"]).decode()
        except (KeyError, ValueError) as e:
            raise Failed(f"the token Secret {name} is not usable: {e}") from e
        listed: list[tuple[str, int, dict[str, Any]]] = []
        for pod, port in sorted(session_pods(pods).items()):
            status, body = _control(kube, pod, port, token, "GET", "/v1/status")
            if status != 200:
                report(f"{pod}: status not available ({status})")
                continue
            listed += [(pod, port, s) for s in json.loads(body).get("sessions") or []]
        who = f"{kube.whoami()} ({by})" if by else kube.whoami()
        if end:
            chosen = [
                x for x in listed if f"{x[0]}/{x[2]['id']}" in end or x[2].get("client") in end
            ]
            missing = [e for e in end if not any(e in (f"{p}/{s['id']}", s.get("client"))
                                                 for p, _, s in chosen)]  # fmt: skip
            if missing:
                raise Failed(
                    f"no open session {', '.join(map(repr, missing))}; open: "
                    + (", ".join(f"{p}/{s['id']}" for p, _, s in listed) or "none")
                )
            for pod, port, s in chosen:
                status, body = _control(kube, pod, port, token, "POST",
                                        f"/v1/sessions/{s['id']}/end", who)  # fmt: skip
                if status == 404:
                    # Its offramp ended it a moment ago (ending one of a steal's
                    # sessions ends them all).
                    report(f"offramp: {pod}/{s['id']} of {s.get('client') or '?'} had closed")
                    continue
                if status != 200:
                    raise Failed(f"{pod}/{s['id']}: {body.decode(errors='replace').strip()}")
                report(f"offramp: ended {pod}/{s['id']} of {s.get('client') or '?'}; "
                       f"they are told it was {who}")  # fmt: skip
            return
        if not listed:
            report(f"no open session on {len(session_pods(pods))} ready pod(s)")
        now = time.time()
        for pod, _, s in listed:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(s.get("opened_at", now)))
            minutes = int(now - s.get("opened_at", now)) // 60
            what = (
                "outgoing only"
                if not s.get("incoming", True)
                else (f"{s['mode']} {s['filter'] or 'every request'} on {s.get('ports')}")
            )
            report(
                f"{pod}/{s['id']}  {s.get('client') or '?'}  since {since} ({minutes} min)  "
                f"{what}  {s.get('stolen', 0)} stolen, {s.get('mirrored', 0)} mirrored"
            )
    except KubeError as e:
        raise Failed(str(e)) from e


def run_uninject(target: Target, report: Report) -> None:
    if target.resource == "pods":
        raise Failed("a pod's containers cannot be changed; uninject its deployment or statefulset")
    try:
        kube = Kube(target.context, target.namespace)
        workload = resolve(kube, target)
        ops = uninjection_patch(workload)
        where = describe(target.resource, target.name)
        if not ops:
            report(f"offramp: {where} has no offramp sidecar; nothing to do")
            return
        secret = token_secret(workload["spec"]["template"])
        kube.patch(target.resource, target.name, ops)
        report(f"offramp: removed the sidecar from {where}; its pods roll out without it")
        if secret:
            report(
                f"offramp: the token Secret {secret} stays (the offramp-user role may not delete "
                f"Secrets); remove it with: kubectl -n {kube.namespace} delete secret {secret}"
            )
    except KubeError as e:
        raise Failed(str(e)) from e
