"""The local proxy's settings: a mirrord-style config file, then flags on top.

From a config file `feature.network.incoming` is read (a mode string, `"steal"`
or `"mirror"`, or an object with `mode`, `http_filter` and `ports`), and
`feature.network.outgoing` (true/false, or an object with `tcp`, `udp` and
`filter: {local: [...]}` or `{remote: [...]}`) and `feature.network.dns`
(true/false, or an object with `enabled`). Files are JSON as mirrord writes
it, trailing commas and comments allowed (JSON5); typographic quotes pasted
from a web page are read as plain quotes, with a note. Keys offramp does not
use are reported as ignored, never silently dropped. Flags override the file:
any filter flag replaces the file's filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import json5
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sidecar.sessions.filters import FilterError, compile_filter
from sidecar.sessions.spec import FilterClause, HttpFilterSpec, Mode, SessionSpec
from sidecar.settings import validation_problems

__all__ = [
    "ConfigError",
    "FilterFlags",
    "LocalSettings",
    "OutgoingConfig",
    "build_spec",
    "load_incoming",
]


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says where and how to fix it."""


_INCOMING_KEYS = {"mode", "http_filter", "ports"}


@dataclass(frozen=True)
class OutgoingConfig:
    """mirrord's `feature.network.outgoing` and `.dns`; None: not in the file."""

    tcp: bool | None = None
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    dns: bool | None = None


@dataclass(frozen=True)
class Incoming:
    mode: Mode | None = None
    http_filter: dict[str, Any] = field(default_factory=dict)
    ports: tuple[int, ...] | None = None
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    outgoing: OutgoingConfig = field(default_factory=OutgoingConfig)


# Typographic double quotes, as pasted from blogs and chat, and the same quotes
# after a UTF-8 -> Mac Roman mix-up (how some published examples carry them).
_SMART_QUOTES = ("\u201c", "\u201d", "\u201e", "\u201a\u00c4\u00fa", "\u201a\u00c4\u00f9")


def _parse(text: str, path: Path) -> tuple[Any, tuple[str, ...]]:
    try:
        return json5.loads(text), ()
    except ValueError as first:
        repaired = text
        for quote in sorted(_SMART_QUOTES, key=len, reverse=True):
            repaired = repaired.replace(quote, '"')
        if repaired != text:
            try:
                note = (
                    f'{path}: read typographic quotes as plain double quotes ("); '
                    "fix the file to silence this"
                )
                return json5.loads(repaired), (note,)
            except ValueError:
                pass
        raise ConfigError(f"{path} is not valid JSON: {first}") from first


def load_incoming(path: Path) -> Incoming:
    """Read `feature.network.incoming` from a mirrord-style config file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    doc, notes = _parse(text, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    network = (
        doc.get("feature", {}).get("network") if isinstance(doc.get("feature"), dict) else None
    )
    outgoing, ignored_out = _outgoing(network if isinstance(network, dict) else {}, path)
    incoming: Any = doc
    for key in ("feature", "network", "incoming"):
        if not isinstance(incoming, dict) or key not in incoming:
            return Incoming(ignored=_ignored_top(doc) + ignored_out, notes=notes,
                            outgoing=outgoing)  # fmt: skip
        incoming = incoming[key]
    where = f"{path}: feature.network.incoming"
    if isinstance(incoming, str):
        return Incoming(mode=_mode(incoming, where), ignored=_ignored_top(doc) + ignored_out,
                        notes=notes, outgoing=outgoing)  # fmt: skip
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
    return Incoming(
        mode, http_filter, tuple(ports) if ports else None,
        ignored + _ignored_top(doc) + ignored_out, notes, outgoing,
    )  # fmt: skip


_OUTGOING_KEYS = {"tcp", "udp", "filter"}


def _outgoing(network: dict[str, Any], path: Path) -> tuple[OutgoingConfig, tuple[str, ...]]:
    """`feature.network.outgoing` and `.dns`, and the keys of them offramp ignores."""
    where = f"{path}: feature.network.outgoing"
    ignored: list[str] = []
    tcp: bool | None = None
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    value = network.get("outgoing")
    if isinstance(value, bool):
        tcp = value
    elif isinstance(value, dict):
        tcp = _bool(value.get("tcp", True), f"{where}.tcp")
        if value.get("udp") is True:
            ignored.append("feature.network.outgoing.udp (offramp carries only DNS over UDP)")
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
    return OutgoingConfig(tcp, local, remote, dns), tuple(ignored)


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
    ignored = [k for k in doc if k != "feature"]
    feature = doc.get("feature")
    if isinstance(feature, dict):
        ignored += [f"feature.{k}" for k in feature if k != "network"]
        network = feature.get("network")
        if isinstance(network, dict):
            ignored += [
                f"feature.network.{k}" for k in network if k not in ("incoming", "outgoing", "dns")
            ]
    return tuple(ignored)


@dataclass(frozen=True)
class FilterFlags:
    """Filter-related flags; each list may be empty."""

    headers: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    mirror: bool = False
    take_probes: bool = False

    @property
    def any_filter(self) -> bool:
        return bool(self.headers or self.paths or self.methods)


def build_spec(incoming: Incoming, flags: FilterFlags, client: str) -> SessionSpec:
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
