"""`offramp`: the developer's command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import ValidationError

from local_proxy.config import (
    ConfigError,
    FileConfig,
    FileTarget,
    FilterFlags,
    LocalSettings,
    announce_preview,
    build_spec,
    load_config,
    preview_link,
)
from local_proxy.env import EnvConfig, EnvError, fetch_env, patterns, write_env_file
from local_proxy.env import describe as describe_env
from local_proxy.outgoing.filter import OutgoingFilter
from local_proxy.outgoing.netns import Namespace, NamespaceError
from local_proxy.outgoing.netns import prepare as prepare_namespace
from local_proxy.outgoing.runner import LocalProcess, Outgoing
from local_proxy.session import LocalSession, SessionError
from sidecar import __version__
from sidecar.outgoing.rules import RuleError
from sidecar.sessions.spec import OutgoingSpec
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
            "is taken (Kubernetes probes never are, unless --take-probes). After '-- CMD', "
            "offramp runs CMD for the session, and CMD's own connections and DNS lookups go "
            "through the pod (see --local, --remote, --no-outgoing, --no-dns), and it gets "
            "the app container's environment (see --env-include, --env-exclude, --no-env)."
        ),
    )
    steal.add_argument(
        "target",
        nargs="?",
        metavar="KIND/NAME",
        help="the workload in the cluster: deploy/NAME, sts/NAME or pod/NAME (kubeconfig as "
        "kubectl uses it; default: the config file's target). The sidecar is injected if "
        "needed; every ready pod joins the session",
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
        "--preview",
        metavar="KEY",
        help="team previews: steal the requests that carry this key, in the header "
        "x-offramp-preview, the cookie offramp-preview (set by the link offramp prints) "
        "or W3C baggage offramp-preview=KEY; stolen requests get it in their baggage. "
        "With other filter flags, both must match",
    )
    steal.add_argument(
        "--force",
        action="store_true",
        help="open the session even where another developer's steal session overlaps it "
        "(offramp refuses and says whose otherwise); theirs ends and they are told",
    )
    steal.add_argument(
        "--preview-host",
        metavar="HOST",
        help="with --preview: the host (or URL) people open the app at, for the printed "
        "link (default: the Service's in-cluster name)",
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
        help="mirrord-style JSON config; target, feature.network.incoming, .outgoing, .dns "
        "and feature.env are used; flags override them",
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
    _outgoing_flags(steal)
    _env_flags(steal)

    proxy = sub.add_parser(
        "proxy",
        help="a local SOCKS5 and HTTP proxy whose connections leave from the pod",
        description="Serves SOCKS5 (hostnames resolved in the pod) and HTTP (CONNECT, and "
        "plain http:// requests) on 127.0.0.1, for curl, a browser or an IDE's run "
        "configuration; prints the variables to export. Takes no requests from the pod.",
    )
    proxy.add_argument(
        "target",
        nargs="?",
        metavar="KIND/NAME",
        help="the workload whose pod the connections leave from (injected if needed; "
        "default: the config file's target)",
    )
    proxy.add_argument("--sidecar-url", help="instead of KIND/NAME: one sidecar's session "
                       "server, e.g. ws://127.0.0.1:15081 (needs --token-file)")  # fmt: skip
    proxy.add_argument("--token-file", type=Path, help="with --sidecar-url: the sidecar's token")
    _kube_flags(proxy)
    proxy.add_argument("--image", help="the sidecar image, if it must be injected (as for steal)")
    proxy.add_argument("--listen", type=int, default=1080, metavar="PORT",
                       help="port on 127.0.0.1 (default %(default)s; 0: any free one)")  # fmt: skip
    proxy.add_argument("-f", "--config-file", type=Path,
                       help="mirrord-style JSON config; its target and "
                       "feature.network.outgoing")  # fmt: skip
    _outgoing_flags(proxy, namespace=False)

    status = sub.add_parser(
        "status",
        help="is the sidecar injected, which version, which sessions are open",
        description="Shows whether KIND/NAME has the sidecar, and asks each ready pod's "
        "sidecar (through port-forward) for its version and open sessions.",
    )
    status.add_argument("target", metavar="KIND/NAME")
    _kube_flags(status)
    sessions = sub.add_parser(
        "sessions",
        help="every open session on every replica: who, filter, since, requests taken",
        description="Asks each ready pod's sidecar (through port-forward) for its open "
        "sessions. --end ends sessions, yours or a colleague's (they are told who ended "
        "them): needs the RBAC that stealing needs (the token Secret and port-forward).",
    )
    sessions.add_argument("target", metavar="KIND/NAME")
    sessions.add_argument(
        "--end",
        action="append",
        default=[],
        metavar="POD/ID|WHO",
        help="end the session listed as POD/ID, or every session of WHO (as listed); repeatable",
    )
    _kube_flags(sessions)
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


def _outgoing_flags(p: argparse.ArgumentParser, namespace: bool = True) -> None:
    p.add_argument(
        "--local",
        action="append",
        default=[],
        metavar="DEST",
        help="with -- CMD: connections (and UDP) to DEST leave from this machine, all others "
        "from the pod; DEST is [tcp://|udp://][NAME|ADDRESS|SUBNET/MASK][:PORT] as in "
        "mirrord's outgoing filter (a NAME matches itself and NAME.anything). Repeatable",
    )
    p.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="DEST",
        help="the other way round: only connections to DEST leave from the pod (not with "
        "--local). Naming the pod's loopback or a link-local address here lets it through",
    )
    p.add_argument("--no-outgoing", action="store_true",
                   help="CMD's connections and UDP leave from this machine")  # fmt: skip
    p.add_argument("--no-dns", action="store_true",
                   help="CMD's DNS is answered by this machine's resolver")  # fmt: skip
    if namespace:
        p.add_argument(
            "--no-namespace",
            action="store_true",
            help="run CMD as a plain child with ALL_PROXY/HTTP(S)_PROXY pointing at offramp, "
            "instead of in a network namespace of its own (chosen by itself where user "
            "namespaces are not available)",
        )


def _env_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--env-include",
        action="append",
        default=[],
        metavar="NAMES",
        help="CMD gets only these of the app container's variables: names with * and ? "
        "wildcards, separated by ';' (repeatable; replaces the file's feature.env.include)",
    )
    p.add_argument(
        "--env-exclude",
        action="append",
        default=[],
        metavar="NAMES",
        help="CMD gets all of the app container's variables but these (as --env-include); "
        "PATH, HOME, interpreter paths and the like are left out unless included",
    )
    p.add_argument("--no-env", action="store_true",
                   help="CMD gets this machine's environment only")  # fmt: skip
    p.add_argument(
        "--env-file",
        type=Path,
        metavar="FILE",
        help="write the chosen variables to FILE as dotenv (mode 0600), e.g. for an IDE's "
        "run configuration; with or without -- CMD",
    )


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
    if args.command == "proxy":
        return _proxy(args)
    if args.command in ("status", "uninject", "sessions"):
        return _target_command(args)
    if args.command == "set-image":
        return _set_image(args.image)
    return _steal(args, command)


def _target(args: argparse.Namespace, from_file: FileTarget | None = None) -> Target:
    """KIND/NAME and -n from the flags, else from the config file's target."""
    from local_proxy.cluster.workload import Target, TargetError, parse_target

    text = args.target or (from_file.path if from_file else None)
    assert text is not None
    try:
        resource, name = parse_target(text)
    except TargetError as e:
        raise ConfigError(str(e)) from e
    namespace = args.namespace or (from_file.namespace if from_file else None)
    return Target(resource, name, args.context, namespace)


def _target_command(args: argparse.Namespace) -> int:
    from local_proxy.cluster.target import Failed, run_sessions, run_status, run_uninject

    try:
        target = _target(args)
        if args.command == "sessions":
            run_sessions(target, print, args.end, f"{getpass.getuser()}@{socket.gethostname()}")
        else:
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


def _config_file(args: argparse.Namespace) -> FileConfig:
    """-f FILE, its notes and ignored keys said on stderr. Raises ConfigError."""
    config = load_config(args.config_file) if args.config_file else FileConfig()
    for note in config.notes:
        print(f"offramp: {note}", file=sys.stderr)
    for key in config.ignored:
        print(f"offramp: {args.config_file}: ignoring {key} (offramp does not use it)",
              file=sys.stderr)  # fmt: skip
    return config


def _file_target(args: argparse.Namespace, config: FileConfig) -> FileTarget | None:
    """The config file's target, when neither KIND/NAME nor --sidecar-url is given.
    Raises ConfigError when there is none of the three, or both flags."""
    from_file = config.target if args.target is None and args.sidecar_url is None else None
    if config.target is not None and from_file is None:
        given = "--sidecar-url" if args.sidecar_url else args.target
        print(f"offramp: {args.config_file}: ignoring target ({config.target.path}): the "
              f"command line gives {given}", file=sys.stderr)  # fmt: skip
    if (args.target is None and from_file is None) == (args.sidecar_url is None):
        raise ConfigError("give either KIND/NAME (a workload in the cluster, or the config "
                          "file's target) or --sidecar-url")  # fmt: skip
    return from_file


def _steal(args: argparse.Namespace, command: list[str]) -> int:
    try:
        config = _config_file(args)
        from_file = _file_target(args, config)
    except ConfigError as e:
        return _fail(str(e))
    if args.sidecar_url and args.token_file is None:
        return _fail("--sidecar-url needs --token-file (the file with the sidecar's token)")
    if not 1 <= args.sidecar_workers <= 64:
        return _fail(f"--sidecar-workers {args.sidecar_workers}: give 1 to 64 (about one per core)")
    try:
        target = _target(args, from_file) if args.sidecar_url is None else None
        container = args.container or (from_file.container if from_file else None)
        image = args.image or (_configured_image() if target else None)
        env = _env_config(args, config)
        if args.env_file and not env.enabled:
            raise ConfigError(
                f"--env-file {args.env_file} would be written with nothing: the environment "
                "is turned off (--no-env, or feature.env false)"
            )
        flags = FilterFlags(
            headers=tuple(args.header),
            paths=tuple(args.path),
            methods=tuple(args.method),
            ports=tuple(args.port),
            mirror=args.mirror,
            take_probes=args.take_probes,
            preview=args.preview,
        )
        spec = build_spec(config, flags, f"{getpass.getuser()}@{socket.gethostname()}")
        if args.force:
            spec = spec.model_copy(update={"force": True})
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
    if (key := spec.http_filter.preview) is not None and target is None:
        _say(announce_preview(key, preview_link(args.preview_host or "<the app's host>", key)))
    # The pod's environment is fetched when something uses it.
    wanted = _EnvUse(env, args.env_file) if env.enabled and (command or args.env_file) else None
    outgoing_filter, namespace = None, None
    if command:
        try:
            outgoing_filter = _outgoing_filter(args, config)
        except ConfigError as e:
            return _fail(str(e))
        namespace = _namespace(outgoing_filter, command, args.no_namespace)
    if target is not None:
        from local_proxy.cluster.target import StealTarget

        steal = StealTarget(
            target, settings, image=image, no_iptables=args.no_iptables,
            container=container, rollout_timeout=args.rollout_timeout, report=_say,
            sidecar_workers=args.sidecar_workers, preview_host=args.preview_host,
            outgoing=_outgoing_spec(outgoing_filter) if outgoing_filter else None,
            factory=namespace.make_socket if namespace is not None else None,
        )  # fmt: skip
        return asyncio.run(_run_target(steal, command, args.to, outgoing_filter, namespace, wanted))
    if wanted is not None:
        try:
            remote = _sidecar_env(settings)
            wanted.write_file(remote)
        except (EnvError, OSError) as e:
            return _fail(f"the app's environment: {e}", 1)
    if not command:
        return asyncio.run(_run(settings))
    assert outgoing_filter is not None
    cmd_env = wanted.for_command(remote) if wanted is not None else None
    return asyncio.run(_run_command(settings, command, outgoing_filter, namespace, cmd_env))


@dataclass(frozen=True)
class _EnvUse:
    """What is done with the app container's environment once it is fetched."""

    config: EnvConfig
    file: Path | None

    def write_file(self, remote: dict[str, str]) -> None:
        """Say what was received (names only) and write --env-file. Raises OSError."""
        _say(f"offramp: the app container's environment: {describe_env(remote)}")
        if self.file is not None:
            chosen = self.config.for_file(remote)
            write_env_file(self.file, chosen)
            _say(f"offramp: wrote {describe_env(chosen)} to {self.file} (mode 0600)")

    def for_command(self, remote: dict[str, str]) -> dict[str, str]:
        chosen = self.config.chosen(remote)
        _say(f"offramp: CMD gets {describe_env(chosen)} of the pod's")
        return self.config.environment(os.environ, remote)


def _env_config(args: argparse.Namespace, config: FileConfig) -> EnvConfig:
    """The file's feature.env, flags over it. Raises ConfigError."""
    base = config.env or EnvConfig()
    if args.no_env:
        return replace(base, enabled=False)
    try:
        include = patterns(args.env_include, "--env-include")
        exclude = patterns(args.env_exclude, "--env-exclude")
        if include or exclude:
            return replace(base, enabled=True, include=include, exclude=exclude)
    except ValueError as e:
        raise ConfigError(str(e).replace("give include or exclude", "give --env-include or "
                                         "--env-exclude")) from e  # fmt: skip
    return base


def _sidecar_env(settings: LocalSettings) -> dict[str, str]:
    """--sidecar-url: the app's environment from that sidecar. Raises EnvError."""
    url = urlsplit(settings.sidecar_url)
    host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "wss" else 80)
    try:
        sock = socket.create_connection((host, port), timeout=15)
        if url.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    except OSError as e:
        raise EnvError(f"cannot reach {host}:{port}: {e}") from e
    return fetch_env(sock, host, settings.token)


def _outgoing_filter(args: argparse.Namespace, incoming: FileConfig) -> OutgoingFilter:
    """Flags over the config file's feature.network.outgoing / dns."""
    from_file = incoming.outgoing
    local, remote = list(args.local), list(args.remote)
    if not local and not remote:
        local, remote = list(from_file.local), list(from_file.remote)
    try:
        return OutgoingFilter.build(
            local,
            remote,
            tcp=not args.no_outgoing and from_file.tcp is not False,
            dns=not args.no_dns and from_file.dns is not False,
            udp=not args.no_outgoing and from_file.udp is not False,
        )
    except RuleError as e:
        raise ConfigError(str(e)) from e


def _namespace(outgoing: OutgoingFilter, command: list[str], plain: bool) -> Namespace | None:
    """The namespace for CMD, made before any thread starts; None for a plain child
    (outgoing off, --no-namespace, or none can be had here: then said why)."""
    if not outgoing.enabled or plain:
        return None
    try:
        return prepare_namespace(outgoing.loopback_ports)
    except NamespaceError as e:
        print(
            f"offramp: warning: cannot run {command[0]} in a network namespace of its own: "
            f"{e}. It runs with ALL_PROXY/HTTP(S)_PROXY pointing at offramp instead; "
            "programs that ignore those (most database drivers, Java, raw sockets) and UDP "
            "leave from this machine",
            file=sys.stderr,
        )
        return None


def _outgoing_spec(outgoing: OutgoingFilter) -> OutgoingSpec | None:
    if not outgoing.enabled:
        return None
    return OutgoingSpec(tcp=outgoing.tcp, udp=outgoing.udp, dns=outgoing.dns, named=outgoing.named)


def _outgoing_settings(settings: LocalSettings, outgoing: OutgoingFilter) -> LocalSettings:
    """The settings of the session that carries outgoing traffic only."""
    spec = settings.spec.model_copy(
        update={"incoming": False, "outgoing": _outgoing_spec(outgoing)}
    )
    return settings.model_copy(update={"spec": spec})


async def _run_command(
    settings: LocalSettings,
    command: list[str],
    outgoing_filter: OutgoingFilter,
    namespace: Namespace | None,
    env: dict[str, str] | None,
) -> int:
    """`offramp steal --sidecar-url ... -- CMD`: outgoing first, then CMD (with `env`,
    else offramp's environment), then the session that steals once CMD listens."""
    outgoing = None
    if outgoing_filter.enabled:
        session = LocalSession(_outgoing_settings(settings, outgoing_filter), report=_say)
        try:
            outgoing = await _start_outgoing(outgoing_filter, session, namespace)
        except SessionError as e:
            return _fail(str(e), 1)
    factory = namespace.make_socket if namespace is not None else None
    session = LocalSession(settings, report=_say, factory=factory)
    try:
        try:
            process, waiter = await _start_command(
                command, settings.to_port, namespace, outgoing, env
            )
        except _CommandFailed as e:
            return _fail(str(e), e.code)
        waiter.add_done_callback(lambda _: session.stop())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, session.stop)
        try:
            await session.run()
        except SessionError as e:
            return _fail(str(e), 1)
        finally:
            await _end_command(process, waiter)
        c = session.forwarder.counters
        _say(f"offramp: session ended: {c.stolen} stolen, {c.mirrored} mirrored")
        code = waiter.result()
        _say(f"offramp: {command[0]} exited with {code}")
        return code if code >= 0 else 128 - code
    finally:
        if outgoing is not None:
            _say(f"offramp: {outgoing.summary()}")
            await outgoing.aclose()
        if namespace is not None:
            namespace.close()


async def _listening_via(
    connect: Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    exited: asyncio.Task[int],
    port: int,
) -> bool:
    deadline = asyncio.get_running_loop().time() + LISTEN_WAIT
    while not exited.done() and asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await connect("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return True
    return False


def _proxy(args: argparse.Namespace) -> int:
    try:
        config = _config_file(args)
        from_file = _file_target(args, config)
    except ConfigError as e:
        return _fail(str(e))
    if args.sidecar_url and args.token_file is None:
        return _fail("--sidecar-url needs --token-file (the file with the sidecar's token)")
    try:
        target = _target(args, from_file) if args.sidecar_url is None else None
        image = args.image or (_configured_image() if target else None)
        outgoing = _outgoing_filter(args, config)
        settings = LocalSettings(
            sidecar_url=args.sidecar_url or "ws://pending",
            token=read_token(args.token_file) if args.token_file else "",
            to_port=1,
            spec=build_spec(FileConfig(), FilterFlags(),
                            f"{getpass.getuser()}@{socket.gethostname()}"),
        )  # fmt: skip
    except (ConfigError, TokenError) as e:
        return _fail(str(e))
    except ValidationError as e:
        return _fail(describe_validation_error(e, "option"))
    if not outgoing.tcp:
        return _fail("with --no-outgoing this proxy would carry nothing")
    if target is None:
        session = LocalSession(_outgoing_settings(settings, outgoing), report=_say)
        return asyncio.run(_serve_proxy(session, outgoing, args.listen))
    from local_proxy.cluster.target import StealTarget

    steal = StealTarget(target, settings, image=image, report=_say, incoming=False,
                        outgoing=_outgoing_spec(outgoing))  # fmt: skip
    return asyncio.run(_proxy_target(steal, outgoing, args.listen))


async def _proxy_target(steal: StealTarget, outgoing_filter: OutgoingFilter, port: int) -> int:
    from local_proxy.cluster.target import Failed

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, steal.stop)
    started: list[Outgoing] = []

    async def serve(session: LocalSession | None) -> None:
        assert session is not None
        outgoing = Outgoing(outgoing_filter, session, None, _say)
        started.append(outgoing)
        try:
            await outgoing.start(proxy_port=port)
        except (SessionError, OSError) as e:
            raise Failed(f"the proxy did not start: {e}") from e
        _announce_proxy(outgoing)

    try:
        await steal.run(serve)
    except Failed as e:
        return _fail(str(e), 1)
    finally:
        for outgoing in started:
            _say(f"offramp: {outgoing.summary()}")
            await outgoing.aclose()
    return 0


def _announce_proxy(outgoing: Outgoing) -> None:
    _say("offramp: proxy ready; for a shell, export:")
    for name, value in outgoing.environment().items():
        if name.isupper():
            _say(f"export {name}={value}")


async def _serve_proxy(session: LocalSession, outgoing_filter: OutgoingFilter, port: int) -> int:
    outgoing = Outgoing(outgoing_filter, session, None, _say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await outgoing.start(proxy_port=port)
    except (SessionError, OSError) as e:
        await outgoing.aclose()
        return _fail(str(e), 1)
    _announce_proxy(outgoing)
    await stop.wait()
    _say(f"offramp: {outgoing.summary()}")
    await outgoing.aclose()
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


class _CommandFailed(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


async def _start_command(
    command: list[str],
    port: int,
    namespace: Namespace | None,
    outgoing: Outgoing | None,
    env: dict[str, str] | None = None,
) -> tuple[LocalProcess, asyncio.Task[int]]:
    """Start CMD (in the namespace, or with the proxy variables, or plainly) with
    `env` (None: offramp's own) and wait until it listens on `port`. Raises
    _CommandFailed."""
    if outgoing is not None and namespace is None:
        env = (dict(os.environ) if env is None else env) | outgoing.environment()
    try:
        process = await LocalProcess.start(
            command, namespace, outgoing.resolv_conf() if outgoing else None, env
        )
    except (OSError, NamespaceError) as e:
        raise _CommandFailed(f"cannot start {command[0]!r}: {e}", 2) from e
    if outgoing is not None and namespace is not None:
        outgoing.supervise(namespace)
    waiter = asyncio.create_task(process.wait())
    if not await _listening_via(process.connect, waiter, port):
        if not waiter.done():
            process.terminate()
            await waiter
            raise _CommandFailed(
                f"{command[0]} did not listen on 127.0.0.1:{port} within {LISTEN_WAIT:.0f} s"
            )
        raise _CommandFailed(
            f"{command[0]} exited with {waiter.result()} before listening on port {port}"
        )
    _say(f"offramp: {command[0]} listens on 127.0.0.1:{port}")
    return process, waiter


async def _end_command(process: LocalProcess, waiter: asyncio.Task[int]) -> None:
    if not waiter.done():
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), 10)
        except TimeoutError:
            process.kill()
            await waiter


async def _start_outgoing(
    outgoing_filter: OutgoingFilter, session: LocalSession, namespace: Namespace | None
) -> Outgoing:
    """Raises SessionError if the session for outgoing traffic does not open."""
    outgoing = Outgoing(outgoing_filter, session, namespace, _say)
    try:
        await outgoing.start()
    except BaseException:
        await outgoing.aclose()
        raise
    return outgoing


async def _run_target(
    steal: StealTarget,
    command: list[str],
    port: int,
    outgoing_filter: OutgoingFilter | None = None,
    namespace: Namespace | None = None,
    env: _EnvUse | None = None,
) -> int:
    """`offramp steal KIND/NAME [-- CMD]`. With outgoing traffic or the pod's
    environment, CMD starts once the pods are ready (and the outgoing session is
    open, and the environment fetched), before any request is stolen; with
    neither, it starts first and the injection waits for it to listen."""
    from local_proxy.cluster.target import Failed

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, steal.stop)
    running: list[tuple[LocalProcess, asyncio.Task[int]]] = []
    outgoing: list[Outgoing] = []

    async def before_sessions(session: LocalSession | None) -> None:
        cmd_env = None
        if env is not None:
            try:
                remote = await steal.environment()
                env.write_file(remote)
            except (EnvError, OSError) as e:
                raise Failed(f"the app's environment: {e}") from e
            cmd_env = env.for_command(remote) if command else None
        if session is not None:
            assert outgoing_filter is not None
            try:
                outgoing.append(await _start_outgoing(outgoing_filter, session, namespace))
            except SessionError as e:
                raise Failed(f"the session for outgoing traffic did not open: {e}") from e
        if not command:
            return
        try:
            process, waiter = await _start_command(
                command, port, namespace, outgoing[0] if outgoing else None, cmd_env
            )
        except _CommandFailed as e:
            raise Failed(str(e)) from e
        waiter.add_done_callback(lambda _: steal.stop())
        running.append((process, waiter))

    hook = None
    try:
        if (command and steal.outgoing is not None) or env is not None:
            hook = before_sessions
        elif command:
            try:
                running.append(await _start_command(command, port, None, None))
            except _CommandFailed as e:
                return _fail(str(e), e.code)
            running[0][1].add_done_callback(lambda _: steal.stop())
        try:
            await steal.run(hook)
        except Failed as e:
            return _fail(str(e), 1)
    finally:
        for process, waiter in running:
            await _end_command(process, waiter)
        for each in outgoing:
            _say(f"offramp: {each.summary()}")
            await each.aclose()
        if namespace is not None:
            namespace.close()
    stolen, mirrored, timeouts = steal.counters()
    _say(
        f"offramp: session ended: {stolen} stolen, {mirrored} mirrored"
        + (f", {timeouts} went to the app as the filter timed out" if timeouts else "")
    )
    if running and running[0][1].done():
        code = running[0][1].result()
        _say(f"offramp: {command[0]} exited with {code}")
        return code if code >= 0 else 128 - code
    return 0


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
