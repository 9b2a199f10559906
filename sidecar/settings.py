"""The sidecar's settings: flags and environment become one validated object at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sidecar.basics import (
    HEADER_TIMEOUT,
    HEALTH_PORT,
    IDLE_TIMEOUT,
    IDLE_TIMEOUT_ANNOTATION,
    IDLE_TIMEOUT_ENV,
    Capture,
    TokenError,
    loose_token_file,
    read_token,
)

__all__ = [
    "HEADER_TIMEOUT",
    "HEALTH_PORT",
    "IDLE_TIMEOUT",
    "IDLE_TIMEOUT_ANNOTATION",
    "IDLE_TIMEOUT_ENV",
    "AppPort",
    "Capture",
    "SidecarSettings",
    "TokenError",
    "describe_validation_error",
    "loose_token_file",
    "read_token",
]


class AppPort(BaseModel):
    """An app port and the sidecar listener that fronts it (0: any free port)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app: int = Field(ge=1, le=65535)
    listen: int = Field(ge=0, le=65535)

    @classmethod
    def parse(cls, text: str, default_listen: int) -> AppPort:
        """`8080` or `8080:15080`."""
        app, _, listen = text.partition(":")
        try:
            return cls(app=int(app), listen=int(listen) if listen else default_listen)
        except ValueError:
            raise ValueError(
                f"--app-port {text!r}: write PORT or PORT:LISTEN_PORT, e.g. 8080 or 8080:15080"
            ) from None


class SidecarSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    app_ports: tuple[AppPort, ...] = Field(min_length=1)
    listen_host: str = "0.0.0.0"
    control_port: int = Field(default=15081, ge=0, le=65535)
    control_host: str = "0.0.0.0"
    app_host: str = "127.0.0.1"
    token: str | None
    """None: the token file does not exist yet (its Secret may be created later);
    sessions are refused until it does, while traffic flows to the app."""
    token_file: Path | None = None
    capture: Capture = Capture.IPTABLES
    iptables: str = "iptables"
    close_existing: bool = True
    probe_paths: frozenset[str] = frozenset()
    drain_timeout: float = Field(default=10.0, ge=0)
    workers: int = Field(default=1, ge=1, le=64)
    """Proxy processes sharing each listen port (sidecar.proxy.workers)."""
    header_timeout: float = Field(default=HEADER_TIMEOUT, ge=0)
    """0: request heads are not timed."""
    app_connect: Literal["request", "accept"] = "request"
    """When the app connection opens (sidecar.proxy.connections)."""
    resolv_conf: Path = Path("/etc/resolv.conf")
    """The pod's resolver, for sessions' outgoing DNS (sidecar.outgoing.resolver)."""
    outgoing_allow: tuple[str, ...] | None = None
    """The admin's allow-list of outgoing destinations (sidecar.outgoing.policy);
    None: no list. Checked by the CLI with sidecar.outgoing.rules."""
    session_idle_timeout: float = Field(default=IDLE_TIMEOUT, ge=1)
    """Seconds a session's client may stay silent before its session is closed."""
    preview_prefix: str | None = "/__offramp"
    """Where the sidecar answers the preview link itself (sidecar.sessions.preview);
    None: nowhere (the app owns every path). Checked by the CLI."""

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        used = [p.app for p in self.app_ports] + [p.listen for p in self.app_ports if p.listen]
        used += [self.control_port] if self.control_port else []
        if len(set(used)) != len(used):
            raise ValueError(
                f"the app ports, listen ports and control port must all differ, got {used}"
            )
        return self


def validation_problems(error: ValidationError, prefix: str = "") -> list[str]:
    """Each problem as `where: what is wrong`; `prefix` goes before each location."""
    lines = []
    for problem in error.errors():
        where = ".".join(
            [prefix, *map(str, problem["loc"])] if prefix else map(str, problem["loc"])
        )
        where = where or "(top level)"
        message = problem["msg"]
        if problem["type"] == "value_error":
            # Our own validators' messages: without pydantic's prefix, and without
            # the location where the message already starts with its key.
            message = message.removeprefix("Value error, ")
            if message.startswith(("http_filter", where)):
                lines.append(message)
                continue
        lines.append(f"{where}: {message}")
    return lines


def describe_validation_error(error: ValidationError, what: str = "session spec") -> str:
    """One line per problem: where it is, what is wrong."""
    return f"invalid {what}: " + "; ".join(validation_problems(error))
