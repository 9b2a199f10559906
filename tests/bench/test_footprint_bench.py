"""The footprint benchmark runs end to end in one round (no figure asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.footprint import FIGURES, WAYS
from tests.bench.run import REPO


@pytest.mark.timeout(120)
def test_footprint_benchmark_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.footprint", "--rounds", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "footprint.json").read_text())
    assert set(results) == set(WAYS)
    for row in results.values():
        assert set(row) == set(FIGURES) and all(v > 0 for v in row.values())
    assert "target idle <= 30 MiB" in done.stdout
