"""Bounded fuzzing (hypothesis, a few seconds): what a peer or a user can hand the
parsers raises only their documented errors, never anything else.

- the tunnel decoder, before and after the handshake: ProtocolError;
- a session spec as it arrives in a HELLO: pydantic's ValidationError, then
  FilterError from compiling it;
- a config file: ConfigError.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from local_proxy.config import ConfigError, FilterFlags, build_spec, load_config
from sidecar.sessions.filters import FilterError, compile_filter
from sidecar.sessions.spec import SessionSpec
from sidecar.tunnel.protocol import (
    PROTOCOL_VERSION,
    Connection,
    Data,
    End,
    Hello,
    ProtocolError,
    RequestHead,
    Role,
    Welcome,
    encode,
)

pytestmark = pytest.mark.timeout(120)

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Real frames to splice garbage into, so that the fuzzer reaches past the header.
FRAMES = [
    encode(Hello(PROTOCOL_VERSION, "token", {"mode": "steal"})),
    encode(Welcome(PROTOCOL_VERSION, "s1", "0.1.0", (8080,))),
    encode(RequestHead(1, "GET", "/", ((b"host", b"a"),), 8080, "10.0.0.1:1", False, True)),
    encode(Data(1, b"body")),
    encode(End(1)),
]


def _frame(length: int | None, kind: int, stream: int, payload: bytes) -> bytes:
    size = len(payload) + 5 if length is None else length
    return size.to_bytes(4, "big") + bytes([kind]) + stream.to_bytes(4, "big") + payload


PAYLOADS = st.one_of(
    st.binary(max_size=48),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8)))
    .map(json.dumps)
    .map(str.encode),
    st.sampled_from([b"{}", b"[]", b"null", b'{"version": "x"}', b'{"headers": [[1, 2]]}']),
)
BUILT = st.builds(
    _frame,
    st.one_of(st.none(), st.integers(0, 300)),
    st.integers(0, 20),
    st.integers(0, 12),
    PAYLOADS,
)


def frames() -> st.SearchStrategy[bytes]:
    """Real frames, mutated: cut, flipped, joined; frames built from any header
    and payload; or bytes of any kind."""
    real = st.sampled_from(FRAMES)
    mutated = st.tuples(real, st.integers(0, 64), st.binary(max_size=16)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    )
    pieces = st.one_of(real, mutated, BUILT, st.binary(max_size=64))
    return st.lists(pieces, max_size=6)


def feed(make: Callable[[], Connection], pieces: list[bytes], cut: int) -> None:
    """All pieces to one connection, in two reads split at `cut`; and each piece
    to a connection of its own (so that a frame after a refused one is decoded too)."""
    whole = b"".join(pieces)
    for conn, data in [(make(), whole), *((make(), p) for p in pieces)]:
        with contextlib.suppress(ProtocolError):
            conn.receive_data(data[:cut])
            conn.receive_data(data[cut:])
            while conn.next_event() is not None:
                pass


@BOUNDED
@given(frames(), st.integers(0, 200))
def test_the_sidecar_side_decoder_raises_only_protocol_errors(
    pieces: list[bytes], cut: int
) -> None:
    feed(lambda: Connection(Role.SIDECAR), pieces, cut)


@BOUNDED
@given(frames(), st.integers(0, 200))
def test_the_client_side_decoder_after_welcome_raises_only_protocol_errors(
    pieces: list[bytes], cut: int
) -> None:
    def welcomed() -> Connection:
        conn = Connection(Role.CLIENT)
        conn.send(Hello(PROTOCOL_VERSION, "token", {}))
        conn.data_to_send()
        conn.receive_data(encode(Welcome(PROTOCOL_VERSION, "s1", "0.1.0", (8080,))))
        assert isinstance(conn.next_event(), Welcome)
        return conn

    feed(welcomed, pieces, cut)


PATTERNS = st.one_of(
    st.sampled_from(["^x-preview: alice$", "(a|aa)+", "[", "(?!kube)", "", "\\", "a{2,1}"]),
    st.text(max_size=20),
)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), PATTERNS)
# Mostly well-formed, so that most examples get past validation to the compiler;
# the rest any shape at all.
ONE_KEY = st.sampled_from(["header", "path", "method"])
CLAUSE = st.one_of(
    st.builds(lambda k, v: {k: v}, ONE_KEY, PATTERNS),
    st.dictionaries(st.sampled_from(["header", "path", "method", "x"]), JSON_LEAF, max_size=2),
)
FILTER_KEY = st.sampled_from(["header_filter", "path_filter", "method_filter"])
HTTP_FILTER = st.one_of(
    st.builds(lambda k, v: {k: v}, FILTER_KEY, PATTERNS),
    st.builds(
        lambda k, v: {k: v}, st.sampled_from(["all_of", "any_of"]), st.lists(CLAUSE, max_size=4)
    ),
    st.dictionaries(
        st.sampled_from(["header_filter", "all_of", "ports", "x"]),
        st.one_of(JSON_LEAF, st.lists(CLAUSE, max_size=3), st.lists(st.integers(), max_size=3)),
        max_size=3,
    ),
)
SESSION = st.one_of(
    st.fixed_dictionaries(
        {"mode": st.sampled_from(["steal", "mirror"])},
        optional={"http_filter": HTTP_FILTER, "take_probes": st.booleans(), "client": PATTERNS},
    ),
    st.dictionaries(
        st.sampled_from(["mode", "http_filter", "take_probes", "x"]),
        st.one_of(JSON_LEAF, HTTP_FILTER),
        max_size=3,
    ),
)


@BOUNDED
@given(SESSION)
def test_a_session_spec_is_refused_only_with_validation_or_filter_errors(
    session: dict[str, Any],
) -> None:
    try:
        spec = SessionSpec.model_validate(session)
    except ValidationError:
        return
    with contextlib.suppress(FilterError):
        compile_filter(spec.http_filter)


@BOUNDED
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["feature", "target", "x"]),
            st.one_of(
                JSON_LEAF,
                st.fixed_dictionaries(
                    {"network": st.fixed_dictionaries({"incoming": st.one_of(JSON_LEAF, SESSION)})}
                ),
            ),
            max_size=3,
        ).map(json.dumps),
        st.text(max_size=80),
    )
)
def test_a_config_file_is_refused_only_with_config_errors(text: str) -> None:
    # hypothesis gives one function-scoped fixture for all examples, so the
    # file lives in a directory of the test's own.
    path = CONFIG_DIR / "offramp.json"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        build_spec(load_config(path), FilterFlags(), "me@laptop")


CONFIG_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def _config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.CONFIG_DIR", tmp_path)
