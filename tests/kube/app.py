"""The test app an "app image" runs: answers every request with who answered and
whom it saw, so a test can tell the app from the local process and see whether
the request passed through the sidecar (peer 127.0.0.1) or came straight in.
`GET /__env` answers with its environment, to compare with what offramp hands
the local process.

    python -m tests.kube.app --port 8080 [--port 9090]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/__env":
            self._send(json.dumps({"env": dict(os.environ)}).encode())
            return
        body = json.dumps(
            {
                "served_by": "app",
                "pod": os.environ.get("HOSTNAME", ""),
                "peer": self.client_address[0],
                "port": self.server.server_address[1],
                "path": self.path,
                "user_agent": self.headers.get("User-Agent", ""),
            }
        ).encode()
        self._send(body)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if "kube-probe" not in self.headers.get("User-Agent", ""):
            print(f"{self.client_address[0]} {self.requestline}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--host", default="0.0.0.0")
    args = p.parse_args()
    servers = [ThreadingHTTPServer((args.host, port), Handler) for port in args.port]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
