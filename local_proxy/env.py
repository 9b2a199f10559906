"""The pod's environment for the local process: fetched, chosen, written.

The sidecar serves the app container's environment (`GET /v1/env`, token
required; see `sidecar.appenv`). Which of it the local process gets is
mirrord's `feature.env`:
- `include`: only these names; `exclude`: all but these. Entries are names with
  `*` and `?` wildcards, as a list or one string separated by `;`. Not both.
- DEFAULT_EXCLUDE: names that describe the machine rather than the service
  (PATH, HOME, interpreter paths...) are left out unless `include` names them.
- `override`: NAME -> value, set whatever the pod has; `unset`: names taken
  out of the local process's environment, wherever they came from.
The local process starts with this machine's environment, then the pod's
chosen variables over it, then `override`, then `unset`.

Values are never printed or logged; `describe` gives names only. `--env-file`
writes the chosen variables as a dotenv file, mode 0600.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_EXCLUDE",
    "EnvConfig",
    "EnvError",
    "describe",
    "dotenv",
    "fetch_env",
    "patterns",
    "write_env_file",
]

ENV_PATH = "/v1/env"

DEFAULT_EXCLUDE = (
    # The machine and the shell
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "TERM", "HOSTNAME",
    "TMPDIR", "TMP", "TEMP", "LANG", "LANGUAGE", "LC_*", "TZ", "DISPLAY", "SSH_*", "XDG_*",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_*",
    # Interpreters and toolchains: paths inside the image
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "JAVA_HOME", "CLASSPATH", "GOPATH", "GOROOT",
    "GOBIN", "NODE_PATH", "NVM_DIR", "RUBYLIB", "GEM_HOME", "GEM_PATH", "BUNDLE_PATH",
    "PERL5LIB", "CARGO_HOME", "RUSTUP_HOME", "DOTNET_ROOT",
    # In-cluster client configuration would look for the pod's service account
    # token, which this machine does not have, instead of the kubeconfig.
    "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
)  # fmt: skip


class EnvError(Exception):
    """The environment could not be had; the message says why."""


def patterns(value: object, where: str) -> tuple[str, ...]:
    """mirrord's form: a list of names, or one string of names separated by `;`."""
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [p for v in value for p in v.split(";")]
    else:
        raise ValueError(f'{where} must be a list of names or one string like "A;B_*"')
    return tuple(p.strip() for p in items if p.strip())


@dataclass(frozen=True)
class EnvConfig:
    """mirrord's `feature.env`, flags over the file."""

    enabled: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    override: Mapping[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.include and self.exclude:
            raise ValueError(
                "give include or exclude, not both: include takes only the names it lists, "
                "exclude takes all the others"
            )

    def chosen(self, remote: Mapping[str, str]) -> dict[str, str]:
        """The pod's variables the local process gets (before override and unset)."""
        if not self.enabled:
            return {}
        if self.include:
            return {k: v for k, v in remote.items() if _any(k, self.include)}
        dropped = (*DEFAULT_EXCLUDE, *self.exclude)
        return {k: v for k, v in remote.items() if not _any(k, dropped)}

    def environment(self, local: Mapping[str, str], remote: Mapping[str, str]) -> dict[str, str]:
        """The local process's whole environment."""
        out = {**local, **self.chosen(remote), **self.override}
        for name in [k for k in out if _any(k, self.unset)]:
            del out[name]
        return out

    def for_file(self, remote: Mapping[str, str]) -> dict[str, str]:
        """What `--env-file` writes: the chosen variables and overrides, less unset."""
        out = {**self.chosen(remote), **self.override}
        return {k: v for k, v in out.items() if not _any(k, self.unset)}


def _any(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def describe(names: Mapping[str, str] | list[str]) -> str:
    """A line for the terminal: how many variables, and their names, never values."""
    listed = sorted(names)
    if not listed:
        return "no variables"
    shown = ", ".join(listed[:12]) + (f" and {len(listed) - 12} more" if len(listed) > 12 else "")
    return f"{len(listed)} variable{'s' if len(listed) != 1 else ''} ({shown})"


def fetch_env(sock: socket.socket, host: str, token: str, timeout: float = 15.0) -> dict[str, str]:
    """GET /v1/env over a connected socket (closed after). Raises EnvError."""
    conn = http.client.HTTPConnection(host, timeout=timeout)
    sock.settimeout(timeout)
    conn.sock = sock
    try:
        conn.request("GET", ENV_PATH, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise EnvError(f"the sidecar did not answer {ENV_PATH}: {e}") from e
    finally:
        conn.close()
    if response.status == 404:
        raise EnvError(
            "the sidecar is older than this offramp and serves no environment; run offramp "
            "steal with a current image (--image), which re-injects it"
        )
    if response.status != 200:
        text = body.decode(errors="replace").strip()
        raise EnvError(f"the sidecar refused {ENV_PATH}: {response.status} {text}")
    try:
        env = json.loads(body)["env"]
    except (ValueError, KeyError, TypeError) as e:
        raise EnvError(f"the sidecar's {ENV_PATH} answer is not what offramp reads: {e}") from e
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise EnvError(f"the sidecar's {ENV_PATH} answer is not a map of strings")
    return env


def dotenv(env: Mapping[str, str]) -> str:
    """`NAME='value'` lines as python-dotenv and Docker Compose read them: single
    quotes, with `\\` and `\'` the only escapes; a line break stays a line break
    inside the quotes. (Compose expands no `${VAR}` in single quotes; python-dotenv
    expands it in any value unless asked not to, `interpolate=False`.)"""
    lines = []
    for name in sorted(env):
        value = env[name].replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + ("\n" if lines else "")


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """Write the dotenv file, readable by its owner only (it may hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(os.fdopen(fd, "w"))
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(dotenv(env))
