"""The metrics endpoint: a small threaded HTTP server around the registry.

Hardened against the clients a fleet-wide agent meets:

* every connection has a deadline for its whole request line and headers
  (and its TLS handshake), not only a per-read timeout, so a client that
  trickles a byte a second is cut off after REQUEST_TIMEOUT_SECONDS;
* request lines and header lines are capped at 64 KiB, at most 100 headers
  (http.server's limits: 414 / 431), the whole request head at
  MAX_REQUEST_HEAD_BYTES (431), HTTP/0.9 is refused;
* at most MAX_CONNECTIONS connections are served at once. A new connection
  over the cap first evicts the longest-waiting connection that has not sent
  a complete request for EVICT_AFTER_SECONDS (slowloris); if none can be
  evicted it gets a clean ``503 Service Unavailable`` with ``Retry-After``
  from one of SHED_CONNECTIONS cheap threads, and only beyond that is it
  closed unanswered;
* GET and HEAD only (405 for the other methods);
* with TLS, a plain-HTTP request to the TLS port gets a 400 and no data.

What happened to each connection is counted in ``server.stats`` and served
as ``connwatch_http_connections_total{outcome}`` (accepted, shed_503,
shed_closed, evicted).
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import _SocketWriter

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import CollectorRegistry

from .webconfig import WebConfig

log = logging.getLogger("connwatch.web")

CLIENT_TIMEOUT_SECONDS = 10     # writing a response; also a single read
REQUEST_TIMEOUT_SECONDS = 10    # first request line + headers (+ TLS handshake), in total
KEEPALIVE_TIMEOUT_SECONDS = 30  # a kept-alive connection's next request, in total
SHED_TIMEOUT_SECONDS = 2        # a shed connection's request, before its 503
MAX_CONNECTIONS = 64
SHED_CONNECTIONS = 64
# request line + headers, in total (each line is also capped at 64 KiB)
MAX_REQUEST_HEAD_BYTES = 96 * 1024
EVICT_AFTER_SECONDS = 1.0
LANDING = """<html><head><title>connwatch</title></head><body>
<h1>connwatch</h1><p><a href="{path}">Metrics</a></p></body></html>
"""
PLAIN_HTTP_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
OTHER_METHODS = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")


def parse_listen_address(addr: str) -> tuple[str, int]:
    """node_exporter style: ':9476', '127.0.0.1:9476', '[::1]:9476'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() for c in addr):
        raise ValueError(f"--web.listen-address {addr!r}: expected [host]:port with a port 0-65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"--web.listen-address {addr!r}: unbalanced brackets around the IPv6 address")
    host = host.strip("[]")
    return host, int(port)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    since: float
    reading: bool = True  # waiting for (the rest of) a request: evictable
    evicted: bool = False


class _Reject(Exception):
    def __init__(self, reply: bytes | None):
        self.reply = reply


class _HeadTooLarge(Exception):
    pass


class _DeadlineIO(io.RawIOBase):
    """Socket reads that together must finish before the handler's deadline
    and, per request, stay under MAX_REQUEST_HEAD_BYTES."""

    def __init__(self, handler: _HandlerBase):
        self._h = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        h = self._h
        remaining = h.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        if h.head_bytes >= MAX_REQUEST_HEAD_BYTES:
            raise _HeadTooLarge()
        sock = h.connection
        sock.settimeout(min(remaining, CLIENT_TIMEOUT_SECONDS))
        try:
            n = sock.recv_into(b)
        finally:
            sock.settimeout(CLIENT_TIMEOUT_SECONDS)  # for the response
        h.head_bytes += n
        return n


class _HandlerBase(BaseHTTPRequestHandler):
    server_version = "connwatch"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # errors found before the version is parsed still get a status line
    default_request_version = "HTTP/1.0"
    shed = False
    deadline = 0.0
    head_bytes = 0

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def setup(self):
        srv: _Server = self.server
        self._conn = srv.conn_of(self.request)
        self._first = True
        self._reject: _Reject | None = None
        self.deadline = time.monotonic() + (SHED_TIMEOUT_SECONDS if self.shed else REQUEST_TIMEOUT_SECONDS)
        if srv.ssl_context is not None:
            try:
                self.request = self._tls(self.request)
            except _Reject as r:
                self._reject = r
            except (OSError, ssl.SSLError, ValueError) as e:  # handshake failed or timed out
                log.debug("TLS handshake with %s failed: %s", self.client_address[0], e)
                self._reject = _Reject(None)
            srv.set_conn_sock(self._conn, self.request)
        self.connection = self.request
        self.connection.settimeout(CLIENT_TIMEOUT_SECONDS)
        self.rfile = io.BufferedReader(_DeadlineIO(self), 16384)
        self.wfile = _SocketWriter(self.connection)

    def _tls(self, sock: socket.socket) -> ssl.SSLSocket:
        sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise _Reject(None)
        if first[0] != 0x16:  # not a TLS handshake record: someone speaks plain HTTP
            raise _Reject(PLAIN_HTTP_TO_TLS)
        ctx = self.server.web_config.current_ssl_context()  # picks up rotated certificates
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(max(0.001, self.deadline - time.monotonic()))
        tls.do_handshake()
        return tls

    def handle(self):
        if self._reject is not None:
            if self._reject.reply:
                try:
                    self.connection.sendall(self._reject.reply)
                except OSError:
                    pass
            return
        super().handle()

    def handle_one_request(self):
        if not self._first:
            self.deadline = time.monotonic() + KEEPALIVE_TIMEOUT_SECONDS
        self._first = False
        self.head_bytes = 0
        self.server.mark(self._conn, reading=True)
        try:
            super().handle_one_request()
        except _HeadTooLarge:
            self.close_connection = True
            try:
                self.send_error(431, "Request header fields too large")
            except OSError:
                pass
        except (OSError, ssl.SSLError, ValueError) as e:  # includes timeouts and resets
            log.debug("connection from %s: %s", self.client_address[0], e)
            self.close_connection = True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) == 2 or not self.request_version.startswith("HTTP/1."):
            # HTTP/0.9 (no version, or below 1.0): its responses have no status line
            self.request_version = "HTTP/1.0"
            self.close_connection = True
            self.send_error(400, "HTTP versions below 1.0 are not supported")
            return False
        self.server.mark(self._conn, reading=False)
        return True

    def send_response_only(self, code, message=None):
        if not self.request_version.startswith("HTTP/1."):
            # whatever the client claimed (HTTP/0.9 has no status line): answer 1.0, then close
            self.request_version = "HTTP/1.0"
            self.close_connection = True
        super().send_response_only(code, message)

    def end_headers(self):
        for k, v in self.server.extra_headers.items():
            self.send_header(k, v)
        super().end_headers()

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None, head: bool = False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _not_allowed(self):
        self.close_connection = True  # its body (if any) is not read
        self._send(405, b"Method Not Allowed\n", extra={"Allow": "GET, HEAD"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, addr, handler, family, web_config: WebConfig | None):
        self.address_family = family
        self.web_config = web_config
        self.ssl_context = web_config.ssl_context if web_config else None
        self.extra_headers = dict(web_config.headers) if web_config else {}
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._shed_slots = threading.BoundedSemaphore(SHED_CONNECTIONS)
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self.stats = {"accepted": 0, "shed_503": 0, "shed_closed": 0, "evicted": 0}
        shed_handler = type("ShedHandler", (handler,), {"shed": True})
        self._handlers = {False: handler, True: shed_handler}
        super().__init__(addr, handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # ':port' means every address, IPv4 included
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        log.debug("error serving %s", client_address, exc_info=True)

    # ---- connection tracking -------------------------------------------------

    def conn_of(self, sock) -> _Conn:
        with self._lock:
            return self._conns[id(sock)]

    def set_conn_sock(self, conn: _Conn, sock) -> None:
        with self._lock:
            conn.sock = sock

    def mark(self, conn: _Conn, reading: bool) -> None:
        with self._lock:
            conn.reading = reading
            conn.since = time.monotonic()

    def _evict_one(self) -> bool:
        """Cut off the connection that has waited longest without a complete request."""
        now = time.monotonic()
        with self._lock:
            waiting = [c for c in self._conns.values()
                       if c.reading and not c.evicted and now - c.since >= EVICT_AFTER_SECONDS]
            if not waiting:
                return False
            victim = min(waiting, key=lambda c: c.since)
            victim.evicted = True
            try:  # the socket class's own shutdown, also for an SSLSocket: wakes its reader
                socket.socket.shutdown(victim.sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self.stats["evicted"] += 1
        return True

    # ---- accepting -------------------------------------------------------------

    def process_request(self, request, client_address):
        self.stats["accepted"] += 1
        if self._slots.acquire(blocking=False) or (
                self._evict_one() and self._slots.acquire(timeout=0.25)):
            shed = False
        elif self._shed_slots.acquire(blocking=False):
            shed = True
            self.stats["shed_503"] += 1
        else:
            self.stats["shed_closed"] += 1
            self._close(request)
            return
        with self._lock:
            self._conns[id(request)] = _Conn(request, time.monotonic())
        t = threading.Thread(target=self._serve_conn, args=(request, client_address, shed),
                             name="http-conn", daemon=True)
        try:
            t.start()
        except RuntimeError:  # cannot start a thread: shed it
            with self._lock:
                self._conns.pop(id(request), None)
            (self._shed_slots if shed else self._slots).release()
            self._close(request)

    def _serve_conn(self, request, client_address, shed: bool):
        conn = self._conns.get(id(request))
        try:
            self._handlers[shed](request, client_address, self)
        except Exception:
            log.debug("connection from %s failed", client_address, exc_info=True)
        finally:
            with self._lock:
                self._conns.pop(id(request), None)
            self._close(conn.sock if conn is not None else request)
            (self._shed_slots if shed else self._slots).release()

    @staticmethod
    def _close(sock) -> None:
        """Close so the client reads what was sent, not a reset (plain sockets)."""
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.2)
                drained = 0
                while drained < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass
        finally:
            sock.close()


class _HttpCollector:
    """connwatch_http_connections_total{outcome}: the endpoint's own load shedding."""

    def __init__(self, server: _Server):
        self._server = server

    def describe(self):
        return []

    def collect(self):
        c = CounterMetricFamily("connwatch_http_connections",
                                "Connections to the metrics endpoint: accepted; over the cap and answered 503 "
                                "(shed_503) or closed unanswered (shed_closed); cut off to make room (evicted).",
                                labels=["outcome"])
        for outcome, n in sorted(self._server.stats.items()):
            c.add_metric([outcome], n)
        yield c


def make_server(address: str, path: str, registry: CollectorRegistry,
                web_config: WebConfig | None = None) -> ThreadingHTTPServer:
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if (not host or ":" in host) else socket.AF_INET
    if not host:
        host = "::"
    auth = web_config.check_basic_auth if (web_config and web_config.users) else None

    class Handler(_HandlerBase):
        def _handle(self, head: bool):
            if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
                self.close_connection = True  # a body we do not read must not become the next request
            if self.shed:
                self.close_connection = True
                self._send(503, b"Service Unavailable: too many connections\n",
                           extra={"Retry-After": "1"}, head=head)
                return
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

    for method in OTHER_METHODS:
        setattr(Handler, f"do_{method}", _HandlerBase._not_allowed)

    server = _Server((host, port), Handler, family, web_config)
    registry.register(_HttpCollector(server))
    return server
