"""Real alert receivers on loopback: an SMTP server (aiosmtpd) and an HTTP server taking Apprise's JSON webhook."""

from __future__ import annotations

import json
import socket
import threading
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SmtpReceiver:
    """Every message the server accepted, as (subject, plain text of the whole message)."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[dict] = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                message = message_from_bytes(envelope.content, policy=policy.default)
                parts = [p.get_content() for p in message.walk() if p.get_content_maintype() == "text"]
                receiver.messages.append(
                    {"subject": str(message["subject"]), "to": envelope.rcpt_tos, "text": "\n".join(parts)}
                )
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller.loop.is_running():
            self.controller.stop()

    def connection_uri(self, to: str = "ops@example.org") -> str:
        extra = {
            "to": to,
            "from_email": "health-ingest@example.org",
            "disable_tls": True,
            "disable_ssl": True,
            "retry_limit": 0,
            "timeout": 5,
        }
        return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": self.port, "extra": extra})


class WebhookReceiver:
    """Every JSON body POSTed to the server."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def connection_uri(self) -> str:
        config = {"path": f"json://127.0.0.1:{self.port}/alerts", "tag": "all"}
        return json.dumps({"conn_type": "apprise", "extra": {"config": config}})
