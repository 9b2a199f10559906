"""`offramp-sidecar`: the command the sidecar container runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import __version__
from sidecar.appenv import PREFIX as APP_ENV_PREFIX
from sidecar.basics import (
    ENGINE_LINGER,
    HANDOVER_ENV,
    HEADER_TIMEOUT,
    HEALTH_PORT,
    IDLE_TIMEOUT,
    IDLE_TIMEOUT_ENV,
    Capture,
    Engine,
    TokenError,
    loose_token_file,
    read_token,
)
from sidecar.capture import CaptureError
from sidecar.outgoing.policy import ALLOW_ENV as OUTGOING_ALLOW_ENV
from sidecar.outgoing.rules import RuleError, parse_rules
from sidecar.primary import PrimaryConfig, engine_command
from sidecar.primary import run as run_primary
from sidecar.sessions.preview import DEFAULT_PREFIX, PreviewKeyError, check_prefix
from sidecar.sessions.preview import PREFIX_ENV as PREVIEW_PREFIX_ENV

if TYPE_CHECKING:
    from sidecar.proxy.master import Handover
    from sidecar.settings import SidecarSettings

__all__ = ["main", "parser", "webhook_parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offramp-sidecar",
        description=(
            "Proxy in front of an app port: requests that match an open session's filter "
            "go through that session's tunnel to a developer's machine; everything else "
            "goes to the app. `offramp-sidecar webhook --help`: the injector webhook."
        ),
        epilog="With --engine on-demand (the default with --capture iptables), while no "
        "session is open the sidecar is one small process that passes the proxy ports' "
        "connections to the app; the proxy engine (mitmproxy and the session server) starts "
        "when a connection reaches the control port.",
    )
    p.add_argument(
        "--app-port",
        action="append",
        required=True,
        metavar="PORT[:LISTEN]",
        help="an app port to front, optionally with the proxy port for it; repeatable. "
        "Without LISTEN, the first --app-port uses --listen-port and later ones a free port",
    )
    p.add_argument(
        "--app-host", default="127.0.0.1", help="the app's address (default %(default)s)"
    )
    p.add_argument(
        "--listen-port",
        type=_port,
        default=15080,
        help="the proxy's port for the first --app-port (default %(default)s)",
    )
    p.add_argument("--listen-host", default="0.0.0.0", help="default %(default)s")
    p.add_argument(
        "--control-port",
        type=_port,
        default=15081,
        help="the session server's port: websocket /v1/tunnel, GET /v1/status and the "
        "engine's /healthz; a connection here starts the engine, so probes belong on "
        "--health-port (default %(default)s)",
    )
    p.add_argument("--control-host", default="0.0.0.0", help="default %(default)s")
    p.add_argument(
        "--health-port",
        type=_port,
        default=HEALTH_PORT,
        help="GET /healthz for kubelet's probes, on --control-host; answered without "
        "starting the engine (default %(default)s)",
    )
    p.add_argument(
        "--engine",
        choices=[e.value for e in Engine],
        default=None,
        help="when the proxy engine runs. 'on-demand': from the first connection to the "
        "control port until --engine-linger seconds after the last session; meanwhile "
        "connections to the proxy ports go to the app byte for byte (no X-Forwarded-For, "
        "no request-head timeout). 'always': from start to stop. Default: on-demand with "
        "--capture iptables (no traffic reaches the sidecar without a session), always "
        "with --capture none",
    )
    p.add_argument(
        "--engine-linger",
        type=_seconds,
        default=ENGINE_LINGER,
        metavar="SECONDS",
        help="with --engine on-demand: how long the engine stays after the last session "
        "and control connection end (default %(default)s)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        required=True,
        help="file holding the token every session must present; if it does not exist "
        "yet, the sidecar serves traffic and refuses sessions until it does",
    )
    p.add_argument(
        "--capture",
        choices=[c.value for c in Capture],
        default=Capture.IPTABLES.value,
        help="how the pod's traffic reaches the proxy. 'iptables': while a session covers "
        "an app port, inbound TCP to it is redirected to the proxy (needs NET_ADMIN); "
        "'none': only what is sent to the listen port (default %(default)s)",
    )
    p.add_argument(
        "--iptables",
        default="iptables",
        metavar="BINARY",
        help="iptables binary to use, e.g. iptables-nft or iptables-legacy (default %(default)s)",
    )
    p.add_argument(
        "--keep-existing-connections",
        action="store_true",
        help="when capture starts, leave idle keep-alive connections to the app open "
        "(by default they are closed so their clients reconnect through the proxy)",
    )
    p.add_argument(
        "--probe-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a path kubelet probes; requests to it are never stolen (repeatable)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=10.0,
        help="seconds to let in-flight requests finish on SIGTERM (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="proxy processes that share each listen port (SO_REUSEPORT), so throughput "
        "grows with the pod's cores; give about one per core. They start with the "
        "engine (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=_seconds,
        default=HEADER_TIMEOUT,
        metavar="SECONDS",
        help="seconds a caller may take to send an HTTP/1 request head, from its first "
        "byte; later ones get 408 (0: no limit; default %(default)s)",
    )
    p.add_argument(
        "--app-connect",
        choices=["request", "accept"],
        default="request",
        help="when a caller's connection to the app opens: when a request needs it (or "
        "after 0.2 s of silence, for protocols where the server speaks first), or as soon "
        "as the caller connects (default %(default)s)",
    )
    p.add_argument(
        "--resolv-conf",
        type=Path,
        default=Path("/etc/resolv.conf"),
        help="the pod's resolver configuration, whose nameservers answer sessions' DNS "
        "queries (default %(default)s)",
    )
    p.add_argument(
        "--outgoing-allow",
        default=os.environ.get(OUTGOING_ALLOW_ENV) or None,
        metavar="LIST",
        help="comma-separated destinations sessions may reach from the pod, in mirrord's "
        "outgoing filter syntax (e.g. 'payment-service, 10.96.0.0/12:443'); unset: any "
        f"but the guarded ones (default: ${OUTGOING_ALLOW_ENV}, set by injection from the pod "
        "annotation offramp.dev/outgoing-allow)",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=_idle_timeout,
        default=os.environ.get(IDLE_TIMEOUT_ENV) or IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a session whose client has answered nothing (no message, no ping) "
        f"for this long: its laptop has gone (default: ${IDLE_TIMEOUT_ENV}, set by "
        f"injection from the pod annotation offramp.dev/session-idle-timeout, else "
        f"{IDLE_TIMEOUT:g})",
    )
    p.add_argument(
        "--preview-prefix",
        default=os.environ.get(PREVIEW_PREFIX_ENV) or DEFAULT_PREFIX,
        metavar="PATH",
        help="where the sidecar answers the preview link itself (PATH/preview/KEY?to=/ sets "
        "the preview cookie); 'off': nowhere, the app owns every path (default: "
        f"${PREVIEW_PREFIX_ENV}, set by injection from the pod annotation "
        f"offramp.dev/preview-prefix, else {DEFAULT_PREFIX})",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"offramp-sidecar {__version__}")
    return p


def webhook_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offramp-sidecar webhook",
        description="The mutating admission webhook that injects the offramp sidecar into "
        'pods that opt in (label or annotation offramp.dev/inject: "true", or a namespace '
        "labelled so). Serves HTTPS POST /mutate/pod and /mutate/namespace.",
    )
    p.add_argument("--cert", type=Path, required=True, help="TLS certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="TLS private key (PEM)")
    p.add_argument("--host", default="0.0.0.0", help="default %(default)s")
    p.add_argument("--port", type=int, default=8443, help="default %(default)s")
    p.add_argument("--image", required=True, help="the sidecar image to inject")
    p.add_argument(
        "--capture",
        choices=[c.value for c in Capture],
        default=Capture.IPTABLES.value,
        help="the injected sidecar's capture mode unless a pod says otherwise "
        "(default %(default)s)",
    )
    p.add_argument(
        "--token-secret",
        default="offramp-token",
        help="the Secret (in the pod's namespace) whose key 'token' the sidecar reads "
        "(default %(default)s)",
    )
    p.add_argument(
        "--no-probe-protection",
        action="store_true",
        help="do not pass the app's probe paths to the sidecar (probes may then be stolen)",
    )
    p.add_argument(
        "--no-copy-env",
        action="store_true",
        help="give the sidecar no copy of the app container's env and envFrom (sessions then "
        "get no environment); a pod's offramp.dev/copy-env annotation decides for that pod",
    )
    p.add_argument(
        "--resources",
        type=_resources,
        default=None,
        metavar="JSON",
        help="the injected sidecar's resources, as in a pod spec, e.g. '{\"requests\": "
        '{"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}\' (that is the '
        "default for one worker; the memory limit grows by 96Mi per further worker)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="the injected sidecar's proxy processes (its --workers; default %(default)s)",
    )
    p.add_argument(
        "--namespace",
        required=True,
        help="the webhook's own namespace: its pods are never injected",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _resources(text: str) -> dict[str, dict[str, str]]:
    """`--resources` JSON: {"requests"|"limits": {name: quantity}}; numbers become strings."""
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not set(value) <= {"requests", "limits"}:
            raise ValueError
        return {kind: {str(k): str(v) for k, v in dict(q).items()} for kind, q in value.items()}
    except (ValueError, TypeError, AttributeError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a JSON object with 'requests' and/or 'limits', each mapping "
            'resource names to quantities, e.g. {"requests": {"cpu": "50m"}}'
        ) from None


def webhook_main(argv: Sequence[str]) -> int:
    args = webhook_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from pydantic import ValidationError

    from sidecar.inject.admission import WebhookPolicy
    from sidecar.inject.patch import InjectOptions
    from sidecar.inject.webhook import serve
    from sidecar.settings import describe_validation_error

    try:
        options = InjectOptions(
            image=args.image,
            capture=Capture(args.capture),
            token_secret=args.token_secret,
            protect_probes=not args.no_probe_protection,
            copy_env=not args.no_copy_env,
            workers=args.workers,
            **({"resources": args.resources} if args.resources is not None else {}),
        )
        policy = WebhookPolicy(options=options, own_namespace=args.namespace)
    except ValidationError as e:
        print(f"offramp-sidecar webhook: {describe_validation_error(e, 'option')}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(policy, args.host, args.port, args.cert, args.key))
    except OSError as e:
        print(f"offramp-sidecar webhook: {e}", file=sys.stderr)
        return 1


def _preview_prefix(text: str) -> str | None:
    if text.strip().lower() == "off":
        return None
    try:
        return check_prefix(text.strip())
    except PreviewKeyError as e:
        raise RuleError(f"--preview-prefix: {e}") from None


def _allow_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    entries = tuple(e.strip() for e in text.split(",") if e.strip())
    try:
        parse_rules(entries)
    except RuleError as e:
        raise RuleError(f"--outgoing-allow: {e}") from None
    return entries


def _number(text: str, kind: type[float] | type[int], low: float, high: float, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: write {what} from {low:g} to {high:g}")
    return value


def _port(text: str) -> int:
    return int(_number(text, int, 0, 65535, "a port number"))


def _workers(text: str) -> int:
    return int(_number(text, int, 1, 64, "a number of processes"))


def _seconds(text: str) -> float:
    return _number(text, float, 0, 86400 * 365, "a number of seconds")


def _idle_timeout(text: str) -> float:
    return _number(text, float, 1, 86400 * 365, "a number of seconds")


def _app_ports(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    """--app-port values as (app, listen); the first gets --listen-port, later ones
    a free port unless they name one."""
    ports = []
    for i, text in enumerate(args.app_port):
        app, _, listen = text.partition(":")
        try:
            pair = (int(app), int(listen) if listen else args.listen_port if i == 0 else 0)
        except ValueError:
            pair = (0, -1)
        if not (1 <= pair[0] <= 65535 and 0 <= pair[1] <= 65535):
            raise ValueError(
                f"--app-port {text!r}: write PORT or PORT:LISTEN_PORT, e.g. 8080 or 8080:15080"
            )
        ports.append(pair)
    used = [p for pair in ports for p in pair if p] + [
        p for p in (args.control_port, args.health_port) if p
    ]
    if len(set(used)) != len(used):
        raise ValueError(
            f"the app ports, listen ports, control port and health port must all differ, got {used}"
        )
    return tuple(ports)


def _check(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    """The flags' values that the engine would refuse, found before it ever starts."""
    ports = _app_ports(args)
    if args.token_file.exists():
        read_token(args.token_file)
    _allow_list(args.outgoing_allow)
    _preview_prefix(args.preview_prefix)
    return ports


def _logging(level: str, who: str = "") -> None:
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"
    )
    logging.getLogger("mitmproxy").setLevel(logging.INFO if level == "debug" else logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("hpack").setLevel(logging.WARNING)  # a line per header at debug


def main(argv: Sequence[str] | None = None) -> int:
    """The primary (`sidecar.primary`): checks the flags, binds the ports, and runs
    the engine when sessions need it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["webhook"]:
        return webhook_main(argv[1:])
    if argv[:1] == ["engine"]:
        return engine_main(argv[1:])
    args = parser().parse_args(argv)
    _logging(args.log_level)
    try:
        ports = _check(args)
    except (TokenError, RuleError, ValueError) as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("offramp.sidecar")
    if warning := loose_token_file(args.token_file):
        log.warning("%s", warning)
    if not args.token_file.exists():
        log.warning(
            "no token file at %s yet: sessions are refused until it exists", args.token_file
        )
    capture = Capture(args.capture)
    default_engine = Engine.ALWAYS if capture is Capture.NONE else Engine.ON_DEMAND
    # The app's variables leave this process's environment, so that nothing but
    # the engine (which keeps them for sessions) inherits them.
    app_env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(APP_ENV_PREFIX)}
    config = PrimaryConfig(
        app_ports=ports,
        app_host=args.app_host,
        listen_host=args.listen_host,
        control_host=args.control_host,
        control_port=args.control_port,
        health_port=args.health_port,
        capture=capture,
        iptables=args.iptables,
        reuse_port=args.workers > 1,
        drain_timeout=args.drain_timeout,
        engine=Engine(args.engine) if args.engine else default_engine,
        linger=args.engine_linger,
        engine_command=engine_command(argv),
        engine_env=app_env,
    )
    try:
        return asyncio.run(run_primary(config))
    except CaptureError as e:
        print(f"offramp-sidecar: cannot capture the pod's traffic: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace, handover: Handover | None) -> SidecarSettings:
    from sidecar.settings import AppPort, SidecarSettings

    app_ports = [AppPort(app=app, listen=listen) for app, listen in _app_ports(args)]
    control_port = args.control_port
    if handover is not None:
        # The primary bound them: the ports are the ones it got.
        app_ports = [AppPort(app=p.app, listen=handover.listen_port(p.app)) for p in app_ports]
        control_port = handover.control_port
    return SidecarSettings(
        app_ports=tuple(app_ports),
        app_host=args.app_host,
        listen_host=args.listen_host,
        control_port=control_port,
        control_host=args.control_host,
        # A missing file is waited for (an optional Secret volume appears when
        # its Secret is made); one that exists must hold a good token.
        token=read_token(args.token_file) if args.token_file.exists() else None,
        token_file=args.token_file,
        capture=Capture(args.capture),
        iptables=args.iptables,
        close_existing=not args.keep_existing_connections,
        probe_paths=frozenset(args.probe_path),
        drain_timeout=args.drain_timeout,
        workers=args.workers,
        header_timeout=args.header_timeout,
        app_connect=args.app_connect,
        resolv_conf=args.resolv_conf,
        outgoing_allow=_allow_list(args.outgoing_allow),
        preview_prefix=_preview_prefix(args.preview_prefix),
        session_idle_timeout=args.session_idle_timeout,
    )


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it exits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def engine_main(argv: Sequence[str]) -> int:
    """`offramp-sidecar engine FLAGS`: the proxy engine, as the primary starts it
    (adopting the primary's sockets, named in the environment), or on its own:
    then it binds them itself and is the whole sidecar in one process."""
    handed_over = HANDOVER_ENV in os.environ
    if handed_over:
        # Until the loop takes it, SIGUSR1 ("go if idle") must not end the process;
        # and when the primary dies, so does the engine, draining as on SIGTERM.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        _die_with_parent()
    args = parser().parse_args(argv)
    _logging(args.log_level, "engine " if handed_over else "")
    from pydantic import ValidationError

    from sidecar.appenv import take_app_env
    from sidecar.proxy.master import Handover, run
    from sidecar.settings import describe_validation_error

    try:
        handover = Handover.from_environ(os.environ)
        os.environ.pop(HANDOVER_ENV, None)  # nothing the engine starts needs it
        settings = _settings(args, handover)
    except (TokenError, RuleError, ValueError) as e:
        if isinstance(e, ValidationError):
            e = ValueError(describe_validation_error(e, "option"))
        print(f"offramp-sidecar engine: {e}", file=sys.stderr)
        return 2
    # The app's variables leave this process's environment (nothing it starts
    # inherits them) and are kept for sessions.
    environment = take_app_env(os.environ)
    try:
        return asyncio.run(run(settings, environment, handover))
    except CaptureError as e:
        print(f"offramp-sidecar: cannot capture the pod's traffic: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 1
