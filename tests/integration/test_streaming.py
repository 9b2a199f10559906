"""Large bodies stream through; the sidecar's memory does not grow with them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support import (
    HttpApp,
    SidecarProcess,
    header_spec,
    open_session,
    pattern_bytes,
    pattern_sha256,
)

pytestmark = pytest.mark.timeout(240)

SIZE = 200 * 1024 * 1024
# The sidecar (Python + mitmproxy) idles at roughly 60-80 MiB. A body held whole
# would add 200 MiB; bounded buffers (socket buffers, one tunnel window per
# stream, mitmproxy's 64 KiB reads) add a few MiB.
GROWTH_LIMIT_KIB = 64 * 1024


async def _upload() -> AsyncIterator[bytes]:
    for piece in pattern_bytes(SIZE):
        yield piece


@pytest.mark.parametrize("stolen", [True, False], ids=["stolen", "passed"])
async def test_200mb_each_way_with_bounded_rss(
    sidecar: SidecarProcess, local: HttpApp, stolen: bool
) -> None:
    headers = {"x-preview": "alice"} if stolen else {}
    expect = "local" if stolen else "app"
    async with (
        open_session(sidecar, local.port, header_spec("^x-preview: alice$")),
        httpx.AsyncClient(base_url=sidecar.url, timeout=120) as client,
    ):
        # Warm up so the baseline includes the connections and the session.
        r = await client.get("/bytes/1000", headers=headers)
        assert r.headers["x-served-by"] == expect
        baseline = sidecar.rss_kib("VmRSS")

        r = await client.post("/count", content=_upload(), headers=headers)
        assert r.status_code == 200
        assert r.json() == {"bytes": SIZE, "sha256": pattern_sha256(SIZE), "served_by": expect}

        received = 0
        async with client.stream("GET", f"/bytes/{SIZE}", headers=headers) as r:
            assert r.headers["x-served-by"] == expect
            async for piece in r.aiter_raw():
                received += len(piece)
        assert received == SIZE
        peak = sidecar.rss_kib("VmHWM")
    assert peak - baseline < GROWTH_LIMIT_KIB, (
        f"the sidecar's peak RSS grew by {(peak - baseline) // 1024} MiB while moving 2x200 MiB"
    )
