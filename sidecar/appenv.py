"""The app container's environment, carried by the sidecar for the developer's process.

At injection the app container's `env` and `envFrom` are copied into the
sidecar container with every name under PREFIX (`copy_app_env`): kubelet then
resolves ConfigMap and Secret values, fieldRefs and `$(VAR)` references for the
sidecar exactly as it does for the app, the user who steals needs no RBAC on
Secrets, and the app's PYTHONPATH or PYTHONHOME never reach the sidecar's own
Python (it sees OFFRAMP_APP_PYTHONPATH). At start the sidecar takes those names
out of its own environment again (`take_app_env`), so that nothing it runs
inherits them, and serves the un-prefixed set to a caller with the token.

Kubernetes' `$(NAME)` syntax, as kubelet expands it: `$$` is a literal `$`,
`$(NAME)` is replaced by NAME's value when NAME is defined earlier in the
container's env, by envFrom, or as a service link variable, else left as
written; any other `$` is literal. `copy_app_env` rewrites every reference to
the prefixed name and leaves everything else byte for byte. A reference kubelet
could not resolve in the sidecar is then `$(OFFRAMP_APP_NAME)`; `take_app_env`
gives it NAME's service link value, or writes it back as `$(NAME)`, which is
what the app sees.

Service link variables (`REDIS_SERVICE_HOST`, `REDIS_PORT_6379_TCP`, ...) are
the same in every container of a pod; they are served from the sidecar's own
environment, under the app's own variables of the same name, as kubelet
orders them. Variables that the app's image sets (its Dockerfile's ENV) are not
in the pod spec, so they are not carried. A ConfigMap or Secret key that is no
variable name (`1st`) is left out, as kubelet leaves it out of the app's
environment (with Kubernetes' relaxed name validation, on by default from 1.32,
the app would have it).

Pure: no I/O.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["PREFIX", "copy_app_env", "rewrite_references", "take_app_env"]

PREFIX = "OFFRAMP_APP_"

_SERVICE_LINK = re.compile(
    r"[A-Z_][A-Z0-9_]*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)"
    r"(_PROTO|_PORT|_ADDR)?)?)"
)
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_UNRESOLVED = re.compile(r"\$\(" + PREFIX + r"([^)]*)\)")


def rewrite_references(value: str, prefix: str = PREFIX) -> str:
    """`value` with every `$(NAME)` reference made `$(PREFIX NAME)`, scanned as
    kubelet's expansion scans it; escapes (`$$`) and lone `$` stay as they are."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(value):
        if value[cursor] == "$" and cursor + 1 < len(value):
            nxt = value[cursor + 1]
            if nxt == "(":
                close = value.find(")", cursor + 2)
                if close != -1:
                    out.append(value[checkpoint:cursor])
                    out.append(f"$({prefix}{value[cursor + 2 : close]})")
                    cursor = close + 1
                    checkpoint = cursor
                    continue
            # `$$`, `$x` and an unclosed `$(`: the `$` and the next character are
            # consumed together and are literal.
            cursor += 2
            continue
        cursor += 1
    out.append(value[checkpoint:])
    return "".join(out)


def copy_app_env(app: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The app container's `env` and `envFrom`, for the sidecar: every name under
    PREFIX (envFrom by its `prefix` field), `$(VAR)` references rewritten to match,
    and resourceFieldRefs pinned to the app container (without `containerName`
    they would read the sidecar's own resources). Order is kept, so that
    duplicates and references resolve in the sidecar as in the app."""
    env: list[dict[str, Any]] = []
    for var in app.get("env") or []:
        item = copy.deepcopy(dict(var))
        item["name"] = PREFIX + str(var["name"])
        if isinstance(item.get("value"), str):
            item["value"] = rewrite_references(item["value"])
        ref = (item.get("valueFrom") or {}).get("resourceFieldRef")
        if isinstance(ref, dict) and not ref.get("containerName"):
            ref["containerName"] = app["name"]
        env.append(item)
    env_from: list[dict[str, Any]] = []
    for source in app.get("envFrom") or []:
        item = copy.deepcopy(dict(source))
        item["prefix"] = PREFIX + str(source.get("prefix") or "")
        env_from.append(item)
    return env, env_from


def take_app_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Take the app's variables out of `environ` (the sidecar's own) and return
    the app container's environment as the app sees it."""
    mine = {k: environ.pop(k) for k in [k for k in environ if k.startswith(PREFIX)]}
    service = {k: v for k, v in environ.items() if _SERVICE_LINK.fullmatch(k)}

    def unresolved(match: re.Match[str]) -> str:
        name = match.group(1)
        return service.get(name, f"$({name})")

    app = {
        name: _UNRESOLVED.sub(unresolved, value)
        for prefixed, value in mine.items()
        # A ConfigMap key that is no variable name ("1st") became one under the
        # prefix; kubelet skipped it for the app (as Kubernetes up to 1.31 does).
        if _ENV_NAME.fullmatch(name := prefixed.removeprefix(PREFIX))
    }
    return {**service, **app}
