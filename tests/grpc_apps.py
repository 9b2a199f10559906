"""A real gRPC service (grpcio's asyncio server) and client helpers for the tests.

No generated code: the service is registered with a generic handler and its
messages are raw bytes, so the tests need neither protoc nor protobuf. grpcio
frames, compresses and trails them exactly as it would protobuf messages.

Service `offramp.test.Echo` (every answer starts with the server's name, so a
test can tell who served a call):
- `Unary`           b"<name>:" + request; `/fail` in the request -> the status
                    named after it (e.g. b"fail:NOT_FOUND") with details and
                    trailing metadata, answered trailers-only;
                    `sleep:S` waits S seconds first (for deadlines)
- `ServerStream`    request b"N" -> N messages b"<name>:0" ... b"<name>:N-1";
                    b"N:S" waits S seconds between messages
- `ClientStream`    reads every message, answers b"<name>:<count>:<total bytes>"
- `Bidi`            answers each message as it arrives: b"<name>:" + message
Every call is recorded in `seen` as (method, metadata, seconds left before its
deadline or None). A call that ends before its handler has answered (its
client cancelled it, or its deadline passed) is recorded in `cancelled`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc import aio

SERVICE = "offramp.test.Echo"


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


@dataclass
class GrpcApp:
    name: str
    server: aio.Server
    port: int
    seen: list[tuple[str, dict[str, str], float | None]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        await self.server.stop(grace=None)


async def start_grpc_app(name: str, host: str = "127.0.0.1", port: int = 0) -> GrpcApp:
    server = aio.server()
    app = GrpcApp(name, server, 0)
    tag = name.encode() + b":"

    def record(method_name: str, context: aio.ServicerContext[bytes, bytes]) -> list[bool]:
        """Note the call; returns a flag the handler sets once it has answered.
        A call that ends without it was cancelled (grpcio's `cancelled()`
        does not tell, seen with 1.85)."""
        metadata = {k: str(v) for k, v in (context.invocation_metadata() or ())}
        app.seen.append((method_name, metadata, context.time_remaining()))
        answered = [False]

        def done(_: object) -> None:
            if not answered[0]:
                app.cancelled.append(method_name)

        context.add_done_callback(done)
        return answered

    async def unary(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        answered = record("Unary", context)
        if request.startswith(b"sleep:"):
            await asyncio.sleep(float(request[6:]))
        answered[0] = True
        if request.startswith(b"fail:"):
            code = grpc.StatusCode[request[5:].decode()]
            context.set_trailing_metadata((("x-failed-by", name),))
            await context.abort(code, f"{name} failed this call on purpose")
        return tag + request

    async def server_stream(
        request: bytes, context: aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        answered = record("ServerStream", context)
        count, _, pause = request.partition(b":")
        for i in range(int(count)):
            if i and pause:
                await asyncio.sleep(float(pause))
            yield tag + str(i).encode()
        answered[0] = True

    async def client_stream(
        requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        answered = record("ClientStream", context)
        count = total = 0
        async for message in requests:
            count += 1
            total += len(message)
        answered[0] = True
        return tag + f"{count}:{total}".encode()

    async def bidi(
        requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        answered = record("Bidi", context)
        async for message in requests:
            yield tag + message
        answered[0] = True

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    app.port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return app


class EchoClient:
    """The four calls of `offramp.test.Echo` on one real grpcio channel."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, own_connection: bool = False):
        # grpcio shares one connection among channels to the same target unless
        # a channel asks for its own subchannel pool.
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        self.channel = aio.insecure_channel(f"{host}:{port}", options=options)
        self.unary = self.channel.unary_unary(method("Unary"))
        self.server_stream = self.channel.unary_stream(method("ServerStream"))
        self.client_stream = self.channel.stream_unary(method("ClientStream"))
        self.bidi = self.channel.stream_stream(method("Bidi"))

    async def close(self) -> None:
        await self.channel.close()
