"""Whether a spec's patterns are cheap enough to compile, found out in a child process.

The `regex` module expands counted repeats when it compiles: `((a{100}){100}){100}`,
20 characters, takes about a second and 250 MiB. The sidecar's own memory limit
is smaller than that, and compiling holds the event loop, so a session's
patterns are first compiled in a short-lived child (`python -I`) that may use at
most CHILD_MEMORY of address space and COMPILE_CPU seconds of compile time. A
spec the child cannot compile within those is refused with `FilterError`; one
it can is then compiled in the sidecar, off the event loop.

Only a caller that has shown the token gets this far (see `control`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

from sidecar.sessions.filters import FilterError

__all__ = ["CHILD_MEMORY", "COMPILE_CPU", "check_cost"]

CHILD_MEMORY = 96 * 1024 * 1024
"""Address space of the child: an interpreter with `regex` loaded takes about
20 MiB of it, which leaves some 70 MiB for the compiled patterns."""
COMPILE_CPU = 0.25
"""CPU seconds all of a spec's patterns may take to compile."""
_WALL = 2.0
"""Seconds before a child that has not answered is killed."""

# Run as `python -I -c _CHILD MEMORY CPU`; reads [[key, pattern, flags], ...] on
# stdin and prints {"failed": key} for the first pattern that did not compile
# within the limits, {"failed": null} if all did.
_CHILD = """
import json, resource, sys, time
memory, cpu = int(sys.argv[1]), float(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
import regex
start = time.process_time()
for key, pattern, flags in json.load(sys.stdin):
    try:
        regex.compile(pattern, flags)
    except MemoryError:
        print(json.dumps({"failed": key}))
        sys.exit(0)
    except regex.error:
        pass
    if time.process_time() - start > cpu:
        print(json.dumps({"failed": key}))
        sys.exit(0)
print(json.dumps({"failed": None}))
"""


def _too_costly(key: str, pattern: str) -> FilterError:
    return FilterError(
        key,
        pattern,
        "this pattern is too costly to compile (counted repeats such as {1000} inside "
        "each other multiply; the sidecar allows about "
        f"{CHILD_MEMORY // 2**20 - 20} MiB and {COMPILE_CPU} s); write it with fewer "
        "or smaller repeats, or use + and *",
    )


async def check_cost(patterns: Sequence[tuple[str, str, int]]) -> None:
    """Raise FilterError for the first of (key, pattern, flags) that the child
    could not compile within the limits; patterns that do not parse are left to
    `compile_filter`, which says where they are wrong."""
    if not patterns:
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        _CHILD,
        str(CHILD_MEMORY),
        str(COMPILE_CPU),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(
            proc.communicate(json.dumps([list(p) for p in patterns]).encode()), _WALL
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise _too_costly(*patterns[0][:2]) from None
    by_key = {key: pattern for key, pattern, _ in patterns}
    try:
        answer = json.loads(out)
    except ValueError:
        # Killed (out of memory before Python could raise) or the like: which
        # pattern it was is not known, so the message names the spec's first.
        raise _too_costly(*patterns[0][:2]) from None
    failed = answer.get("failed")
    if failed is not None:
        raise _too_costly(failed, by_key.get(failed, ""))
