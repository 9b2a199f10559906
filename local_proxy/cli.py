"""`offramp`: the developer's command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

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
from sidecar.control import describe_validation_error
from sidecar.settings import TokenError, read_token

__all__ = ["main", "parser"]


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
        "--sidecar-url",
        required=True,
        help="the sidecar's session server, e.g. ws://127.0.0.1:15081",
    )
    steal.add_argument(
        "--token-file", type=Path, required=True, help="file with the sidecar's token"
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from local_proxy.demo import run_demo

        return asyncio.run(run_demo(quiet=args.quiet))
    return _steal(args)


def _fail(message: str, code: int = 2) -> int:
    print(f"offramp: {message}", file=sys.stderr)
    return code


def _steal(args: argparse.Namespace) -> int:
    try:
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
            sidecar_url=args.sidecar_url,
            token=read_token(args.token_file),
            to_port=args.to,
            spec=spec,
            timeout=args.timeout,
            mirror_queue=args.mirror_queue,
        )
    except (ConfigError, TokenError) as e:
        return _fail(str(e))
    except ValidationError as e:
        return _fail(describe_validation_error(e).replace("invalid session spec", "invalid option"))
    return asyncio.run(_run(settings))


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
        + (f", {dropped} mirror copies dropped" if dropped else ""),
        flush=True,
    )
    return 0
