"""The sidecar's settings: flags and environment become one validated object at start."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Capture", "SidecarSettings", "TokenError", "read_token"]


class Capture(StrEnum):
    NONE = "none"


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


class SidecarSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    app_port: int = Field(ge=1, le=65535)
    listen_port: int = Field(default=15080, ge=0, le=65535)
    listen_host: str = "0.0.0.0"
    control_port: int = Field(default=15081, ge=0, le=65535)
    control_host: str = "0.0.0.0"
    app_host: str = "127.0.0.1"
    token: str
    capture: Capture = Capture.NONE
    probe_paths: frozenset[str] = frozenset()
    drain_timeout: float = Field(default=10.0, ge=0)
    log_level: str = "info"

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        used = [p for p in (self.app_port, self.listen_port, self.control_port) if p]
        if len(set(used)) != len(used):
            raise ValueError(
                f"--app-port {self.app_port}, --listen-port {self.listen_port} and "
                f"--control-port {self.control_port} must all differ"
            )
        return self
