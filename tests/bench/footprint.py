"""What an idle sidecar costs, and what its first session then costs, side by side.

    .venv/bin/python -m tests.bench.footprint [--rounds 5] [--out DIR]

Two ways to run the same sidecar (on 127.0.0.1, --capture none), taking turns for
--rounds rounds; each figure is the median over rounds:

  one process   `offramp-sidecar engine ...`: the engine on its own, binding its
                own ports: the whole sidecar in one process, as it was before
                the primary existed
  primary       `offramp-sidecar --engine on-demand ...`: the primary alone until
                a session opens; the engine starts for it and goes --engine-linger
                (1 s here) after it ends

Measured for each (processes: the sidecar and its children, from /proc):
  cpu_to_ready_s    CPU seconds (user + system) spent until /healthz answers 200
                    (the primary's health port; the one process's control port)
  idle_rss_mib      resident memory 1 s after that, no session yet
  welcome_s         from a client asking for a session to its WELCOME (for the
                    primary: the engine starts in between)
  session_rss_mib   resident memory with that session open
  after_rss_mib     resident memory 2 s after the session ended (the linger passed)

Targets (issue 19): idle <= 30 MiB and <= 0.3 s of CPU to ready; the first
session welcomed within 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support import (
    HttpApp,
    SidecarProcess,
    free_ports,
    header_spec,
    open_session,
    serving,
)

WAYS = ("one process", "primary")
FIGURES = ("cpu_to_ready_s", "idle_rss_mib", "welcome_s", "session_rss_mib", "after_rss_mib")
_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += _tree(int(child))
    return out


def _cpu_s(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


def _rss_mib(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@contextlib.contextmanager
def _sidecar(
    way: str, app: HttpApp, token: Path, tmp: Path
) -> Iterator[tuple[SidecarProcess, str]]:
    listen, control, health = free_ports(3, avoid=(app.port,))
    flags = [
        f"--app-port={app.port}", f"--listen-port={listen}", "--listen-host=127.0.0.1",
        f"--control-port={control}", "--control-host=127.0.0.1", f"--health-port={health}",
        f"--token-file={token}", "--capture=none", "--log-level=warning",
    ]  # fmt: skip
    if way == "primary":
        command = ["-m", "sidecar", *flags, "--engine=on-demand", "--engine-linger=1"]
        ready = f"http://127.0.0.1:{health}/healthz"
    else:
        command = ["-m", "sidecar", "engine", *flags]
        ready = f"http://127.0.0.1:{control}/healthz"
    log = tmp / f"{way.replace(' ', '-')}-{listen}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT)
    s = SidecarProcess(proc, listen, control, app.port, token.read_text().strip(), log, health)
    try:
        yield s, ready
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(s: SidecarProcess, url: str) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if s.proc.poll() is not None:
                raise SystemExit(f"the sidecar exited:\n{s.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.01)
    raise SystemExit(f"the sidecar did not become ready:\n{s.log()}")


def measure(way: str, app: HttpApp, local: HttpApp, token: Path, tmp: Path) -> dict[str, float]:
    with _sidecar(way, app, token, tmp) as (s, ready):
        _wait_ready(s, ready)
        row = {"cpu_to_ready_s": _cpu_s(s.proc.pid)}
        time.sleep(1)
        row["idle_rss_mib"] = _rss_mib(s.proc.pid)

        async def session() -> tuple[float, float]:
            asked = time.monotonic()
            async with open_session(s, local.port, header_spec("x-dev: bench")):
                welcomed = time.monotonic() - asked
                r = await asyncio.to_thread(httpx.get, s.url + "/", headers={"x-dev": "bench"})
                if r.json()["served_by"] != "local":
                    raise SystemExit(f"{way}: the request was not stolen: {r.text}")
                return welcomed, _rss_mib(s.proc.pid)

        row["welcome_s"], row["session_rss_mib"] = asyncio.run(session())
        time.sleep(2)
        row["after_rss_mib"] = _rss_mib(s.proc.pid)
        return row


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.footprint", description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write footprint.json here")
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        app, local = stack.enter_context(serving("app")), stack.enter_context(serving("local"))
        token = tmp / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        for i in range(args.rounds):
            order = WAYS if i % 2 == 0 else tuple(reversed(WAYS))
            for way in order:
                runs[way].append(measure(way, app, local, token, tmp))
    results = {
        way: {f: round(statistics.median(r[f] for r in rows), 3) for f in FIGURES}
        for way, rows in runs.items()
    }
    print(f"{'':14}" + "".join(f"{f:>17}" for f in FIGURES))
    for way, row in results.items():
        print(f"{way:14}" + "".join(f"{row[f]:>17.3f}" for f in FIGURES))
    before, after = results["one process"], results["primary"]
    rss_ratio = after["idle_rss_mib"] / before["idle_rss_mib"]
    cpu_ratio = after["cpu_to_ready_s"] / max(before["cpu_to_ready_s"], 0.001)
    print(
        f"idle: {after['idle_rss_mib']:.1f} MiB ({rss_ratio:.2f}x of one process), "
        f"{after['cpu_to_ready_s']:.2f} s CPU to ready ({cpu_ratio:.2f}x); first session "
        f"welcomed in {after['welcome_s']:.2f} s (one process: {before['welcome_s']:.2f} s)"
    )
    checks = [
        ("idle <= 30 MiB", after["idle_rss_mib"] <= 30),
        ("idle <= 0.3 s CPU to ready", after["cpu_to_ready_s"] <= 0.3),
        ("first session welcomed <= 1.5 s", after["welcome_s"] <= 1.5),
    ]
    for name, met in checks:
        print(f"target {name}: {'met' if met else 'NOT MET'}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "footprint.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
