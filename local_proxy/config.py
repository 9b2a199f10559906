"""The local proxy's settings: a mirrord-style config file, then flags on top.

From a config file offramp reads:
- `target`: `"KIND/NAME"` (pod, deployment, statefulset, and their short
  forms; `.../container/NAME` picks the app container), or the object form
  `{"path": ..., "namespace": ...}` whose path is such a string or an object
  like `{"deployment": "api", "container": "app"}`;
- `feature.network.incoming`: a mode string, `"steal"` or `"mirror"`, or an
  object with `mode`, `http_filter` and `ports`;
- `feature.network.outgoing` (true/false, or an object with `tcp`, `udp` and
  `filter: {local: [...]}` or `{remote: [...]}`) and `feature.network.dns`
  (true/false, or an object with `enabled`);
- `feature.env`: true/false, or an object with `include`, `exclude`,
  `override` and `unset` (`local_proxy.env`).
Files are JSON as mirrord writes it, trailing commas and comments allowed
(JSON5); a file that is not is refused with its line and column; typographic
quotes pasted from a web page are read as plain quotes, with a note that says
where. Keys offramp does not use are reported as ignored, never silently
dropped; a value offramp cannot honour is refused with what to change. Flags
override the file: any filter flag replaces the file's filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import json5
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from local_proxy.env import EnvConfig, patterns
from sidecar.sessions.filters import FilterError, compile_filter
from sidecar.sessions.preview import BAGGAGE_MEMBER, COOKIE, DEFAULT_PREFIX, HEADER
from sidecar.sessions.spec import FilterClause, HttpFilterSpec, Mode, SessionSpec
from sidecar.settings import validation_problems

__all__ = [
    "ConfigError",
    "FileConfig",
    "FileTarget",
    "FilterFlags",
    "LocalSettings",
    "OutgoingConfig",
    "announce_preview",
    "build_spec",
    "load_config",
    "preview_link",
]


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says where and how to fix it."""


_INCOMING_KEYS = {"mode", "http_filter", "ports"}
_ENV_KEYS = {"include", "exclude", "override", "unset"}
_TARGET_KINDS = {
    "pod": "pod", "deployment": "deployment", "deploy": "deployment",
    "statefulset": "statefulset", "sts": "statefulset",
}  # fmt: skip
_OTHER_KINDS = ("rollout", "job", "cronjob", "service", "replicaset", "daemonset", "targetless")


@dataclass(frozen=True)
class OutgoingConfig:
    """mirrord's `feature.network.outgoing` and `.dns`; None: not in the file."""

    tcp: bool | None = None
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    dns: bool | None = None
    udp: bool | None = None


@dataclass(frozen=True)
class FileTarget:
    """mirrord's `target`."""

    path: str
    """KIND/NAME, as `offramp steal` takes it."""
    container: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class FileConfig:
    mode: Mode | None = None
    http_filter: dict[str, Any] = field(default_factory=dict)
    ports: tuple[int, ...] | None = None
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    outgoing: OutgoingConfig = field(default_factory=OutgoingConfig)
    env: EnvConfig | None = None
    """None: the file says nothing about the environment."""
    target: FileTarget | None = None


# Typographic double quotes, as pasted from blogs and chat, and the same quotes
# after a UTF-8 -> Mac Roman mix-up (how some published examples carry them).
_SMART_QUOTES = ("\u201c", "\u201d", "\u201e", "\u201a\u00c4\u00fa", "\u201a\u00c4\u00f9")
_JSON5_ERROR = re.compile(r"<string>:(\d+) (.*) at column (\d+)")


def _where(text: str, index: int) -> tuple[int, int]:
    """Line and column (both from 1) of a character."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _shown(text: str, line: int, column: int) -> str:
    """The line, and a caret under the column."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    row = lines[line - 1].rstrip()
    return f"\n    {row}\n    {' ' * (column - 1)}^"


def _parse(text: str, path: Path) -> tuple[Any, tuple[str, ...]]:
    try:
        return json5.loads(text), ()
    except ValueError as first:
        repaired = text
        for quote in sorted(_SMART_QUOTES, key=len, reverse=True):
            repaired = repaired.replace(quote, '"')
        if repaired != text:
            at = min(i for q in _SMART_QUOTES if (i := text.find(q)) != -1)
            line, column = _where(text, at)
            try:
                note = (
                    f"{path}:{line}:{column}: read typographic quotes as plain double quotes "
                    '("); fix the file to silence this'
                )
                return json5.loads(repaired), (note,)
            except ValueError:
                pass
        found = _JSON5_ERROR.search(str(first))
        if found is None:
            raise ConfigError(f"{path} is not valid JSON: {first}") from first
        line, column = int(found[1]), int(found[3])
        hint = ""
        if found[2].startswith("Unexpected") and line <= len(text.splitlines()):
            row = text.splitlines()[line - 1]
            if row.count('"') % 2:
                hint = " (a double quote is missing on this line)"
        raise ConfigError(
            f"{path}:{line}:{column}: not valid JSON: {found[2].lower()}{hint}"
            + _shown(text, line, column)
        ) from first


def load_config(path: Path) -> FileConfig:
    """Read what offramp uses of a mirrord-style config file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from e
    doc, notes = _parse(text, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    feature = doc.get("feature", {})
    if not isinstance(feature, dict):
        raise ConfigError(f"{path}: feature must be an object")
    network = feature.get("network", {})
    if not isinstance(network, dict):
        raise ConfigError(f"{path}: feature.network must be an object")
    outgoing, ignored_out = _outgoing(network, path)
    env, ignored_env = _env(feature.get("env"), path)
    target = _target(doc.get("target"), path)
    base = FileConfig(
        ignored=_ignored_top(doc) + ignored_out + ignored_env,
        notes=notes,
        outgoing=outgoing,
        env=env,
        target=target,
    )
    if "incoming" not in network:
        return base
    incoming = network["incoming"]
    where = f"{path}: feature.network.incoming"
    if isinstance(incoming, str):
        return replace(base, mode=_mode(incoming, where))
    if not isinstance(incoming, dict):
        raise ConfigError(f'{where} must be "steal", "mirror" or an object')
    mode = _mode(incoming["mode"], f"{where}.mode") if "mode" in incoming else None
    http_filter = incoming.get("http_filter", {})
    if not isinstance(http_filter, dict):
        raise ConfigError(f"{where}.http_filter must be an object")
    ports = incoming.get("ports")
    if ports is not None and (
        not isinstance(ports, list) or not all(isinstance(p, int) for p in ports)
    ):
        raise ConfigError(f"{where}.ports must be a list of port numbers")
    ignored = tuple(f"feature.network.incoming.{k}" for k in incoming if k not in _INCOMING_KEYS)
    return replace(
        base,
        mode=mode,
        http_filter=http_filter,
        ports=tuple(ports) if ports else None,
        ignored=ignored + base.ignored,
    )


def _target(value: object, path: Path) -> FileTarget | None:
    """mirrord's `target`, string or object form."""
    where = f"{path}: target"
    if value is None:
        return None
    namespace = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "namespace"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: offramp reads target.path and "
                              "target.namespace only")  # fmt: skip
        namespace = value.get("namespace")
        if namespace is not None and not (isinstance(namespace, str) and namespace):
            raise ConfigError(f"{where}.namespace must be a namespace's name")
        value = value.get("path")
        if value is None:
            raise ConfigError(f'{where} has no path: write "path": "deployment/NAME"')
        where += ".path"
    if isinstance(value, dict):
        kinds = [k for k in value if k != "container"]
        if len(kinds) != 1 or not isinstance(value[kinds[0]], str):
            raise ConfigError(f'{where} must name one workload, e.g. {{"deployment": "api"}}')
        container = value.get("container")
        if container is not None and not isinstance(container, str):
            raise ConfigError(f"{where}.container must be a container's name")
        value = f"{kinds[0]}/{value[kinds[0]]}" + (f"/container/{container}" if container else "")
    if not isinstance(value, str):
        raise ConfigError(f'{where} must be a string like "deployment/api" or an object')
    parts = value.split("/")
    kind = parts[0].lower()
    if kind in _OTHER_KINDS:
        raise ConfigError(
            f"{where} is {value!r}: offramp steals from a pod, deployment or statefulset; "
            "name one of those (a rollout's or job's pods: target their pod/NAME)"
        )
    if kind not in _TARGET_KINDS or len(parts) not in (2, 4) or not all(parts):
        raise ConfigError(
            f"{where} is {value!r}; write KIND/NAME or KIND/NAME/container/CONTAINER with "
            "KIND pod, deployment (deploy) or statefulset (sts)"
        )
    if len(parts) == 4 and parts[2] != "container":
        raise ConfigError(f"{where} is {value!r}; the third part must be 'container'")
    return FileTarget(
        f"{_TARGET_KINDS[kind]}/{parts[1]}", parts[3] if len(parts) == 4 else None, namespace
    )


def _env(value: object, path: Path) -> tuple[EnvConfig | None, tuple[str, ...]]:
    """mirrord's `feature.env`, and the keys of it offramp ignores."""
    where = f"{path}: feature.env"
    if value is None:
        return None, ()
    if isinstance(value, bool):
        return EnvConfig(enabled=value), ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be true, false or an object")
    ignored = tuple(f"feature.env.{k}" for k in value if k not in _ENV_KEYS)
    override = value.get("override", {})
    if not isinstance(override, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in override.items()
    ):
        raise ConfigError(f'{where}.override must map names to strings: {{"NAME": "value"}}')
    try:
        return EnvConfig(
            include=patterns(value.get("include", []), f"{where}.include"),
            exclude=patterns(value.get("exclude", []), f"{where}.exclude"),
            override=dict(override),
            unset=patterns(value.get("unset", []), f"{where}.unset"),
        ), ignored
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{where}: {e}") from e


_OUTGOING_KEYS = {"tcp", "udp", "filter"}


def _outgoing(network: dict[str, Any], path: Path) -> tuple[OutgoingConfig, tuple[str, ...]]:
    """`feature.network.outgoing` and `.dns`, and the keys of them offramp ignores."""
    where = f"{path}: feature.network.outgoing"
    ignored: list[str] = []
    tcp: bool | None = None
    udp: bool | None = None
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    value = network.get("outgoing")
    if isinstance(value, bool):
        tcp = udp = value
    elif isinstance(value, dict):
        tcp = _bool(value.get("tcp", True), f"{where}.tcp")
        udp = _bool(value.get("udp", True), f"{where}.udp")
        ignored += [f"feature.network.outgoing.{k}" for k in value if k not in _OUTGOING_KEYS]
        filt = value.get("filter", {})
        if not isinstance(filt, dict):
            raise ConfigError(f'{where}.filter must be an object: {{"local": [...]}} or '
                              '{"remote": [...]}')  # fmt: skip
        if "local" in filt and "remote" in filt:
            raise ConfigError(f"{where}.filter has both local and remote; give one of them")
        for key in filt:
            if key not in ("local", "remote"):
                raise ConfigError(f"{where}.filter.{key}: offramp takes local or remote")
            entries = filt[key]
            if isinstance(entries, str):
                entries = [entries]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ConfigError(f"{where}.filter.{key} must be a list of destinations")
            if key == "local":
                local = tuple(entries)
            else:
                remote = tuple(entries)
    elif value is not None:
        raise ConfigError(f"{where} must be true, false or an object")
    dns_value = network.get("dns")
    dns: bool | None = None
    if isinstance(dns_value, bool):
        dns = dns_value
    elif isinstance(dns_value, dict):
        dns = _bool(dns_value.get("enabled", True), f"{path}: feature.network.dns.enabled")
        ignored += [f"feature.network.dns.{k}" for k in dns_value if k != "enabled"]
    elif dns_value is not None:
        raise ConfigError(f"{path}: feature.network.dns must be true, false or an object")
    return OutgoingConfig(tcp, local, remote, dns, udp), tuple(ignored)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def _mode(value: object, where: str) -> Mode:
    try:
        return Mode(str(value))
    except ValueError:
        raise ConfigError(f'{where} is {value!r}; offramp takes "steal" or "mirror"') from None


def _ignored_top(doc: dict[str, Any]) -> tuple[str, ...]:
    ignored = [k for k in doc if k not in ("feature", "target")]
    feature = doc.get("feature")
    if isinstance(feature, dict):
        ignored += [f"feature.{k}" for k in feature if k not in ("network", "env")]
        network = feature.get("network")
        if isinstance(network, dict):
            ignored += [
                f"feature.network.{k}" for k in network if k not in ("incoming", "outgoing", "dns")
            ]
    return tuple(ignored)


def preview_link(host: str, key: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The link that sets the preview cookie, for `host` (a name, host:port or a URL)."""
    base = host if "://" in host else f"http://{host}"
    return f"{base.rstrip('/')}{prefix}/preview/{key}?to=/"


def announce_preview(key: str, link: str | None) -> str:
    """What `offramp steal --preview KEY` says the user can do."""
    how = (
        f"send header {HEADER}: {key}, or cookie {COOKIE}={key}, or baggage {BAGGAGE_MEMBER}={key}"
    )
    if link is None:
        return f"offramp: preview key {key}: {how} (this workload's sidecar serves no link)"
    return f"offramp: preview key {key}: open {link} in a browser, or {how}"


@dataclass(frozen=True)
class FilterFlags:
    """Filter-related flags; each list may be empty."""

    headers: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    mirror: bool = False
    take_probes: bool = False
    preview: str | None = None

    @property
    def any_filter(self) -> bool:
        return bool(self.headers or self.paths or self.methods)


def build_spec(incoming: FileConfig, flags: FilterFlags, client: str) -> SessionSpec:
    """File first, flags on top; then validate and compile the filter here, so a
    bad one is refused before anything connects."""
    http_filter: dict[str, Any] = dict(incoming.http_filter)
    if flags.any_filter:
        for key in ("header_filter", "path_filter", "method_filter", "all_of", "any_of"):
            http_filter.pop(key, None)
        clauses = (
            [FilterClause(header=h) for h in flags.headers]
            + [FilterClause(path=p) for p in flags.paths]
            + [FilterClause(method=m) for m in flags.methods]
        )
        if len(clauses) == 1:
            only = clauses[0]
            if only.header is not None:
                http_filter["header_filter"] = only.header
            elif only.path is not None:
                http_filter["path_filter"] = only.path
            else:
                http_filter["method_filter"] = only.method
        else:
            http_filter["all_of"] = [c.model_dump(exclude_none=True) for c in clauses]
    if flags.preview is not None:
        http_filter["preview"] = flags.preview
    if flags.ports:
        http_filter["ports"] = list(flags.ports)
    elif "ports" not in http_filter and incoming.ports:
        http_filter["ports"] = list(incoming.ports)
    mode = Mode.MIRROR if flags.mirror else (incoming.mode or Mode.STEAL)
    try:
        spec = SessionSpec(
            mode=mode,
            http_filter=HttpFilterSpec.model_validate(http_filter),
            take_probes=flags.take_probes,
            client=client,
        )
    except ValidationError as e:
        raise ConfigError("; ".join(validation_problems(e, "http_filter"))) from e
    try:
        compile_filter(spec.http_filter)
    except FilterError as e:
        raise ConfigError(str(e)) from e
    return spec


class LocalSettings(BaseModel):
    """Everything `offramp steal` needs, validated once at start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sidecar_url: str = Field(pattern=r"^wss?://")
    token: str
    to_port: int = Field(ge=1, le=65535)
    to_host: str = "127.0.0.1"
    spec: SessionSpec
    timeout: float = Field(default=60.0, ge=0)
    """Seconds the local app may take to answer; 0 waits forever (for breakpoints)."""
    reconnect: bool = True
    mirror_queue: int = Field(default=64, ge=1)
