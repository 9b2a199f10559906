"""Team previews through the real sidecar (subprocess), real websockets and the real
local proxy: a preview key in a header, a cookie or W3C baggage takes the request;
the link sets the cookie; the key goes on in the stolen request's baggage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from local_proxy.config import LocalSettings
from local_proxy.session import LocalSession, Refused
from sidecar.sessions.spec import HttpFilterSpec, Mode, SessionSpec
from tests.support import (
    HttpApp,
    SidecarProcess,
    open_session,
    serving,
    start_sidecar,
    stop_cleanly,
)

pytestmark = pytest.mark.timeout(90)


def preview(key: str, **kw: object) -> SessionSpec:
    return SessionSpec(http_filter=HttpFilterSpec(preview=key, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "carrier",
    [
        {"headers": {"x-offramp-preview": "alice"}},
        {"headers": {"cookie": "theme=dark; offramp-preview=alice"}},
        {"headers": {"baggage": "userId=7, offramp-preview=alice;ttl=60"}},
    ],
    ids=["header", "cookie", "baggage"],
)
async def test_each_carrier_takes_the_request(
    sidecar: SidecarProcess, local: HttpApp, carrier: dict[str, dict[str, str]]
) -> None:
    async with (
        open_session(sidecar, local.port, preview("alice")),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        mine = await client.get("/cart", **carrier)  # type: ignore[arg-type]
        other = await client.get("/cart", headers={"x-offramp-preview": "bob"})
        plain = await client.get("/cart")
    assert mine.headers["x-served-by"] == "local"
    assert other.headers["x-served-by"] == "app" and plain.headers["x-served-by"] == "app"


async def test_the_key_goes_on_in_baggage(sidecar: SidecarProcess, local: HttpApp) -> None:
    async with (
        open_session(sidecar, local.port, preview("alice")),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        await client.get("/a", headers={"x-offramp-preview": "alice"})
        await client.get("/b", headers={"x-offramp-preview": "alice", "baggage": "u=1"})
        await client.get("/c", headers={"baggage": "offramp-preview=alice"})
    baggage = [[v for k, v in seen.headers if k.lower() == "baggage"] for seen in local.seen]
    assert baggage == [["offramp-preview=alice"], ["u=1,offramp-preview=alice"],
                       ["offramp-preview=alice"]]  # fmt: skip


async def test_the_link_sets_the_cookie_and_a_browser_then_gets_the_local_process(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    """A client with a cookie jar, as a browser: it opens the link, follows the
    redirect, and from then on its requests carry the key without anyone typing a
    header; the clear link ends that."""
    async with open_session(sidecar, local.port, preview("alice")):
        async with httpx.AsyncClient(base_url=sidecar.url, follow_redirects=True) as browser:
            opened = await browser.get("/__offramp/preview/alice?to=/shop%3Fid%3D3")
            assert [r.status_code for r in opened.history] == [302]
            set_cookie = opened.history[0].headers["set-cookie"]
            assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
            assert "Secure" not in set_cookie
            assert opened.headers["x-served-by"] == "local"
            assert opened.json()["path"] == "/shop?id=3"
            later = await browser.get("/other")
            assert later.headers["x-served-by"] == "local"
            await browser.get("/__offramp/preview/clear")
            after = await browser.get("/other")
            assert after.headers["x-served-by"] == "app"
        # Behind a TLS-ending proxy, the cookie is Secure.
        async with httpx.AsyncClient(base_url=sidecar.url) as client:
            r = await client.get("/__offramp/preview/alice", headers={"x-forwarded-proto": "https"})
            assert r.headers["set-cookie"].endswith("; Secure")
            bad = await client.get("/__offramp/preview/alice?to=//evil.example/")
            assert bad.status_code == 400 and "must be a path on this site" in bad.text
    assert not [s for s in local.seen if s.path.startswith("/__offramp")]


async def test_the_link_can_be_moved_or_turned_off(
    app: HttpApp, local: HttpApp, token_file: Path, tmp_path: Path
) -> None:
    """An app that owns /__offramp keeps it: another prefix, or none at all."""
    for flag, link, app_path in (
        ("--preview-prefix=/_dev", "/_dev/preview/alice", "/__offramp/preview/alice"),
        ("--preview-prefix=off", None, "/__offramp/preview/alice"),
    ):
        sidecar = start_sidecar(app.port, token_file, tmp_path, flag)
        try:
            async with (
                open_session(sidecar, local.port, preview("alice")),
                httpx.AsyncClient(base_url=sidecar.url) as client,
            ):
                if link is not None:
                    assert (await client.get(link)).status_code == 302
                    client.cookies.clear()
                r = await client.get(app_path)
                assert r.status_code == 200 and r.headers["x-served-by"] == "app"
        finally:
            stop_cleanly(sidecar)


def user(key: str | None, client: str, **kw: object) -> SessionSpec:
    f = HttpFilterSpec(preview=key) if key else HttpFilterSpec()
    return SessionSpec(http_filter=f, client=client, **kw)  # type: ignore[arg-type]


async def start(
    sidecar: SidecarProcess, port: int, spec: SessionSpec, lines: list[str]
) -> tuple[LocalSession, asyncio.Task[None]]:
    settings = LocalSettings(sidecar_url=sidecar.control_url, token=sidecar.token,
                             to_port=port, spec=spec)  # fmt: skip
    session = LocalSession(settings, report=lines.append)
    runner = asyncio.create_task(session.run())
    ready = asyncio.create_task(session.ready.wait())
    await asyncio.wait({runner, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    return session, runner


async def test_the_same_key_of_another_user_is_refused_and_force_takes_over(
    sidecar: SidecarProcess, local: HttpApp, app: HttpApp
) -> None:
    alice_lines: list[str] = []
    alice, alice_runs = await start(sidecar, local.port, user("team", "alice@a"), alice_lines)
    assert alice.ready.is_set(), alice_lines
    with serving("bob's") as bobs:
        bob, bob_runs = await start(sidecar, bobs.port, user("team", "bob@b"), [])
        with pytest.raises(Refused) as refused:
            await bob_runs
        message = str(refused.value)
        assert refused.value.code == "conflict"
        assert "alice@a holds these requests in session s" in message, message
        assert "the same preview key team" in message and "--force" in message
        # The same user again (another terminal, a reconnect) is no conflict.
        again, again_runs = await start(sidecar, local.port, user("team", "alice@a"), [])
        assert again.ready.is_set()
        again.stop()
        await again_runs

        bob, bob_runs = await start(sidecar, bobs.port, user("team", "bob@b", force=True), [])
        assert bob.ready.is_set()
        # Alice is told, and her offramp stops rather than take it back.
        with pytest.raises(Refused) as told:
            await asyncio.wait_for(alice_runs, 15)
        assert told.value.code == "taken_over"
        assert "taken over by bob@b (--force" in str(told.value)
        assert any("the session was taken over by bob@b" in line for line in alice_lines)
        async with httpx.AsyncClient(base_url=sidecar.url) as client:
            r = await client.get("/", headers={"x-offramp-preview": "team"})
        assert r.headers["x-served-by"] == "bob's"
        bob.stop()
        await bob_runs
    assert "taken over by bob@b" in sidecar.log()


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        (user("alice", "alice@a"), user(None, "bob@b"), True),  # no filter takes all
        (user(None, "alice@a"), user("bob", "bob@b"), True),
        (user("alice", "alice@a"), user("bob", "bob@b"), False),
        (user(None, "alice@a"), user(None, "bob@b", mode=Mode.MIRROR), False),  # mirror
        (user(None, "alice@a", mode=Mode.MIRROR), user(None, "bob@b"), False),
    ],
)
async def test_which_sessions_conflict(
    sidecar: SidecarProcess, local: HttpApp, first: SessionSpec, second: SessionSpec,
    conflict: bool,
) -> None:  # fmt: skip
    async with open_session(sidecar, local.port, first):
        two, runs = await start(sidecar, local.port, second, [])
        if conflict:
            with pytest.raises(Refused, match="holds these requests"):
                await runs
        else:
            assert two.ready.is_set()
            two.stop()
            await runs


async def test_probes_are_never_taken_by_a_preview_session(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with (
        open_session(sidecar, local.port, preview("alice")),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        probe = await client.get("/ready", headers={"x-offramp-preview": "alice",
                                                    "user-agent": "kube-probe/1.30"})  # fmt: skip
    assert probe.headers["x-served-by"] == "app"
