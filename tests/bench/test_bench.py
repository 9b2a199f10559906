"""The benchmark runs end to end in its tiny configuration.

Nothing here asserts a timing: numbers from a one-second run on a shared
machine mean nothing. It checks that every scenario ran, each one answered by
the side it claims (the benchmark checks that itself before measuring), that no
request failed, and that the table, the JSON and the chart were written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.run import APT_PACKAGES, REPO, missing_tools

EXPECTED = {
    "direct", "bare", "idle", "no_session", "one_session",
    "many_sessions", "stolen", "mirror", "nginx", "haproxy",
    "grpc_direct", "grpc_passed", "grpc_stolen", "workers_1", "workers_2",
    "conn_request", "conn_accept",
}  # fmt: skip


@pytest.mark.timeout(320)
def test_benchmark_runs_in_its_tiny_configuration(tmp_path: Path) -> None:
    if missing := missing_tools():
        reason = f"the benchmark needs {', '.join(missing)} (apt-get install {APT_PACKAGES})"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it (.ci/run installs it)")
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert {(r["key"], r["connections"]) for r in rows} == {
        (k, c) for k in EXPECTED for c in (1, 16)
    }
    for r in rows:
        assert r["requests"] > 0 and r["errors"] == 0, r
        if r["key"] not in ("direct", "grpc_direct"):
            assert r["cpu_s_per_1k"] is not None and r["peak_rss_mib"] > 0, r
    assert results["rss"]["requests"] >= 1000
    assert {t["target"].split(":")[0] for t in results["targets"]} >= {"1 session", "stolen"}
    assert "gRPC stolen" in done.stdout and "req/s" in done.stdout
    assert "workers, 16 connections: 1:" in done.stdout
    assert len(results["idle_ab"]["with"]) == len(results["idle_ab"]["without"]) == 1
    assert any(
        t["target"].startswith("idle sidecar: req/s below no sidecar") for t in results["targets"]
    )
    assert {k: len(c["cpu_s_per_1k"]) for k, c in results["cpu_rounds"].items()} == {
        "bare": 1, "one_session": 1, "many_sessions": 1, "bare_again": 1,
    }  # fmt: skip
    assert any("medians of 1 rounds" in t["target"] for t in results["targets"])
    assert "noise floor: the same bare mitmproxy" in done.stdout
    assert set(results["calls"]) == {"bare", "one_session", "many_sessions"}
    assert all(c["per_request"] > 100 for c in results["calls"].values()), results["calls"]
    memory = results["hostile"]["memory"]
    assert memory["peak_rss_mib"] >= memory["idle_rss_mib"] > 0
    # All but the 8 one address may hold are turned away at once; every slow caller
    # gets its 408 within the hold.
    assert memory["websockets_closed"] >= memory["websockets"] - 8, memory
    assert memory["slow_408"] == memory["slow"], memory
    assert set(results["hostile"]["backtracking"]) == {"alone", "benign", "crafted"}
    assert "p99 beside 100 crafted / beside 100 benign" in done.stdout
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
