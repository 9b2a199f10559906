"""The `offramp` and `offramp-sidecar` commands as a user types them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets

from sidecar.tunnel.protocol import PROTOCOL_VERSION, Connection, HandshakeRefused, Hello, Role
from tests.support import (
    HttpApp,
    SidecarProcess,
    free_port,
    header_spec,
    open_session,
    raw_exchange,
    start_sidecar,
    stop_cleanly,
)

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent


def offramp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "offramp"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_demo_exits_0_and_counts_match_what_it_sent() -> None:
    result = offramp("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stolen: 3, passed: 3 (expected stolen: 3, passed: 3)" in result.stdout
    assert result.stdout.count("answered by YOUR LOCAL PROCESS") == 3
    assert "UNEXPECTED" not in result.stdout


def test_wrong_token_is_refused_with_a_clear_message(
    sidecar: SidecarProcess, local: HttpApp, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("0123456789abcdef0123456789abcdef")
    result = offramp(
        "steal", "--sidecar-url", sidecar.control_url, "--token-file", str(wrong),
        "--to", str(local.port), "--header", "^x-preview: alice$",
    )  # fmt: skip
    assert result.returncode == 1
    assert "refused" in result.stderr and "token does not match" in result.stderr, result.stderr
    assert "refused" in sidecar.log()


def test_a_token_file_others_may_read_is_warned_of_on_both_sides(
    app: HttpApp, tmp_path: Path
) -> None:
    loose = tmp_path / "loose"
    loose.write_text("0123456789abcdef0123456789abcdef")
    loose.chmod(0o644)
    s = start_sidecar(app.port, loose, tmp_path)
    try:
        assert f"the token file {loose} may be read by others" in s.log(), s.log()
        result = offramp(
            "steal", "--sidecar-url", "ws://127.0.0.1:9", "--token-file", str(loose),
            "--to", "9", "--header", "^x-preview: alice$",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr  # nothing listens on port 9
        assert f"offramp: warning: the token file {loose} may be read by others" in result.stderr
        assert "chmod 600" in result.stderr
    finally:
        stop_cleanly(s)


def test_bad_regex_is_refused_before_connecting(token_file: Path) -> None:
    result = offramp(
        "steal", "--sidecar-url", "ws://127.0.0.1:9", "--token-file", str(token_file),
        "--to", "9", "--header", "^x-preview: (alice$",
    )  # fmt: skip
    assert result.returncode == 2
    assert "http_filter.header_filter" in result.stderr
    assert "'^x-preview: (alice$'" in result.stderr
    assert "position" in result.stderr, result.stderr


async def _hello(sidecar: SidecarProcess, hello: Hello) -> str:
    conn = Connection(Role.CLIENT)
    conn.send(hello)
    async with websockets.connect(sidecar.control_url + "/v1/tunnel") as ws:
        await ws.send(conn.data_to_send())
        answer = await ws.recv()
    assert isinstance(answer, bytes)
    with pytest.raises(HandshakeRefused) as refused:
        conn.receive_data(answer)
    return f"{refused.value.code}: {refused.value}"


async def test_sidecar_refuses_a_bad_filter_itself(sidecar: SidecarProcess) -> None:
    """A client that skips local validation still gets the pattern and position."""
    session = {"http_filter": {"all_of": [{"path": "^/ok"}, {"header": "x-(?<!"}]}}
    message = await _hello(sidecar, Hello(PROTOCOL_VERSION, sidecar.token, session))
    assert message.startswith("bad_filter: http_filter.all_of[1].header")
    assert "position" in message


async def test_sidecar_refuses_an_unknown_key(sidecar: SidecarProcess) -> None:
    message = await _hello(
        sidecar, Hello(PROTOCOL_VERSION, sidecar.token, {"http_filter": {"header": "x"}})
    )
    assert message.startswith("bad_spec: invalid session spec: http_filter.header")


async def test_version_mismatch_is_a_clear_error(sidecar: SidecarProcess) -> None:
    message = await _hello(sidecar, Hello(99, sidecar.token, {}))
    assert message.startswith("version: ")
    assert f"protocol {PROTOCOL_VERSION}" in message and "speaks 99" in message


def test_unreachable_sidecar_fails_fast(token_file: Path) -> None:
    result = offramp(
        "steal", "--sidecar-url", "ws://127.0.0.1:9", "--token-file", str(token_file), "--to", "9"
    )
    assert result.returncode == 1
    assert "cannot reach the sidecar at ws://127.0.0.1:9/v1/tunnel" in result.stderr


def test_sidecar_refuses_an_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = subprocess.run(
        [str(BIN / "offramp-sidecar"), "--app-port", "8080", "--token-file", str(empty)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is empty" in result.stderr and "openssl rand" in result.stderr


async def test_cli_steal_session_serves_and_ends_cleanly_on_ctrl_c(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    import signal

    import httpx

    proc = await asyncio.create_subprocess_exec(
        str(BIN / "offramp"), "steal", "--sidecar-url", sidecar.control_url,
        "--token-file", str(sidecar_token_file(sidecar)), "--to", str(local.port),
        "--header", "^x-preview: alice$",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"session" in first and b"open" in first, first
    async with httpx.AsyncClient(base_url=sidecar.url) as client:
        r = await client.get("/hello", headers={"x-preview": "alice"})
        assert r.headers["x-served-by"] == "local"
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert line.startswith(b"steal  GET /hello -> 200"), line
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert b"session ended: 1 stolen" in out


def sidecar_token_file(sidecar: SidecarProcess) -> Path:
    path = sidecar.log_path.with_suffix(".token")
    path.write_text(sidecar.token)
    return path


async def test_a_sidecar_without_its_token_file_serves_traffic_and_waits_for_it(
    app: HttpApp, local: HttpApp, tmp_path: Path
) -> None:
    """As in a pod whose token Secret does not exist yet (an optional volume)."""
    token_file = tmp_path / "secret" / "token"
    s = await asyncio.to_thread(start_sidecar, app.port, token_file, tmp_path)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{s.url}/before", headers={"x-preview": "alice"})
        assert r.json()["served_by"] == "app"
        message = await _hello(s, Hello(PROTOCOL_VERSION, "anything-at-all-1234", {}))
        assert message.startswith(
            f"no_token: this sidecar has no session token yet: nothing at {token_file}"
        )
        # The Secret appears: the next session is checked against it.
        token_file.parent.mkdir()
        token_file.write_text("a-token-that-is-long-enough\n")
        s.token = "a-token-that-is-long-enough"
        async with open_session(s, local.port, header_spec("^x-preview: alice$")):
            async with httpx.AsyncClient() as client:
                r = await client.get(f"{s.url}/after", headers={"x-preview": "alice"})
            assert r.json()["served_by"] == "local"
    finally:
        await asyncio.to_thread(stop_cleanly, s)


async def _steal_cli(sidecar: SidecarProcess, local: HttpApp) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "offramp"), "steal", "--sidecar-url", sidecar.control_url,
        "--token-file", str(sidecar_token_file(sidecar)), "--to", str(local.port),
        "--header", "^x-preview: alice$", "--timeout", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"open" in first, first
    return proc


async def _until_line(proc: asyncio.subprocess.Process, text: bytes) -> list[bytes]:
    assert proc.stdout is not None
    lines = []
    while text not in (line := await asyncio.wait_for(proc.stdout.readline(), 20)):
        assert line, b"".join(lines)
        lines.append(line)
    return [*lines, line]


async def test_ctrl_c_finishes_the_requests_held_before_the_session_closes(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    import signal

    proc = await _steal_cli(sidecar, local)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client:
        held = [
            asyncio.create_task(client.get(f"/sleep/4?n={i}", headers={"x-preview": "alice"}))
            for i in range(3)
        ]
        await asyncio.to_thread(local.wait_seen, 3)
        proc.send_signal(signal.SIGINT)
        await _until_line(proc, b"finishing 3 held request(s) (up to 20 s, --timeout)")
        answers = await asyncio.gather(*held)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.headers["x-served-by"] == "local" for r in answers)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert b"abandoned" not in out and b"session ended: 3 stolen" in out


async def test_a_second_ctrl_c_abandons_the_held_requests_and_says_so(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    import signal

    proc = await _steal_cli(sidecar, local)
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client:
        held = [
            asyncio.create_task(client.get(f"/sleep/15?n={i}", headers={"x-preview": "alice"}))
            for i in range(2)
        ]
        await asyncio.to_thread(local.wait_seen, 2)
        proc.send_signal(signal.SIGINT)
        await _until_line(proc, b"Ctrl-C again abandons them")
        proc.send_signal(signal.SIGINT)
        lines = await _until_line(proc, b"abandoning 2 held request(s)")
        answers = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert [r.status_code for r in answers] == [502, 502], [r.text for r in answers]
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    text = (b"".join(lines) + out).decode()
    assert proc.returncode == 0, err
    assert text.count("cut off: the session ended") == 2, text
    assert "abandoned by the caller" not in text


async def test_requests_the_local_side_cannot_take_end_with_a_reason_and_no_traceback(
    sidecar: SidecarProcess,
) -> None:
    import signal

    nobody = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "offramp"), "steal", "--sidecar-url", sidecar.control_url,
        "--token-file", str(sidecar_token_file(sidecar)), "--to", str(nobody),
        "--header", "^x-preview: alice$",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert b"open" in await asyncio.wait_for(proc.stdout.readline(), 30)
    alice = b"X-Preview: alice\r\n"
    for raw in (
        b"GET /plain HTTP/1.1\r\nHost: a\r\n" + alice,
        b"GET /caf\xe9 HTTP/1.1\r\nHost: a\r\n" + alice,
        b"POST /odd HTTP/1.1\r\nHost: a\r\nX-Odd: \x01\x7f\r\nContent-Length: 2\r\n" + alice,
    ):
        data = raw + b"Connection: close\r\n\r\n" + (b"ok" if raw.startswith(b"POST") else b"")
        answer = await asyncio.to_thread(raw_exchange, sidecar.listen_port, data, 15)
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 502 Bad Gateway", answer
        body = rest.partition(b"\r\n\r\n")[2]
        assert body.startswith(b"offramp: ") and b"--to" in body, answer
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert b"Traceback" not in out + err and b"exception" not in (out + err).lower(), out + err


def test_with_sidecar_url_cmd_gets_the_apps_environment(
    app: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    """`offramp steal --sidecar-url ... -- CMD`: the environment comes from that
    sidecar's /v1/env; --env-exclude and the defaults apply; --env-file too."""
    sidecar = start_sidecar(app.port, token_file, tmp_path, env={
        "OFFRAMP_APP_GREETING": "hello", "OFFRAMP_APP_TOKEN": "t0k",
        "OFFRAMP_APP_PATH": "/app/bin",
    })  # fmt: skip
    port = free_port()
    cmd = (
        "import json, os, socket, sys, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); "
        "print('RESULT ' + json.dumps({k: os.environ.get(k) for k in "
        "('GREETING', 'TOKEN', 'PATH')}), flush=True); time.sleep(1)"
    )
    try:
        result = offramp(
            "steal", "--sidecar-url", sidecar.control_url, "--token-file", str(token_file),
            "--to", str(port), "--no-outgoing", "--no-dns", "--env-exclude", "TOKEN",
            "--env-file", str(tmp_path / "x.env"), "--", sys.executable, "-c", cmd,
        )  # fmt: skip
    finally:
        stop_cleanly(sidecar)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    assert got == {"GREETING": "hello", "TOKEN": None, "PATH": os.environ["PATH"]}
    assert "the app container's environment: 3 variables (GREETING, PATH, TOKEN)" in result.stdout
    assert (tmp_path / "x.env").read_text() == "GREETING='hello'\n"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--no-env", "--env-file", "x.env"], "would be written with nothing"),
        (["--env-include", "A", "--env-exclude", "B"], "give --env-include or --env-exclude, not"),
    ],
)
def test_env_flags_that_contradict_each_other_are_refused(
    token_file: Path, flags: list[str], says: str
) -> None:
    result = offramp("steal", "--sidecar-url", "ws://127.0.0.1:9", "--token-file",
                     str(token_file), "--to", "9", *flags)  # fmt: skip
    assert result.returncode == 2 and says in result.stderr, result.stderr
