"""The app container's env, copied into the sidecar under a prefix and given back:
the rewrite is a pure function, checked against kubelet's expansion rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.appenv import PREFIX, copy_app_env, rewrite_references, take_app_env

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("plain", "plain"),
        ("$(A)", f"$({PREFIX}A)"),
        ("x-$(A)-$(B_2)-y", f"x-$({PREFIX}A)-$({PREFIX}B_2)-y"),
        ("$$(A)", "$$(A)"),  # escaped: kubelet writes a literal $(A)
        ("$$$(A)", f"$$$({PREFIX}A)"),  # an escape, then a reference
        ("$(A", "$(A"),  # unclosed: literal
        ("cost: $5 $", "cost: $5 $"),
        ("$()", f"$({PREFIX})"),
        ("$(a b)", f"$({PREFIX}a b)"),  # kubelet takes anything up to ')'
    ],
)
def test_references_are_rewritten_as_kubelet_reads_them(value: str, want: str) -> None:
    assert rewrite_references(value) == want


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion, written from its documented rules."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if value[i + 1] == "(" and (close := value.find(")", i + 2)) != -1:
                name = value[i + 2 : close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
                continue
            out.append(value[i : i + 2])
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


@given(
    value=st.text(alphabet="$()AB x", max_size=24),
    env=st.dictionaries(st.sampled_from(["A", "B", "AB", ""]), st.text(max_size=4)),
)
def test_the_sidecar_expands_to_what_the_app_would(value: str, env: dict[str, str]) -> None:
    """For any value and defined names: expanding the rewritten value with the
    prefixed names, then taking the prefix off what stayed unresolved, gives what
    the app gets."""
    prefixed = {PREFIX + k: v for k, v in env.items()}
    sidecar = expand(rewrite_references(value), prefixed)
    environ = {PREFIX + "X": sidecar}
    assert take_app_env(environ)["X"] == expand(value, env)


def test_copy_prefixes_names_and_envfrom_and_pins_resource_fields() -> None:
    app = {
        "name": "api",
        "env": [
            {"name": "DB_HOST", "value": "db"},
            {"name": "DB_URL", "value": "postgres://$(DB_HOST):5432/$(UNSET)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {
                "name": "CPU",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "containerName": "x"}},
            },
            {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        ],
        "envFrom": [
            {"configMapRef": {"name": "settings"}},
            {"prefix": "S_", "secretRef": {"name": "creds", "optional": True}},
        ],
    }
    before = repr(app)
    env, env_from = copy_app_env(app)
    assert repr(app) == before, "the app container is not changed"
    names = ("DB_HOST", "DB_URL", "POD", "MEM", "CPU", "PASS")
    assert [e["name"] for e in env] == [PREFIX + n for n in names]
    assert env[1]["value"] == f"postgres://$({PREFIX}DB_HOST):5432/$({PREFIX}UNSET)"
    assert env[2]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env[3]["valueFrom"]["resourceFieldRef"]["containerName"] == "api"
    assert env[4]["valueFrom"]["resourceFieldRef"]["containerName"] == "x"
    assert env[5]["valueFrom"] == {"secretKeyRef": {"name": "db", "key": "password"}}
    assert env_from == [
        {"prefix": PREFIX, "configMapRef": {"name": "settings"}},
        {"prefix": PREFIX + "S_", "secretRef": {"name": "creds", "optional": True}},
    ]


def test_names_that_already_carry_the_prefix_come_back_whole() -> None:
    env, _ = copy_app_env({"name": "a", "env": [{"name": PREFIX + "X", "value": "1"},
                                               {"name": "X", "value": "2"}]})  # fmt: skip
    environ = {e["name"]: e["value"] for e in env}
    assert take_app_env(environ) == {PREFIX + "X": "1", "X": "2"}


def test_take_removes_the_apps_names_and_keeps_service_links_under_the_apps() -> None:
    environ = {
        "PATH": "/opt/offramp/bin:/usr/bin",
        "HOME": "/home/offramp",
        "OFFRAMP_OUTGOING_ALLOW": "",
        "REDIS_SERVICE_HOST": "10.0.0.7",
        "REDIS_SERVICE_PORT": "6379",
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
        "KUBERNETES_PORT": "tcp://10.0.0.1:443",
        PREFIX + "PATH": "/app/bin",
        PREFIX + "PYTHONPATH": "/junk",
        PREFIX + "REDIS_SERVICE_PORT": "7000",
        PREFIX + "URL": f"redis://$({PREFIX}REDIS_SERVICE_HOST):1/$({PREFIX}HOSTNAME)",
        PREFIX + "1st": "a ConfigMap key kubelet skipped for the app",
    }
    app = take_app_env(environ)
    assert app == {
        "REDIS_SERVICE_HOST": "10.0.0.7",
        "REDIS_SERVICE_PORT": "7000",  # the app's own wins, as kubelet orders them
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
        "KUBERNETES_PORT": "tcp://10.0.0.1:443",
        "PATH": "/app/bin",
        "PYTHONPATH": "/junk",
        # A service link resolves; HOSTNAME is the runtime's, not kubelet's: left as written.
        "URL": "redis://10.0.0.7:1/$(HOSTNAME)",
    }
    assert not [k for k in environ if k.startswith(PREFIX)]
    assert environ["PATH"] == "/opt/offramp/bin:/usr/bin"
