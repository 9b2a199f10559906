"""The Dockerfile agrees with the package: what it runs exists, its Python
satisfies pyproject.toml, it installs every dependency pinned to a version
pyproject allows, and it runs unprivileged as the injected pod spec expects.
(No container engine runs here; this reads the files.)"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sidecar.inject import InjectOptions

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        line.split(None, 1)[1].strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and line.split()[0] == name
    ]


def test_it_starts_with_a_comment_that_says_how_to_build_it() -> None:
    head = DOCKERFILE.split("FROM", 1)[0]
    assert "docker build" in head and head.lstrip().startswith("#")


def test_every_stage_is_python_slim_and_that_python_satisfies_pyproject() -> None:
    stages = instructions("FROM")
    assert len(stages) >= 2, "multi-stage: a build stage and a small runtime stage"
    wanted = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for stage in stages:
        m = re.fullmatch(r"python:(\d+\.\d+)-slim( AS \w+)?", stage)
        assert m, f"FROM {stage}: expected python:X.Y-slim"
        assert m[1] in wanted, f"Python {m[1]} does not satisfy requires-python {wanted}"


def test_the_entrypoint_is_a_script_the_package_installs() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    argv = json.loads(entrypoint)
    assert argv[0] in PYPROJECT["project"]["scripts"]
    assert PYPROJECT["project"]["scripts"][argv[0]] == "sidecar.cli:main"


def test_it_runs_as_the_unprivileged_user_the_pod_spec_names() -> None:
    (user,) = instructions("USER")
    assert user == str(InjectOptions(image="x").run_as_user) != "0"
    code = "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#"))
    assert "privileged" not in code


def test_what_it_copies_exists() -> None:
    for copy in instructions("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_every_dependency_is_pinned_to_a_version_pyproject_allows() -> None:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements/sidecar.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"{line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    for text in PYPROJECT["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but requirements/sidecar.txt lacks it"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} does not satisfy {req}"
    assert "requirements/sidecar.txt" in DOCKERFILE
