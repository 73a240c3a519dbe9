"""The metrics endpoint: a small threaded HTTP server around the registry.

Hardening against the clients a fleet-wide agent meets: a socket timeout for
slow clients, a cap on concurrent connections, bounded request lines and
headers (http.server's own limits), and nothing but GET/HEAD.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .webconfig import WebConfig

log = logging.getLogger("connwatch.web")

CLIENT_TIMEOUT_SECONDS = 10
MAX_CONNECTIONS = 64
LANDING = """<html><head><title>connwatch</title></head><body>
<h1>connwatch</h1><p><a href="{path}">Metrics</a></p></body></html>
"""


def parse_listen_address(addr: str) -> tuple[str, int]:
    """node_exporter style: ':9476', '127.0.0.1:9476', '[::1]:9476'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--web.listen-address {addr!r}: expected [host]:port")
    host = host.strip("[]")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr, handler, family):
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(addr, handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # ':port' means every address, IPv4 included
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            request.close()  # over the cap: shed instead of queueing threads
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(address: str, path: str, registry: CollectorRegistry,
                web_config: WebConfig | None = None) -> ThreadingHTTPServer:
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if (not host or ":" in host) else socket.AF_INET
    if not host:
        host = "::"
    auth = web_config.check_basic_auth if web_config else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "connwatch"
        sys_version = ""
        timeout = CLIENT_TIMEOUT_SECONDS
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                  extra: dict[str, str] | None = None, head: bool = False):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _handle(self, head: bool):
            if auth is not None and not auth(self.headers.get("Authorization")):
                self._send(401, b"Unauthorized\n", extra={"WWW-Authenticate": 'Basic realm="connwatch"'},
                           head=head)
                return
            target = self.path.split("?", 1)[0]
            if target == path:
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST, head=head)
            elif target == "/":
                self._send(200, LANDING.format(path=path).encode(), "text/html; charset=utf-8", head=head)
            else:
                self._send(404, b"Not Found\n", head=head)

        def do_GET(self):
            self._handle(head=False)

        def do_HEAD(self):
            self._handle(head=True)

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except (ConnectionError, TimeoutError, ssl.SSLError):
                self.close_connection = True

    server = _Server((host, port), Handler, family)
    if web_config and web_config.ssl_context:
        server.socket = web_config.ssl_context.wrap_socket(server.socket, server_side=True,
                                                            do_handshake_on_connect=False)
    return server
