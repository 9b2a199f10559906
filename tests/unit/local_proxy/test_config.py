"""mirrord-style config files, and flags on top of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from local_proxy.config import (
    ConfigError,
    FileConfig,
    FileTarget,
    FilterFlags,
    build_spec,
    load_config,
)
from local_proxy.env import EnvConfig
from sidecar.sessions.spec import Mode

pytestmark = pytest.mark.timeout(10)

# The repository root is three levels up; the shared seeds sit beside it.
SEEDS = Path(__file__).resolve().parents[3].parent / "shared" / "seeds"


def json_blocks(text: str) -> list[str]:
    """The JSON objects written at the start of a line in a markdown document."""
    blocks, current = [], None
    for line in text.splitlines():
        if current is None and line.rstrip() == "{":
            current = [line]
        elif current is not None:
            current.append(line)
            if line.rstrip() == "}":
                blocks.append("\n".join(current))
                current = None
    return blocks


def seed_examples() -> list[str]:
    if not SEEDS.is_dir():
        return []
    return [b for doc in sorted(SEEDS.glob("*.md")) for b in json_blocks(doc.read_text())]


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"shared seeds not found at {SEEDS}")
def test_every_seed_example_loads_as_written(tmp_path: Path) -> None:
    examples = [e for e in seed_examples() if '"incoming"' in e]
    assert len(examples) >= 5, f"expected the seed documents' examples, found {len(examples)}"
    for i, example in enumerate(examples):
        path = tmp_path / f"seed{i}.json"
        path.write_text(example)
        spec = build_spec(load_config(path), FilterFlags(), "test")
        assert spec.mode is Mode.STEAL, example


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirrord.json"
    path.write_text(text)
    return path


def test_object_form_with_trailing_commas_and_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """{
          // our team's preview config
          "feature": {"network": {"incoming": {
            "mode": "steal",
            "http_filter": {"header_filter": "^x-preview: carol$", "ports": [8080,],},
          },},},
          "target": "deploy/api",
        }""",
    )
    incoming = load_config(path)
    assert incoming.ignored == ()
    assert incoming.target == FileTarget("deployment/api")
    spec = build_spec(incoming, FilterFlags(), "me")
    assert spec.http_filter.header_filter == "^x-preview: carol$"
    assert spec.http_filter.ports == (8080,)


def test_string_form(tmp_path: Path) -> None:
    incoming = load_config(write(tmp_path, '{"feature": {"network": {"incoming": "mirror"}}}'))
    assert build_spec(incoming, FilterFlags(), "me").mode is Mode.MIRROR


def test_incoming_ports_apply_when_the_filter_names_none(tmp_path: Path) -> None:
    text = '{"feature": {"network": {"incoming": {"mode": "steal", "ports": [9000]}}}}'
    spec = build_spec(load_config(write(tmp_path, text)), FilterFlags(), "me")
    assert spec.http_filter.ports == (9000,)


def test_flags_override_the_file(tmp_path: Path) -> None:
    text = """{"feature": {"network": {"incoming": {"mode": "steal",
              "http_filter": {"path_filter": "^/api", "ports": [8080]}}}}}"""
    incoming = load_config(write(tmp_path, text))
    spec = build_spec(incoming, FilterFlags(headers=("^x-a: 1$",), mirror=True), "me")
    assert spec.mode is Mode.MIRROR
    assert spec.http_filter.path_filter is None
    assert spec.http_filter.header_filter == "^x-a: 1$"
    assert spec.http_filter.ports == (8080,)
    spec = build_spec(incoming, FilterFlags(headers=("a",), paths=("^/b",), ports=(81,)), "me")
    assert spec.http_filter.all_of is not None and len(spec.http_filter.all_of) == 2
    assert spec.http_filter.ports == (81,)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{not json", ":1:6: not valid JSON"),
        ('{"feature": {"network": {"incoming": "off"}}}', 'offramp takes "steal" or "mirror"'),
        ('{"feature": {"network": {"incoming": 3}}}', "must be"),
        (
            '{"feature": {"network": {"incoming": {"http_filter": {"header_filter": "(x"}}}}}',
            "http_filter.header_filter: invalid regex",
        ),
        (
            '{"feature": {"network": {"incoming": {"http_filter": {"headers": "x"}}}}}',
            "http_filter.headers: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        build_spec(load_config(write(tmp_path, text)), FilterFlags(), "me")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Path("/nonexistent/mirrord.json"))


def test_no_file_no_flags_steals_everything() -> None:
    spec = build_spec(FileConfig(), FilterFlags(), "me")
    assert spec.mode is Mode.STEAL and spec.http_filter.is_empty


def test_typographic_quotes_are_read_as_plain_quotes_with_a_note(tmp_path: Path) -> None:
    text = '{"target": \u201cpod/api\u201d, "feature": {"network": {"incoming": "steal"}}}'
    incoming = load_config(write(tmp_path, text))
    assert incoming.mode is Mode.STEAL
    assert len(incoming.notes) == 1 and "typographic quotes" in incoming.notes[0]
    assert ":1:12: read typographic quotes" in incoming.notes[0]
    assert incoming.target == FileTarget("pod/api")


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"shared seeds not found at {SEEDS}")
def test_every_seed_snippet_loads_or_is_refused_with_line_and_column(tmp_path: Path) -> None:
    """All JSON blocks of the four seed documents, whatever they configure."""
    docs = sorted(SEEDS.glob("*.md"))
    assert len(docs) == 4
    loaded, refused = 0, 0
    for doc in docs:
        for i, block in enumerate(json_blocks(doc.read_text())):
            path = tmp_path / f"{doc.stem}-{i}.json"
            path.write_text(block)
            try:
                config = load_config(path)
            except ConfigError as e:
                assert re.match(rf"{re.escape(str(path))}:\d+:\d+: ", str(e)), str(e)
                refused += 1
                continue
            build_spec(config, FilterFlags(), "me")
            loaded += 1
    # One block (outgoing-filter-blog.md's first) lacks a quote; the rest load.
    assert refused == 1 and loaded >= 7, (loaded, refused)


@pytest.mark.parametrize(
    ("target", "want"),
    [
        ('"pod/uwu-app"', FileTarget("pod/uwu-app")),
        ('"deploy/api"', FileTarget("deployment/api")),
        ('"statefulset/db/container/main"', FileTarget("statefulset/db", "main")),
        (
            '{"path": "deployment/api", "namespace": "shop"}',
            FileTarget("deployment/api", None, "shop"),
        ),
        (
            '{"path": {"deployment": "api", "container": "app"}}',
            FileTarget("deployment/api", "app"),
        ),
    ],
)
def test_target_forms(tmp_path: Path, target: str, want: FileTarget) -> None:
    assert load_config(write(tmp_path, f'{{"target": {target}}}')).target == want


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ('"rollout/api"', "offramp steals from a pod, deployment or statefulset"),
        ('"targetless"', "offramp steals from a pod, deployment or statefulset"),
        ('"deployment"', "write KIND/NAME"),
        ('"deployment/api/pod/x"', "the third part must be 'container'"),
        ('{"namespace": "shop"}', "target has no path"),
        ('{"path": "pod/a", "kind": "x"}', "target.kind: offramp reads target.path"),
        ("3", "must be a string"),
    ],
)
def test_targets_offramp_cannot_use_are_refused(tmp_path: Path, target: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(write(tmp_path, f'{{"target": {target}}}'))


def test_feature_env_forms(tmp_path: Path) -> None:
    env = load_config(write(tmp_path, '{"feature": {"env": false}}')).env
    assert env == EnvConfig(enabled=False)
    assert load_config(write(tmp_path, '{"feature": {}}')).env is None
    text = """{"feature": {"env": {"include": "DB_*;API_KEY", "override": {"MODE": "local"},
              "unset": ["AWS_PROFILE"], "load_from_process": true}}}"""
    loaded = load_config(write(tmp_path, text))
    assert loaded.env == EnvConfig(
        include=("DB_*", "API_KEY"), override={"MODE": "local"}, unset=("AWS_PROFILE",)
    )
    assert loaded.ignored == ("feature.env.load_from_process",)


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ('{"include": ["A"], "exclude": ["B"]}', "give include or exclude, not both"),
        ('{"include": 3}', "feature.env.include must be a list of names"),
        ('{"override": {"A": 1}}', "feature.env.override must map names to strings"),
        ('"yes"', "feature.env must be true, false or an object"),
    ],
)
def test_bad_feature_env_is_refused(tmp_path: Path, env: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(write(tmp_path, f'{{"feature": {{"env": {env}}}}}'))


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"shared seeds not found at {SEEDS}")
def test_the_seed_blogs_outgoing_filters_load_as_written(tmp_path: Path) -> None:
    """outgoing-filter-blog.md: {"local": [":8888"]} loads (typographic quotes and
    all); the first example lacks the opening quote of "feature" and is refused
    with where."""
    text = (SEEDS / "outgoing-filter-blog.md").read_text()
    blocks = [b for b in json_blocks(text) if '"outgoing"' in b]
    assert len(blocks) >= 2
    found = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"out{i}.json"
        path.write_text(block)
        if 'feature":' in block and '"feature"' not in block:
            with pytest.raises(ConfigError) as refused:
                load_config(path)
            # Where, what, and the line with a caret under the column.
            assert f"{path}:2:11: not valid JSON: unexpected" in str(refused.value)
            assert "a double quote is missing on this line" in str(refused.value)
            assert str(refused.value).endswith('\n      feature": {\n' + " " * 14 + "^")
            continue
        loaded = load_config(path)
        assert not [k for k in loaded.ignored if "outgoing" in k], loaded.ignored
        found.append(loaded.outgoing.local)
    assert (":8888",) in found


def test_outgoing_and_dns_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '{"feature": {"network": {"outgoing": {"tcp": true, "udp": true, '
                 '"filter": {"remote": ["payment-service:8080"]}}, "dns": false}}}')  # fmt: skip
    loaded = load_config(path)
    assert loaded.outgoing.remote == ("payment-service:8080",)
    assert loaded.outgoing.dns is False and loaded.outgoing.tcp is True
    assert loaded.outgoing.udp is True and not loaded.ignored
    off = write(tmp_path, '{"feature": {"network": {"outgoing": {"udp": false}}}}')
    assert load_config(off).outgoing.udp is False and load_config(off).outgoing.tcp is True
    assert (
        load_config(write(tmp_path, '{"feature": {"network": {"outgoing": false}}}')).outgoing.udp
        is False
    )
    both = write(tmp_path, '{"feature": {"network": {"outgoing": {"filter": '
                 '{"local": ["a"], "remote": ["b"]}}}}}')  # fmt: skip
    with pytest.raises(ConfigError, match="both local and remote"):
        load_config(both)


def test_the_preview_key_from_the_file_and_the_flag(tmp_path: Path) -> None:
    text = '{"feature": {"network": {"incoming": {"http_filter": {"preview": "alice"}}}}}'
    loaded = load_config(write(tmp_path, text))
    assert build_spec(loaded, FilterFlags(), "me").http_filter.preview == "alice"
    spec = build_spec(loaded, FilterFlags(preview="bob", headers=("^x-a: 1$",)), "me")
    assert spec.http_filter.preview == "bob" and spec.http_filter.header_filter == "^x-a: 1$"
    with pytest.raises(ConfigError, match="preview key 'no good' is not valid"):
        build_spec(FileConfig(), FilterFlags(preview="no good"), "me")
