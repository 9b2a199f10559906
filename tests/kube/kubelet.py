"""The kubelet: each pod a network namespace on a bridge, each container a process in it.

- Pod network: a bridge in the test's own namespace (the "node") at
  10.214.N.1/24; each pod gets a veth `eth0` with the next address, which
  becomes `status.podIP`. Only these addresses are used.
- Containers: the image is looked up in the registry the test gives (an image
  is an entrypoint argv, a user, an environment, and binaries that carry file
  capabilities); `command` replaces the entrypoint and `args` are appended, as
  a container runtime does. Env: HOSTNAME=<pod name>, the image's, then what
  `tests.kube.envvars` makes of `envFrom` and `env` (ConfigMaps, Secrets,
  resourceFieldRefs, `$(VAR)` expansion, and the fieldRefs metadata.name,
  metadata.namespace, status.podIP, metadata.annotations['KEY'] and
  metadata.labels['KEY']); no service link variables.
  Volumes: secret (optional or not; files 0644, rewritten when the Secret
  changes) and emptyDir (0777), bind-mounted at their mount paths in a mount
  namespace of the container's own. A container that exits is restarted after
  a second.
- Users and capabilities, as containerd applies them: the process runs as
  `runAsUser` (else the image's user) and `runAsGroup` (else the same number);
  `runAsNonRoot` with uid 0 is refused (CreateContainerConfigError). Its
  bounding set is containerd's default set, less `capabilities.drop`, plus
  `capabilities.add` (all with `privileged`); no capability is ambient or
  inheritable, so a non-root process holds none unless an executable's file
  capabilities grant it, and only those within the bounding set (the kernel
  refuses to run one that asks for more). `allowPrivilegeEscalation: false`
  sets no_new_privs, which voids file capabilities. An image's binaries with
  file capabilities are copies of this machine's that carry them, bind-mounted
  over the originals at the paths the image has them (so no other copy of the
  binary is found first or after: a shell or Python that gets EPERM from one
  PATH entry goes on to the next).
- Probes: readiness probes (httpGet with User-Agent kube-probe/1.30, or
  tcpSocket) run from the node against the pod IP every 0.25 s whatever
  periodSeconds says; three failures in a row make a container unready.
  Liveness and startup probes are not run.
- Port-forward dials 127.0.0.1:<port> inside the pod's network namespace, as
  the kubelet's streaming server does.
- Deleting a pod: it turns unready, its processes get SIGTERM, then SIGKILL
  after 10 s (not terminationGracePeriodSeconds), and the object goes.
- Not emulated: a read-only root filesystem (the container sees this
  machine's), resource limits, seccomp, image pulls, init containers, exec
  probes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kube.envvars import ContainerConfigError, container_env
from tests.kube.store import Obj, Store, now

REPO = Path(__file__).resolve().parents[2]
PROBE_PERIOD = 0.25
STOP_GRACE = 10.0
RESTART_DELAY = 1.0
KUBELET_NOTE = "--- kubelet: "
"""Lines of a container's log file that the kubelet wrote, not the container."""


DEFAULT_CAPABILITIES = frozenset(
    {
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
    }
)  # fmt: skip
"""What containerd gives a container that asks for nothing."""


@dataclass(frozen=True)
class Image:
    entrypoint: tuple[str, ...]
    workdir: str = str(REPO)
    user: int = 0
    env: tuple[tuple[str, str], ...] = ()
    file_caps: tuple[tuple[str, str], ...] = ()
    """(path, capabilities as setcap writes them): the image's binary at that path
    carries them (a copy of this machine's, mounted over it)."""


@dataclass
class Container:
    name: str
    spec: Obj
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    failures: int = 0
    waiting: tuple[str, str] | None = None
    """(reason, message) when it cannot start."""
    last_exit: int | None = None
    """The exit code of its last run, once it has exited."""


@dataclass
class PodRuntime:
    namespace: str
    name: str
    uid: str
    netns: str
    ip: str
    veth: str
    root: Path
    containers: list[Container] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False
    secret_versions: dict[str, str] = field(default_factory=dict)


def _sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class Kubelet:
    def __init__(self, store: Store, images: dict[str, Image], state: Path, tag: str, net: int):
        self.store = store
        self.images = images
        self.state = state
        self.tag = tag
        self.net = net
        self.bridge = f"ofrkbr{tag}"
        self.node_ip = f"10.214.{net}.1"
        self.pods: dict[str, PodRuntime] = {}
        self.errors: list[str] = []
        """Failures of the kubelet itself (not of containers): a test bed defect."""
        self._next = 2

    # --- the node ------------------------------------------------------------------------

    def setup(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.node_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")

    def teardown(self) -> None:
        for pod in list(self.pods.values()):
            self._kill_netns(pod)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def _kill_netns(self, pod: PodRuntime) -> None:
        pids = subprocess.run(
            ["ip", "netns", "pids", pod.netns], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", pod.veth], capture_output=True)

    # --- the sync loop -------------------------------------------------------------------

    async def sync(self) -> None:
        pods = {p["metadata"]["uid"]: p for p in self.store.list("pods", "")}
        for uid, pod in pods.items():
            runtime = self.pods.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                if runtime is None:
                    self.store.remove("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
                elif not runtime.stopping:
                    runtime.stopping = True
                    self._spawn(runtime, self._stop(runtime))
                continue
            if runtime is None:
                runtime = await self._start(pod)
            self._sync_secrets(runtime, pod)
            self._write_status(runtime, pod)

    async def _start(self, pod: Obj) -> PodRuntime:
        n = self._next
        self._next += 1
        meta = pod["metadata"]
        runtime = PodRuntime(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            netns=f"ofrk-{self.tag}-{n}",
            ip=f"10.214.{self.net}.{n}",
            veth=f"ofk{self.tag}{n}",
            root=self.state / "pods" / f"{meta['name']}-{meta['uid'][:8]}",
        )
        self.pods[meta["uid"]] = runtime
        runtime.root.mkdir(parents=True)
        await asyncio.to_thread(self._make_netns, runtime)
        for vol in pod["spec"].get("volumes") or []:
            path = runtime.root / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                path.chmod(0o777)
        self._sync_secrets(runtime, pod)
        for spec in pod["spec"]["containers"]:
            container = Container(spec["name"], spec)
            runtime.containers.append(container)
            self._spawn(runtime, self._run(runtime, pod, container))
        self._spawn(runtime, self._probe(runtime))
        return runtime

    def _spawn(self, runtime: PodRuntime, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        runtime.tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.errors.append(f"pod {runtime.name}: {t.exception()!r}")

        task.add_done_callback(done)

    def _make_netns(self, pod: PodRuntime) -> None:
        _sh("ip", "netns", "add", pod.netns)
        _sh(
            "ip",
            "link",
            "add",
            pod.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.netns,
        )
        _sh("ip", "link", "set", pod.veth, "master", self.bridge, "up")
        ns = ("ip", "netns", "exec", pod.netns)
        _sh(*ns, "ip", "link", "set", "lo", "up")
        _sh(*ns, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        _sh(*ns, "ip", "link", "set", "eth0", "up")

    def _sync_secrets(self, runtime: PodRuntime, pod: Obj) -> None:
        for vol in pod["spec"].get("volumes") or []:
            if "secret" not in vol:
                continue
            name = vol["secret"]["secretName"]
            secret = self.store.find("secrets", runtime.namespace, name)
            version = secret["metadata"]["resourceVersion"] if secret else ""
            if runtime.secret_versions.get(vol["name"]) == version:
                continue
            runtime.secret_versions[vol["name"]] = version
            target = runtime.root / "volumes" / vol["name"]
            for old in target.iterdir():
                old.unlink()
            for key, value in ((secret or {}).get("data") or {}).items():
                tmp = target / f".{key}.tmp"
                tmp.write_bytes(base64.b64decode(value))
                tmp.chmod(0o644)  # a secret volume's defaultMode
                tmp.rename(target / key)

    # --- containers ----------------------------------------------------------------------

    def _argv_env(
        self, runtime: PodRuntime, pod: Obj, spec: Obj
    ) -> tuple[list[str], dict[str, str]]:
        image = self.images.get(spec["image"])
        if image is None:
            raise LookupError(
                f'image "{spec["image"]}" is not known to this emulator (registered: '
                f"{', '.join(sorted(self.images))})"
            )
        argv = list(spec.get("command") or image.entrypoint) + list(spec.get("args") or [])
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOSTNAME": runtime.name,
            "PYTHONUNBUFFERED": "1",
            **dict(image.env),
        }
        fields = {
            "metadata.name": runtime.name,
            "metadata.namespace": runtime.namespace,
            "status.podIP": runtime.ip,
        }
        # As kubelet: metadata.annotations['KEY'] / labels['KEY'] give the value, or ""
        # when the pod has no such key.
        for kind in ("annotations", "labels"):
            for key, value in (pod["metadata"].get(kind) or {}).items():
                fields[f"metadata.{kind}['{key}']"] = value

        def lookup(plural: str, name: str) -> Obj | None:
            return self.store.find(plural, runtime.namespace, name)

        env.update(container_env(pod, spec, lookup, fields))
        return argv, env

    async def _run(self, runtime: PodRuntime, pod: Obj, container: Container) -> None:
        spec = container.spec
        try:
            argv, env = self._argv_env(runtime, pod, spec)
            image = self.images[spec["image"]]
            identity = _identity(pod, spec, image)
        except ContainerConfigError as e:
            container.waiting = ("CreateContainerConfigError", str(e))
            return
        except LookupError as e:
            container.waiting = (
                "ErrImagePull" if "image" in str(e) else "CreateContainerConfigError",
                str(e),
            )
            return
        mounts = [
            {
                "source": str(runtime.root / "volumes" / m["name"]),
                "target": m["mountPath"],
                "readOnly": bool(m.get("readOnly")),
            }
            for m in spec.get("volumeMounts") or []
        ]
        if image.file_caps:
            files = await asyncio.to_thread(self._image_files, spec["image"], image)
            mounts += [{"source": str(src), "target": dst, "readOnly": True} for dst, src in files]
        keep = sorted({str(REPO), sys.base_prefix, sys.prefix})
        config = {
            "argv": argv,
            "env": env,
            "mounts": mounts,
            "keep": keep,
            "cwd": spec.get("workingDir") or image.workdir,
            **identity,
        }
        log = runtime.root / f"{container.name}.log"
        while not runtime.stopping:
            with log.open("ab") as out:
                container.process = await asyncio.create_subprocess_exec(
                    "ip",
                    "netns",
                    "exec",
                    runtime.netns,
                    sys.executable,
                    "-m",
                    "tests.kube.container",
                    json.dumps(config),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=str(REPO),
                    start_new_session=True,
                )
            code = await container.process.wait()
            container.ready = False
            if runtime.stopping:
                return
            container.last_exit = code
            with log.open("ab") as out:
                out.write(f"{KUBELET_NOTE}exited with {code}; restarting\n".encode())
            # Shown as CrashLoopBackOff while it waits (a kubelet's back-off grows
            # from 10 s; this one stays at RESTART_DELAY).
            await asyncio.sleep(RESTART_DELAY)
            container.restarts += 1

    def _image_files(self, name: str, image: Image) -> list[tuple[str, Path]]:
        """(path in the image, a copy that carries its file capabilities), made once."""
        out = self.state / "images" / name.replace("/", "_").replace(":", "_")
        files = [(path, out / path.strip("/").replace("/", "_")) for path, _ in image.file_caps]
        if out.exists():
            return files
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        for (path, caps), (_, copy) in zip(image.file_caps, files, strict=True):
            if not Path(path).is_file():
                raise RuntimeError(f"image {name}: this machine has no {path} to copy")
            shutil.copy2(path, tmp / copy.name)
            _sh("setcap", caps, str(tmp / copy.name))
        tmp.rename(out)
        return files

    async def _probe(self, runtime: PodRuntime) -> None:
        while not runtime.stopping:
            for c in runtime.containers:
                running = c.process is not None and c.process.returncode is None
                probe = c.spec.get("readinessProbe")
                if not running:
                    c.ready = False
                elif probe is None:
                    c.ready = True
                elif await self._check(runtime, c.spec, probe):
                    c.ready, c.failures = True, 0
                else:
                    c.failures += 1
                    if c.failures >= 3 or not c.ready:
                        c.ready = False
            await asyncio.sleep(PROBE_PERIOD)

    async def _check(self, runtime: PodRuntime, spec: Obj, probe: Obj) -> bool:
        action = probe.get("httpGet") or probe.get("tcpSocket")
        if action is None:
            return False  # exec probes are not emulated
        port = action["port"]
        if isinstance(port, str):
            named = [p["containerPort"] for p in spec.get("ports") or [] if p.get("name") == port]
            if not named:
                return False
            port = named[0]
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(runtime.ip, port), 1)
        except (OSError, TimeoutError):
            return False
        try:
            if "httpGet" not in probe:
                return True
            path = action.get("path", "/")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {runtime.ip}:{port}\r\n"
                "User-Agent: kube-probe/1.30\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 1)
            parts = line.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    # --- status and stop -----------------------------------------------------------------

    def _write_status(self, runtime: PodRuntime, pod: Obj) -> None:
        statuses = []
        for c in runtime.containers:
            running = c.process is not None and c.process.returncode is None
            state: Obj
            if c.waiting:
                state = {"waiting": {"reason": c.waiting[0], "message": c.waiting[1]}}
            elif running:
                state = {"running": {}}
            elif c.last_exit is not None:
                state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {RESTART_DELAY:.0f}s restarting failed "
                        f"container={c.name} pod={runtime.name}",
                    }
                }
            else:
                state = {"waiting": {"reason": "ContainerCreating"}}
            entry: Obj = {
                "name": c.name,
                "image": c.spec["image"],
                "imageID": "",
                "ready": c.ready,
                "restartCount": c.restarts,
                "started": running,
                "state": state,
            }
            if c.last_exit is not None:
                entry["lastState"] = {
                    "terminated": {
                        "exitCode": c.last_exit,
                        "reason": "Completed" if c.last_exit == 0 else "Error",
                    }
                }
            statuses.append(entry)
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        any_running = any(s["started"] for s in statuses)
        old = pod.get("status") or {}
        conditions = []
        for kind, ok in (
            ("PodScheduled", True),
            ("Initialized", True),
            ("ContainersReady", all_ready),
            ("Ready", all_ready),
        ):
            previous = next((c for c in old.get("conditions") or [] if c["type"] == kind), None)
            value = "True" if ok else "False"
            since = (
                previous["lastTransitionTime"]
                if previous and previous["status"] == value
                else now()
            )
            conditions.append({"type": kind, "status": value, "lastTransitionTime": since})
        status = {
            "phase": "Running" if any_running else "Pending",
            "conditions": conditions,
            "hostIP": self.node_ip,
            "podIP": runtime.ip,
            "podIPs": [{"ip": runtime.ip}],
            "startTime": old.get("startTime") or now(),
            "containerStatuses": statuses,
        }
        if status != old:
            pod["status"] = status
            self.store.replace("pods", runtime.namespace, runtime.name, pod)

    async def _stop(self, runtime: PodRuntime) -> None:
        pod = self.store.find("pods", runtime.namespace, runtime.name)
        for c in runtime.containers:
            c.ready = False
        if pod is not None:
            self._write_status(runtime, pod)
        procs = [
            c.process for c in runtime.containers if c.process and c.process.returncode is None
        ]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE)
        await asyncio.to_thread(self._kill_netns, runtime)
        del self.pods[runtime.uid]
        self.store.remove("pods", runtime.namespace, runtime.name)

    # --- port-forward --------------------------------------------------------------------

    def dial(self, namespace: str, name: str, port: int) -> socket.socket:
        """A socket connected to 127.0.0.1:port inside the pod (blocking)."""
        runtime = next(
            (r for r in self.pods.values() if (r.namespace, r.name) == (namespace, name)), None
        )
        if runtime is None or runtime.stopping:
            raise ConnectionRefusedError(f"pod {name} has no running sandbox")
        result: list[socket.socket | BaseException] = []

        def joined() -> None:
            # A thread of its own: setns moves only this thread, which then ends.
            try:
                fd = os.open(f"/run/netns/{runtime.netns}", os.O_RDONLY)
                try:
                    os.setns(fd, os.CLONE_NEWNET)
                finally:
                    os.close(fd)
                result.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except BaseException as e:
                result.append(e)

        thread = threading.Thread(target=joined, daemon=True)
        thread.start()
        thread.join()
        got = result[0]
        if isinstance(got, BaseException):
            raise got
        got.settimeout(None)
        return got

    def container_log(self, namespace: str, name: str, container: str) -> str:
        """What `kubectl logs` shows of one container (every run of it: the emulator
        keeps one file, so `previous` is not told apart)."""
        runtime = next(
            (r for r in self.pods.values() if (r.namespace, r.name) == (namespace, name)), None
        )
        if runtime is None or not any(c.name == container for c in runtime.containers):
            raise LookupError(f"container {container} is not valid for pod {name}")
        path = runtime.root / f"{container}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "".join(
            line for line in text.splitlines(keepends=True) if not line.startswith(KUBELET_NOTE)
        )

    def logs(self) -> dict[str, str]:
        out = {}
        for path in sorted((self.state / "pods").glob("*/*.log")):
            out[f"{path.parent.name}/{path.stem}"] = path.read_text(errors="replace")
        return out


def _identity(pod: Obj, spec: Obj, image: Image) -> dict[str, Any]:
    """Who the container's process is: uid, gid, bounding set, no_new_privs."""
    pod_security = pod["spec"].get("securityContext") or {}
    security = spec.get("securityContext") or {}

    def field(name: str) -> Any:
        return security.get(name, pod_security.get(name))

    uid = field("runAsUser")
    uid = image.user if uid is None else int(uid)
    gid = field("runAsGroup")
    if field("runAsNonRoot") and uid == 0:
        raise ContainerConfigError(
            "container has runAsNonRoot and image will run as root "
            f"(pod: {pod['metadata']['name']!r}, container: {spec['name']})"
        )
    caps = set(DEFAULT_CAPABILITIES)
    declared = security.get("capabilities") or {}
    drop = {c.upper() for c in declared.get("drop") or []}
    caps = set() if "ALL" in drop else caps - drop
    caps |= {c.upper() for c in declared.get("add") or []}
    if security.get("privileged"):
        caps = {"ALL"}
    return {
        "uid": uid,
        "gid": uid if gid is None else int(gid),
        "capabilities": sorted(caps),
        "no_new_privs": security.get("allowPrivilegeEscalation") is False,
    }


def require_tools() -> list[str]:
    return [t for t in ("ip", "iptables-nft", "ss", "setcap", "setpriv") if shutil.which(t) is None]
