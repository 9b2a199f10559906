"""`offramp-sidecar webhook`: the mutating admission webhook, over HTTPS.

POST /mutate/pod and /mutate/namespace take an AdmissionReview (v1) and answer
with one (see `sidecar.inject.admission`); GET /healthz answers 200. A body that is
not JSON or not a review gets 400 with the reason; nothing a caller sends
stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from pathlib import Path

from aiohttp import web

from sidecar.inject.admission import BadReview, Scope, WebhookPolicy, review

__all__ = ["make_app", "serve"]

log = logging.getLogger("offramp.webhook")

MAX_BODY = 4 * 1024 * 1024


def make_app(policy: WebhookPolicy) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        scope: Scope = "namespace" if request.match_info["scope"] == "namespace" else "pod"
        try:
            body = json.loads(await request.read())
            answer = review(body, policy, scope)
        except (ValueError, BadReview) as e:
            log.warning("refused a malformed admission review: %s", e)
            return web.json_response({"error": f"offramp webhook: {e}"}, status=400)
        response = answer["response"]
        log.info(
            "pod review %s: %s",
            response["uid"],
            "injected" if "patch" in response else "; ".join(response.get("warnings", ["skipped"])),
        )
        return web.json_response(answer)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/mutate/{scope:pod|namespace}", mutate)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(policy: WebhookPolicy, host: str, port: int, cert: Path, key: Path) -> int:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(make_app(policy), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    log.info("offramp webhook: https://%s:%d/mutate/{pod,namespace}", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0
