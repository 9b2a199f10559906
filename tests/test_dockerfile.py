"""The Dockerfile agrees with the package: what it runs exists, its Python
satisfies pyproject.toml, it installs every dependency the sidecar needs pinned
to a version pyproject allows (and nothing only the laptop uses), and it runs
unprivileged as the injected pod spec expects. This reads the files;
tests/image builds the image and runs it under a container runtime."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

import jsonpatch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from sidecar.inject.patch import SIDECAR_NAME, InjectOptions, inject

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


LAPTOP_ONLY = {"kubernetes", "httpx", "json5", "dnspython"}
"""Dependencies only `offramp` on the laptop imports (the import-linter contract
"the sidecar imports no laptop-only library" holds the sidecar to it); the
image leaves them and theirs out (kubernetes alone is 41 MB)."""


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "requirements/sidecar.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"{line!r} is not pinned with =="
            out[canonicalize_name(name)] = version
    return out


def test_every_dependency_the_sidecar_needs_is_pinned_to_a_version_pyproject_allows() -> None:
    pinned = pins()
    for text in PYPROJECT["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in LAPTOP_ONLY:
            assert name not in pinned, f"{req.name} is laptop-only but the image installs it"
            continue
        assert name in pinned, f"{req.name} is a dependency but requirements/sidecar.txt lacks it"
        assert pinned[name] in req.specifier, f"{req.name}=={pinned[name]} does not satisfy {req}"
    assert "requirements/sidecar.txt" in DOCKERFILE


def test_the_pins_are_exactly_what_the_sidecar_dependencies_need() -> None:
    """The closure of the sidecar's dependencies' requirements, read from the
    installed packages' metadata: nothing missing (the image would not start),
    nothing extra (it would carry what it never loads)."""
    roots = [
        Requirement(t).name
        for t in PYPROJECT["project"]["dependencies"]
        if canonicalize_name(Requirement(t).name) not in LAPTOP_ONLY
    ]
    needed: set[str] = set()
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in needed:
            continue
        needed.add(name)
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    pinned = set(pins())
    assert not needed - pinned, f"requirements/sidecar.txt lacks {sorted(needed - pinned)}"
    assert not pinned - needed, f"requirements/sidecar.txt has unneeded {sorted(pinned - needed)}"


def test_the_file_capabilities_stay_within_what_the_injection_grants() -> None:
    """A binary whose file capabilities exceed the container's bounding set cannot
    run at all; the ones the default capture uses carry only what is granted."""
    granted = {
        "cap_" + c.lower()
        for c in _sidecar_security(InjectOptions(image="x"))["capabilities"]["add"]
    }
    setcaps = dict(
        (path, caps.split("+")[0].split(","))
        for caps, path in re.findall(r"setcap (\S+) (\S+)", DOCKERFILE)
    )
    for path in ("/usr/sbin/xtables-nft-multi", "/bin/ss"):
        assert path in setcaps, f"the Dockerfile gives {path} no file capability"
        extra = set(setcaps[path]) - granted
        assert not extra, f"{path} carries {extra}, which the injection does not grant"


def _sidecar_security(options: InjectOptions) -> dict[str, object]:
    template = {"spec": {"containers": [{"name": "app", "ports": [{"containerPort": 80}]}]}}
    pod = jsonpatch.apply_patch(template, inject(template, options))
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME)
    security: dict[str, object] = sidecar["securityContext"]
    return security
