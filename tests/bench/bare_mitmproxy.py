"""The floor of our engine: mitmproxy in reverse mode with no addons of ours.

A bare `Master` with only `core`, `proxyserver` and `next_layer`, and the same
options the sidecar sets (reverse mode, keep_host_header, app connections opened
when a request needs them),
so the difference to the sidecar is exactly what offramp adds.

    python -m tests.bench.bare_mitmproxy APP_PORT LISTEN_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver
from mitmproxy.master import Master


async def serve(app_port: int, listen_port: int) -> None:
    master = Master(options.Options())
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer())
    master.options.update(
        mode=[f"reverse:http://127.0.0.1:{app_port}@127.0.0.1:{listen_port}"],
        keep_host_header=True,
        connection_strategy="lazy",
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
