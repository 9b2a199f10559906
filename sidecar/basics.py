"""What the sidecar's start needs before its heavier parts load: the capture
modes, the defaults that flags and annotations share, and the token file.

No pydantic, websockets or mitmproxy here: the lightweight primary
(`sidecar.primary`) imports this, and an idle sidecar is that primary alone.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

__all__ = [
    "ENGINE_LINGER",
    "HANDOVER_ENV",
    "HEADER_TIMEOUT",
    "HEALTH_PORT",
    "IDLE_TIMEOUT",
    "IDLE_TIMEOUT_ANNOTATION",
    "IDLE_TIMEOUT_ENV",
    "Capture",
    "Engine",
    "TokenError",
    "loose_token_file",
    "read_token",
]


class Capture(StrEnum):
    IPTABLES = "iptables"
    NONE = "none"


class Engine(StrEnum):
    """When the proxy engine (mitmproxy, the session server) runs."""

    ON_DEMAND = "on-demand"
    """From the first connection to the control port until ENGINE_LINGER seconds
    after the last session; meanwhile the primary passes traffic to the app."""
    ALWAYS = "always"
    """From start to stop, as a child of the primary that restarts it if it dies."""


IDLE_TIMEOUT = 120.0
"""Seconds a session's client may stay silent before its session is closed."""
IDLE_TIMEOUT_ENV = "OFFRAMP_SESSION_IDLE_TIMEOUT"
IDLE_TIMEOUT_ANNOTATION = "offramp.dev/session-idle-timeout"
"""On a pod: its sidecar's idle timeout in seconds; injection passes it on as
IDLE_TIMEOUT_ENV."""

HEADER_TIMEOUT = 20.0
"""Seconds a request head may take from its first byte (nginx allows 60, Apache's
mod_reqtimeout 20); see sidecar.proxy.connections."""

HEALTH_PORT = 15079
"""The primary's own `GET /healthz` port: kubelet's probes never wake the engine.
Not one of Istio's (15000-15021, 15053, 15090) nor Linkerd's (4140-4191) ports."""

ENGINE_LINGER = 120.0
"""Seconds the engine stays after the last session ends (`--engine-linger`):
a developer's next run within that time opens its session at once."""


HANDOVER_ENV = "OFFRAMP_ENGINE_HANDOVER"
"""In the engine's environment: the primary's sockets it adopts (JSON)."""


class TokenError(ValueError):
    """The token file is missing, unreadable or empty."""


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read the token file {path}: {e.strerror}") from e
    if len(token) < 16:
        raise TokenError(
            f"the token in {path} is {'empty' if not token else 'shorter than 16 characters'}; "
            "write a long random token there, e.g. `openssl rand -hex 32 > token`"
        )
    return token


def loose_token_file(path: Path) -> str | None:
    """A warning when others than its owner may read the token file (as ssh warns
    of a private key), else None. Not for a Kubernetes Secret volume: its modes are
    the kubelet's (`defaultMode`), and the container's user is its only reader."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077 or (path.parent / "..data").exists():
        return None
    return (
        f"the token file {path} may be read by others than its owner (mode {mode:o}); "
        f"whoever reads it can open sessions: chmod 600 {path}"
    )
