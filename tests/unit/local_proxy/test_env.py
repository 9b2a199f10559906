"""Which of the pod's variables the local process gets (mirrord's feature.env),
and the dotenv file `--env-file` writes."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import given
from hypothesis import strategies as st

from local_proxy.env import DEFAULT_EXCLUDE, EnvConfig, describe, dotenv, patterns, write_env_file

pytestmark = pytest.mark.timeout(30)

POD = {
    "DB_URL": "postgres://db/x",
    "DB_PASSWORD": "s3cret",
    "FEATURE_X": "on",
    "PATH": "/app/bin",
    "PYTHONPATH": "/app/lib",
    "LC_ALL": "C.UTF-8",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "REDIS_SERVICE_HOST": "10.0.0.7",
    "AWS_PROFILE": "pod",
}
LOCAL = {"PATH": "/usr/bin", "HOME": "/home/me", "AWS_PROFILE": "me", "EDITOR": "vim"}


def test_by_default_the_machines_variables_stay_this_machines() -> None:
    env = EnvConfig().environment(LOCAL, POD)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/me" and "PYTHONPATH" not in env
    assert "LC_ALL" not in env and "KUBERNETES_SERVICE_HOST" not in env
    assert env["DB_URL"] == "postgres://db/x" and env["REDIS_SERVICE_HOST"] == "10.0.0.7"
    assert env["AWS_PROFILE"] == "pod", "the pod's value wins over this machine's"
    assert env["EDITOR"] == "vim"


def test_include_takes_only_what_it_names_even_a_default_excluded_one() -> None:
    env = EnvConfig(include=("DB_*", "PATH")).environment(LOCAL, POD)
    assert {k: v for k, v in env.items() if v != LOCAL.get(k)} == {
        "DB_URL": "postgres://db/x",
        "DB_PASSWORD": "s3cret",
        "PATH": "/app/bin",
    }


def test_exclude_unset_and_override() -> None:
    config = EnvConfig(
        exclude=("DB_PASS?ORD", "FEATURE_*"),
        override={"FEATURE_X": "off", "NEW": "1"},
        unset=("AWS_PROFILE", "EDITOR"),
    )
    env = config.environment(LOCAL, POD)
    assert "DB_PASSWORD" not in env and env["DB_URL"] == "postgres://db/x"
    assert env["FEATURE_X"] == "off" and env["NEW"] == "1"
    assert "AWS_PROFILE" not in env and "EDITOR" not in env, "unset takes local ones too"
    assert config.for_file(POD) == {
        "DB_URL": "postgres://db/x",
        "REDIS_SERVICE_HOST": "10.0.0.7",
        "FEATURE_X": "off",
        "NEW": "1",
    }


def test_disabled_gives_nothing_of_the_pods() -> None:
    assert EnvConfig(enabled=False).environment(LOCAL, POD) == LOCAL


def test_include_and_exclude_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        EnvConfig(include=("A",), exclude=("B",))


def test_patterns_take_lists_and_semicolons() -> None:
    assert patterns("A;B_*; C ;", "x") == ("A", "B_*", "C")
    assert patterns(["A;B", "C"], "x") == ("A", "B", "C")
    with pytest.raises(ValueError, match="x must be a list of names"):
        patterns({"A": 1}, "x")


def test_the_default_list_names_the_interpreters_paths() -> None:
    for name in ("PATH", "HOME", "PYTHONPATH", "PYTHONHOME", "JAVA_HOME", "GOPATH"):
        assert name in DEFAULT_EXCLUDE


def test_describe_names_never_values() -> None:
    line = describe(POD)
    assert line.startswith("9 variables (AWS_PROFILE, DB_PASSWORD")
    assert "s3cret" not in line
    assert describe({}) == "no variables"


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=40) | st.text("${}()'\"\\\n\r\t $AB", max_size=20),
        max_size=8,
    )
)  # fmt: skip
def test_dotenv_reads_back_exactly_with_python_dotenv(env: dict[str, str]) -> None:
    read = dotenv_values(stream=io.StringIO(dotenv(env)), interpolate=False)
    assert read == env


def test_the_env_file_is_private_also_when_it_existed(tmp_path: Path) -> None:
    path = tmp_path / "api.env"
    path.write_text("old")
    path.chmod(0o644)
    write_env_file(path, {"A": "1", "B": 'it\'s "quoted"\n$(X) ${HOME}'})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert dotenv_values(path, interpolate=False) == {"A": "1", "B": 'it\'s "quoted"\n$(X) ${HOME}'}
