"""The gRPC app of the benchmark's gRPC rows, in a process of its own:

    python -m tests.bench.grpc_server NAME PORT

It is `tests.grpc_apps` (real grpcio, asyncio API): `Unary` answers b"NAME:" +
the request. It runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from tests.grpc_apps import start_grpc_app


async def serve(name: str, port: int) -> None:
    app = await start_grpc_app(name, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await app.stop()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
