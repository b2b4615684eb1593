"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 that verifies each POST with the
``standardwebhooks`` package's own verifier (as a customer's endpoint would) and keeps what it got."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    def __init__(self, port: int = 0, *, fail_first: int = 0):
        self.secret: str | None = None
        self.received: list[dict] = []  # verified payloads, with their webhook-id
        self.rejected: list[str] = []  # why a POST failed verification
        self.raw: list[tuple[bytes, dict[str, str]]] = []  # every POST as it came: body and headers
        self.fail_first = fail_first  # answer 500 to the first N verified POSTs
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.raw.append((body, dict(self.headers)))
                try:
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers))
                except (WebhookVerificationError, TypeError, ValueError) as error:
                    receiver.rejected.append(str(error))
                    self.send_response(400)
                else:
                    if receiver.fail_first > 0:
                        receiver.fail_first -= 1
                        self.send_response(500)
                    else:
                        receiver.received.append({"webhook_id": self.headers["webhook-id"], **payload})
                        self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self, job_id: str | None = None) -> list[str]:
        return [p["type"] for p in self.received if job_id is None or p["data"]["id"] == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __repr__(self) -> str:
        return json.dumps({"received": self.received, "rejected": self.rejected})[:2000]
