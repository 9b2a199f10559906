"""`offramp-sidecar`: the command the sidecar container runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from sidecar import __version__
from sidecar.appenv import take_app_env
from sidecar.outgoing.policy import ALLOW_ENV as OUTGOING_ALLOW_ENV
from sidecar.outgoing.rules import RuleError, parse_rules
from sidecar.sessions.preview import DEFAULT_PREFIX, PreviewKeyError, check_prefix
from sidecar.sessions.preview import PREFIX_ENV as PREVIEW_PREFIX_ENV
from sidecar.settings import (
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    IDLE_TIMEOUT_ENV,
    AppPort,
    Capture,
    SidecarSettings,
    TokenError,
    describe_validation_error,
    loose_token_file,
    read_token,
)

__all__ = ["main", "parser", "webhook_parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offramp-sidecar",
        description=(
            "Proxy in front of an app port: requests that match an open session's filter "
            "go through that session's tunnel to a developer's machine; everything else "
            "goes to the app. `offramp-sidecar webhook --help`: the injector webhook."
        ),
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
        type=int,
        default=15080,
        help="the proxy's port for the first --app-port (default %(default)s)",
    )
    p.add_argument("--listen-host", default="0.0.0.0", help="default %(default)s")
    p.add_argument(
        "--control-port",
        type=int,
        default=15081,
        help="the session server's port: websocket /v1/tunnel and GET /healthz "
        "(default %(default)s)",
    )
    p.add_argument("--control-host", default="0.0.0.0", help="default %(default)s")
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
        type=float,
        default=10.0,
        help="seconds to let in-flight requests finish on SIGTERM (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="proxy processes that share each listen port (SO_REUSEPORT), so throughput "
        "grows with the pod's cores; give about one per core (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
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
        type=float,
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
        '{"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}\' (that is the default)',
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
    from sidecar.inject.admission import WebhookPolicy
    from sidecar.inject.patch import InjectOptions
    from sidecar.inject.webhook import serve

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["webhook"]:
        return webhook_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mitmproxy").setLevel(
        logging.INFO if args.log_level == "debug" else logging.WARNING
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("hpack").setLevel(logging.WARNING)  # a line per header at debug
    try:
        app_ports = tuple(
            AppPort.parse(text, args.listen_port if i == 0 else 0)
            for i, text in enumerate(args.app_port)
        )
        settings = SidecarSettings(
            app_ports=app_ports,
            app_host=args.app_host,
            listen_host=args.listen_host,
            control_port=args.control_port,
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
    except (TokenError, RuleError) as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"offramp-sidecar: {describe_validation_error(e, 'option')}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 2

    if warning := loose_token_file(args.token_file):
        logging.getLogger("offramp.sidecar").warning("%s", warning)
    # The app's variables leave this process's environment (nothing it starts
    # inherits them) and are kept for sessions.
    environment = take_app_env(os.environ)
    from sidecar.capture import CaptureError
    from sidecar.proxy.master import run  # mitmproxy loads only once the flags are good

    try:
        return asyncio.run(run(settings, environment))
    except CaptureError as e:
        print(f"offramp-sidecar: cannot capture the pod's traffic: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"offramp-sidecar: {e}", file=sys.stderr)
        return 1
