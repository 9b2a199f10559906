"""The outgoing benchmark runs end to end in a tiny configuration (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.run import REPO
from tests.netns import require_netns


@pytest.mark.timeout(120)
def test_outgoing_benchmark_runs(tmp_path: Path) -> None:
    require_netns()  # root, ip: the namespace's rules need nft as well (.ci/run installs it)
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.outgoing", "--connections", "20", "--mib", "4",
         "--rounds", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "outgoing.json").read_text())
    assert set(results) == {"direct", "local", "tunnel"}
    for row in results.values():
        assert row["setup_ms_p50"] > 0 and row["mib_per_s"] > 0
    assert "tunnel adds <= 1 ms per connection" in done.stdout
