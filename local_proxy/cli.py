"""`offramp`: the developer's command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from local_proxy.config import (
    ConfigError,
    FilterFlags,
    Incoming,
    LocalSettings,
    build_spec,
    load_incoming,
)
from local_proxy.session import LocalSession, SessionError
from sidecar import __version__
from sidecar.settings import TokenError, describe_validation_error, loose_token_file, read_token

if TYPE_CHECKING:
    from local_proxy.cluster.target import StealTarget
    from local_proxy.cluster.workload import Target

__all__ = ["main", "parser"]

IMAGE_ENV = "OFFRAMP_SIDECAR_IMAGE"
"""No public registry hosts the sidecar image: each team builds and pushes it, then
names it once (this variable, or `offramp set-image`, which writes user_config())."""
LISTEN_WAIT = 60.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offramp",
        description="Take matching HTTP requests off a pod's traffic and answer them locally.",
    )
    p.add_argument("--version", action="version", version=f"offramp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    steal = sub.add_parser(
        "steal",
        help="steal (or mirror) matching requests to a local port",
        description=(
            "Open a session on a sidecar: requests matching the filter are answered by "
            "the process on 127.0.0.1:<--to>; the rest by the real app. With several "
            "filter flags, a request must match all of them. Without any, every request "
            "is taken (Kubernetes probes never are, unless --take-probes)."
        ),
    )
    steal.add_argument(
        "target",
        nargs="?",
        metavar="KIND/NAME",
        help="the workload in the cluster: deploy/NAME, sts/NAME or pod/NAME (kubeconfig as "
        "kubectl uses it). The sidecar is injected if needed; every ready pod joins the session",
    )
    steal.add_argument(
        "--sidecar-url",
        help="instead of KIND/NAME: one sidecar's session server, e.g. ws://127.0.0.1:15081 "
        "(needs --token-file)",
    )
    steal.add_argument("--token-file", type=Path, help="with --sidecar-url: the sidecar's token")
    _kube_flags(steal)
    steal.add_argument(
        "--no-iptables",
        action="store_true",
        help="privilege-free mode: no NET_ADMIN; the Service's named targetPort is handed to "
        "the sidecar (chosen by itself where the namespace's PodSecurity forbids NET_ADMIN)",
    )
    steal.add_argument(
        "--image",
        help=f"the sidecar image to inject (default: ${IMAGE_ENV}, else the one set with "
        "'offramp set-image', else the image the workload already has)",
    )
    steal.add_argument("--container", help="the app container (default: the first)")
    steal.add_argument(
        "--sidecar-workers",
        type=int,
        default=1,
        metavar="N",
        help="proxy processes in each injected sidecar, sharing its port; about one per "
        "core the pod gives it (default %(default)s)",
    )
    steal.add_argument(
        "--rollout-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the injected pods to be ready (default %(default)s)",
    )
    steal.add_argument(
        "--to", type=int, required=True, metavar="PORT", help="local port to send requests to"
    )
    steal.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="REGEX",
        help="steal requests with a header matching REGEX, searched in 'Name: value', "
        "case-insensitively, e.g. '^x-preview: alice$' (repeatable)",
    )
    steal.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="REGEX",
        help="steal requests whose path (with or without query) matches REGEX (repeatable)",
    )
    steal.add_argument(
        "--method", action="append", default=[], help="steal requests with this method (repeatable)"
    )
    steal.add_argument(
        "--port",
        action="append",
        type=int,
        default=[],
        help="app port(s) to take requests from (default: every port the sidecar fronts)",
    )
    steal.add_argument(
        "--mirror",
        action="store_true",
        help="mirror instead of steal: the app answers, the local process gets a copy",
    )
    steal.add_argument(
        "--take-probes",
        action="store_true",
        help="also take Kubernetes probes (off: a breakpoint must not restart the pod)",
    )
    steal.add_argument(
        "-f",
        "--config-file",
        type=Path,
        help="mirrord-style JSON config; feature.network.incoming is used; flags override it",
    )
    steal.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds the local process may take to answer before the caller gets 504; "
        "0 waits forever (default %(default)s)",
    )
    steal.add_argument(
        "--mirror-queue",
        type=int,
        default=64,
        help="mirror copies handled at once; more are dropped and counted (default %(default)s)",
    )

    status = sub.add_parser(
        "status",
        help="is the sidecar injected, which version, which sessions are open",
        description="Shows whether KIND/NAME has the sidecar, and asks each ready pod's "
        "sidecar (through port-forward) for its version and open sessions.",
    )
    status.add_argument("target", metavar="KIND/NAME")
    _kube_flags(status)
    uninject = sub.add_parser(
        "uninject",
        help="remove the sidecar from a workload, restoring its pod template exactly",
        description="Applies the undo patch recorded at injection: the pod template is "
        "restored as it was, and the pods roll out without the sidecar. The token Secret stays.",
    )
    uninject.add_argument("target", metavar="KIND/NAME")
    _kube_flags(uninject)

    set_image = sub.add_parser(
        "set-image",
        help="remember the sidecar image to inject (where you pushed it)",
        description="Writes the image to offramp's user config "
        "($XDG_CONFIG_HOME/offramp/config.json, default ~/.config/offramp/config.json), "
        f"used when neither --image nor ${IMAGE_ENV} is given.",
    )
    set_image.add_argument("image", metavar="IMAGE", help="e.g. registry.corp/team/offramp:0.1.0")

    demo = sub.add_parser(
        "demo",
        help="run the whole path on this machine and show what was stolen and why",
        description=(
            "Starts a demo app, a real sidecar in front of it, a local handler and a session "
            "that steals requests carrying 'x-preview: alice'; sends sample requests and "
            "prints who answered each one and why."
        ),
    )
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def _kube_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the context's, as kubectl)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `offramp steal ... -- CMD ARGS`: the local process to run for the session.
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = parser().parse_args(argv)
    if args.command == "demo":
        from local_proxy.demo import run_demo

        return asyncio.run(run_demo(quiet=args.quiet))
    if command and args.command != "steal":
        return _fail("only 'offramp steal' takes a command after --")
    if args.command in ("status", "uninject"):
        return _target_command(args)
    if args.command == "set-image":
        return _set_image(args.image)
    return _steal(args, command)


def _target(args: argparse.Namespace) -> Target:
    from local_proxy.cluster.workload import Target, TargetError, parse_target

    try:
        resource, name = parse_target(args.target)
    except TargetError as e:
        raise ConfigError(str(e)) from e
    return Target(resource, name, args.context, args.namespace)


def _target_command(args: argparse.Namespace) -> int:
    from local_proxy.cluster.target import Failed, run_status, run_uninject

    try:
        target = _target(args)
        (run_status if args.command == "status" else run_uninject)(target, print)
    except ConfigError as e:
        return _fail(str(e))
    except Failed as e:
        return _fail(str(e), 1)
    return 0


def user_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "offramp" / "config.json"


def _configured_image() -> str | None:
    if image := os.environ.get(IMAGE_ENV):
        return image
    path = user_config()
    try:
        image = json.loads(path.read_text()).get("sidecar_image")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e}); fix or delete it") from e
    return str(image) if image else None


def _set_image(image: str) -> int:
    if not image.strip() or any(c.isspace() for c in image):
        return _fail(f"{image!r} is not an image reference (e.g. registry.corp/team/offramp:0.1.0)")
    path = user_config()
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
        config["sidecar_image"] = image
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
    except (OSError, ValueError, TypeError) as e:
        return _fail(f"{path}: cannot write it ({e})", 1)
    _say(f"offramp: the sidecar image is now {image} ({path})")
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"offramp: {message}", file=sys.stderr)
    return code


def _steal(args: argparse.Namespace, command: list[str]) -> int:
    if (args.target is None) == (args.sidecar_url is None):
        return _fail("give either KIND/NAME (a workload in the cluster) or --sidecar-url")
    if args.sidecar_url and args.token_file is None:
        return _fail("--sidecar-url needs --token-file (the file with the sidecar's token)")
    if not 1 <= args.sidecar_workers <= 64:
        return _fail(f"--sidecar-workers {args.sidecar_workers}: give 1 to 64 (about one per core)")
    try:
        target = _target(args) if args.target else None
        image = args.image or (_configured_image() if target else None)
        incoming = load_incoming(args.config_file) if args.config_file else Incoming()
        for note in incoming.notes:
            print(f"offramp: {note}", file=sys.stderr)
        for key in incoming.ignored:
            print(
                f"offramp: {args.config_file}: ignoring {key} (offramp does not use it)",
                file=sys.stderr,
            )
        flags = FilterFlags(
            headers=tuple(args.header),
            paths=tuple(args.path),
            methods=tuple(args.method),
            ports=tuple(args.port),
            mirror=args.mirror,
            take_probes=args.take_probes,
        )
        spec = build_spec(incoming, flags, f"{getpass.getuser()}@{socket.gethostname()}")
        settings = LocalSettings(
            sidecar_url=args.sidecar_url or "ws://pending",
            token=read_token(args.token_file) if args.token_file else "",
            to_port=args.to,
            spec=spec,
            timeout=args.timeout,
            mirror_queue=args.mirror_queue,
        )
    except (ConfigError, TokenError) as e:
        return _fail(str(e))
    except ValidationError as e:
        return _fail(describe_validation_error(e, "option"))
    if args.token_file and (warning := loose_token_file(args.token_file)):
        print(f"offramp: warning: {warning}", file=sys.stderr)
    if target is not None:
        from local_proxy.cluster.target import StealTarget

        steal = StealTarget(
            target, settings, image=image, no_iptables=args.no_iptables,
            container=args.container, rollout_timeout=args.rollout_timeout, report=_say,
            sidecar_workers=args.sidecar_workers,
        )  # fmt: skip
        return asyncio.run(_run_target(steal, command, args.to))
    if command:
        return _fail("a command after -- needs KIND/NAME")
    return asyncio.run(_run(settings))


def _say(line: str) -> None:
    print(line, flush=True)


async def _run_target(steal: StealTarget, command: list[str], port: int) -> int:
    from local_proxy.cluster.target import Failed

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, steal.stop)
    child = None
    if command:
        try:
            child = await asyncio.create_subprocess_exec(*command)
        except OSError as e:
            return _fail(f"cannot start {command[0]!r}: {e}")
        if not await _listening(child, port):
            code = child.returncode
            if code is None:
                child.terminate()
                await child.wait()
                return _fail(f"{command[0]} did not listen on 127.0.0.1:{port} within "
                             f"{LISTEN_WAIT:.0f} s", 1)  # fmt: skip
            return _fail(f"{command[0]} exited with {code} before listening on port {port}", 1)
        _say(f"offramp: {command[0]} listens on 127.0.0.1:{port}")
        watcher = asyncio.create_task(child.wait())
        watcher.add_done_callback(lambda _: steal.stop())
    try:
        await steal.run()
    except Failed as e:
        return _fail(str(e), 1)
    finally:
        if child is not None and child.returncode is None:
            child.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 10)
            if child.returncode is None:
                child.kill()
                await child.wait()
    stolen, mirrored, timeouts = steal.counters()
    _say(
        f"offramp: session ended: {stolen} stolen, {mirrored} mirrored"
        + (f", {timeouts} went to the app as the filter timed out" if timeouts else "")
    )
    if child is not None and child.returncode is not None:
        _say(f"offramp: {command[0]} exited with {child.returncode}")
        return child.returncode if child.returncode >= 0 else 128 - child.returncode
    return 0


async def _listening(child: asyncio.subprocess.Process, port: int) -> bool:
    deadline = asyncio.get_running_loop().time() + LISTEN_WAIT
    while child.returncode is None and asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return True
    return False


async def _run(settings: LocalSettings) -> int:
    session = LocalSession(settings, report=lambda line: print(line, flush=True))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, session.stop)
    try:
        await session.run()
    except SessionError as e:
        return _fail(str(e), 1)
    c = session.forwarder.counters
    dropped = c.mirror_dropped_here + c.mirror_dropped_sidecar
    print(
        f"offramp: session ended: {c.stolen} stolen, {c.mirrored} mirrored"
        + (f", {dropped} mirror copies dropped" if dropped else "")
        + (
            f", {c.match_timeouts} went to the app as the filter timed out"
            if c.match_timeouts
            else ""
        ),
        flush=True,
    )
    return 0
