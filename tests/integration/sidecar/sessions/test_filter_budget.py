"""A filter that backtracks cannot stall other traffic: the real sidecar, a real
session, and 100 crafted requests from a caller who needs no token."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.support import HttpApp, SidecarProcess, header_spec, open_session

pytestmark = pytest.mark.timeout(120)

BACKTRACKS = header_spec("^x-name: (a|aa)+$")
CRAFTED = "a" * 40 + "!"
"""Fails to match only after trying every way to split the a's: seconds of work."""
CONCURRENT = 100


async def _one(port: int, name: str | None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"X-Name: {name}\r\n" if name is not None else ""
    writer.write(f"GET /x HTTP/1.1\r\nHost: shop\r\n{extra}Connection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()


async def _normal_beside(port: int, value: str) -> tuple[float, list[bytes]]:
    """Seconds a plain request takes while CONCURRENT requests with X-Name: value
    are sent at the same moment; and those requests' answers."""
    others = [asyncio.create_task(_one(port, value)) for _ in range(CONCURRENT)]
    await asyncio.sleep(0.05)  # their connections are open and their heads sent
    start = time.perf_counter()
    answer = await _one(port, None)
    took = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return took, await asyncio.gather(*others)


async def test_a_normal_request_beside_100_backtracking_ones_takes_under_twice_its_time(
    sidecar: SidecarProcess, app: HttpApp, local: HttpApp
) -> None:
    lines: list[str] = []
    async with open_session(sidecar, local.port, BACKTRACKS, lines=lines):
        benign, crafted = [], []
        for _ in range(3):  # in turns, so that drift on the machine hits both alike
            took, answers = await _normal_beside(sidecar.listen_port, "b")
            benign.append(took)
            took, answers = await _normal_beside(sidecar.listen_port, CRAFTED)
            crafted.append(took)
            # Matching failed open: every crafted request was served by the app.
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        usual, stalled = statistics.median(benign), statistics.median(crafted)
        assert stalled < 2 * usual + 0.05, (
            f"beside crafted requests {stalled * 1000:.0f} ms, beside benign ones "
            f"{usual * 1000:.0f} ms"
        )
        assert not [s for s in local.seen if s.headers]  # nothing was stolen

        # The developer hears of it, and /v1/status counts it.
        deadline = time.monotonic() + 5
        while not any("matching your filter took too long" in line for line in lines):
            assert time.monotonic() < deadline, lines
            await asyncio.sleep(0.1)
        status = await asyncio.to_thread(
            httpx.get,
            f"http://127.0.0.1:{sidecar.control_port}/v1/status",
            headers={"Authorization": f"Bearer {sidecar.token}"},
        )
        (session,) = status.json()["sessions"]
        assert session["match_timeouts"] > 0
    assert "match(es) of its filter ran out of time so far" in sidecar.log()
