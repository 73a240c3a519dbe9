"""The metrics endpoint: cheroot serving prometheus_client's WSGI app.

cheroot (python3-cheroot) parses requests, keeps connections alive, runs the
worker threads and wraps TLS (its builtin adapter, with the context from the
web config). `_App` answers: GET and HEAD only, basic auth, the configured
headers, the landing page at / and 404 elsewhere.

A fleet-wide agent meets clients that stock cheroot 9.0 does not stand up to
(each measured, docs/security.md); the rest of this module is that policy,
as small hooks into cheroot's classes:

* at most MAX_CONNECTIONS connections at once, idle or not. A new
  connection over the cap first evicts the one that has waited longest (at
  least EVICT_AFTER_SECONDS) for a request; if none can be evicted it is
  answered ``503 Service Unavailable`` with ``Retry-After`` (up to
  SHED_CONNECTIONS at once), and beyond that closed unanswered. cheroot
  queues it until a worker is free: a scrape waited 9.8 s behind 64 idle
  connections.
* a deadline for a connection's whole request line and headers (and TLS
  handshake), REQUEST_TIMEOUT_SECONDS, kept by a reaper thread. cheroot's
  ``timeout`` bounds each read only: a client sending a byte every 0.5 s was
  still connected after 40 s.
* the TLS handshake in the worker thread, not in cheroot's only accepting
  thread (cheroot#748: one client that connected and sent nothing held up a
  TLS scrape for 9.8 s); a plain-HTTP request to the TLS port gets a 400
  (cheroot: a reset).
* 431 for a request head over MAX_REQUEST_HEAD_BYTES or MAX_HEADER_LINES
  lines (cheroot: 413, and no line limit), ``Allow`` on every 405, and the
  connection closed after a request with a body, which is never read (cheroot
  took a chunked GET body for a second request).

What happened to each connection is served as
``connwatch_http_connections_total{outcome}``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping

import bcrypt
from cheroot import errors, wsgi
from cheroot import server as cheroot_server
from cheroot.ssl.builtin import BuiltinSSLAdapter
from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from . import metrics
from .config import ConfigError
from .webconfig import TLSConfig, WebConfig

log = logging.getLogger("connwatch.web")

# cheroot's timeout (one read or write, an idle kept-alive connection), and
# the whole request line + headers (+ TLS handshake) of a connection
REQUEST_TIMEOUT_SECONDS = 10
SHED_TIMEOUT_SECONDS = 2  # a shed connection's request, before its 503
MAX_CONNECTIONS = 64
SHED_CONNECTIONS = 64
# worker threads beyond MAX_CONNECTIONS: shed connections get their 503 while
# MAX_CONNECTIONS slow clients hold a worker each
SHED_WORKERS = 8
MAX_REQUEST_HEAD_BYTES = 64 * 1024  # request line + headers: 414 in the line, 431 after it
MAX_HEADER_LINES = 100
EVICT_AFTER_SECONDS = 1.0
REAP_INTERVAL_SECONDS = 0.5
BCRYPT_CONCURRENCY = 2
VERIFIED_CACHE_SIZE = 1024
# certificate files are checked for changes at most this often (rotation)
TLS_RELOAD_CHECK_SECONDS = 1.0
LANDING = """<html><head><title>connwatch</title></head><body>
<h1>connwatch</h1><p><a href="{path}">Metrics</a></p></body></html>
"""
PLAIN_HTTP_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
OTHER_METHODS = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
ALLOW = ("Allow", "GET, HEAD")
TEXT = ("Content-Type", "text/plain; charset=utf-8")
# headers some statuses need: RFC 9110 requires Allow on a 405
STATUS_HEADERS = {"405": (ALLOW,), "503": (("Retry-After", "1"),)}
OUTCOMES = ("accepted", "shed_503", "shed_closed", "evicted")


def parse_listen_address(addr: str) -> tuple[str, int]:
    """node_exporter style: ':9476', '127.0.0.1:9476', '[::1]:9476'."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() for c in addr):
        raise ValueError(f"--web.listen-address {addr!r}: expected [host]:port with a port 0-65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"--web.listen-address {addr!r}: unbalanced brackets around the IPv6 address")
    host = host.strip("[]")
    return host, int(port)


# ---- the application -------------------------------------------------------------


class _BasicAuth:
    """Authorization headers checked against the configured bcrypt hashes.

    A verified header is remembered (by its SHA-256), so a scraper pays
    bcrypt's cost once, not every 15 s; at most BCRYPT_CONCURRENCY checks run
    at once, so a flood of wrong passwords cannot take every CPU; an unknown
    user is checked against a dummy hash of the same cost, so response times
    do not tell which users exist.
    """

    def __init__(self, users: Mapping[str, bytes]):
        self._users = users
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt_slots = threading.BoundedSemaphore(BCRYPT_CONCURRENCY)

    @functools.cached_property
    def _dummy_hash(self) -> bytes:
        cost = max(int(h[4:6]) for h in self._users.values())
        return bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(rounds=cost))

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic ") or len(header) > 4096:
            return False
        digest = hashlib.sha256(header.encode(errors="replace")).digest()
        with self._lock:
            if digest in self._verified:
                return True
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not sep:
            return False
        hashed = self._users.get(user)
        with self._bcrypt_slots:
            try:
                ok = bcrypt.checkpw(password.encode(), hashed or self._dummy_hash) and hashed is not None
            except ValueError:  # NUL bytes in the password and the like
                ok = False
        if ok:
            with self._lock:
                if len(self._verified) >= VERIFIED_CACHE_SIZE:
                    self._verified.clear()
                self._verified.add(digest)
        return ok


class _App:
    """The WSGI application: the metrics (prometheus_client's app) at the
    telemetry path, a landing page at /, 404 elsewhere; GET and HEAD only,
    behind basic auth if configured. Every answer has a Content-Length and
    the configured headers."""

    def __init__(self, path: str, metrics, auth: _BasicAuth | None, headers: tuple[tuple[str, str], ...]):
        self._path = path
        self._metrics = metrics
        self._auth = auth
        self._headers = headers

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        if method in OTHER_METHODS:
            return self._answer(start_response, "405 Method Not Allowed", b"Method Not Allowed\n", [TEXT, ALLOW])
        if method not in ("GET", "HEAD"):
            return self._answer(start_response, "501 Not Implemented", b"Not Implemented\n")
        head = method == "HEAD"
        if self._auth is not None and not self._auth.check(environ.get("HTTP_AUTHORIZATION")):
            return self._answer(start_response, "401 Unauthorized", b"Unauthorized\n",
                                [TEXT, ("WWW-Authenticate", 'Basic realm="connwatch"')], head)
        path = environ["PATH_INFO"]
        if path == self._path:
            # the exposition is one bytes object anyway; with its length known
            # cheroot sends it as is rather than chunked, and HEAD can tell it
            reply = {}
            body = b"".join(self._metrics(environ, lambda status, headers, exc_info=None: reply.update(
                status=status, headers=headers)))
            return self._answer(start_response, reply["status"], body, reply["headers"], head)
        if path == "/":
            return self._answer(start_response, "200 OK", LANDING.format(path=self._path).encode(),
                                [("Content-Type", "text/html; charset=utf-8")], head)
        return self._answer(start_response, "404 Not Found", b"Not Found\n", [TEXT], head)

    def _answer(self, start_response, status: str, body: bytes, headers=(TEXT,), head: bool = False):
        start_response(status, [*headers, ("Content-Length", str(len(body))), *self._headers])
        return [] if head else [body]


# ---- the connection policy, in cheroot's classes ------------------------------------


class _ConnectionCap:
    """Which connections are served, answered 503, evicted or cut off at
    their deadline. A connection counts from its accept to its close, idle or
    not: a slowloris holds connections, not requests."""

    def __init__(self):
        self._lock = threading.Lock()
        self._served: set[_Connection] = set()
        self._shed: set[_Connection] = set()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)

    def admit(self, conn: _Connection) -> bool:
        """A new connection: served (evicting a waiting one if need be) or
        shed; False if it is to be closed unanswered."""
        now = time.monotonic()
        with self._lock:
            self.outcomes["accepted"] += 1
            if len(self._served) < MAX_CONNECTIONS or self._evict(now):
                self._served.add(conn)
            elif len(self._shed) < SHED_CONNECTIONS:
                conn.shed = True
                self._shed.add(conn)
                self.outcomes["shed_503"] += 1
            else:
                self.outcomes["shed_closed"] += 1
                return False
            conn.admitted = True
            conn.waiting_since = now
            return True

    def _evict(self, now: float) -> bool:
        waiting = [c for c in self._served
                   if c.waiting_since is not None and now - c.waiting_since >= EVICT_AFTER_SECONDS]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.waiting_since)
        self._served.remove(victim)  # its slot is free now; its worker closes it
        victim.cut()
        self.outcomes["evicted"] += 1
        return True

    def waiting(self, conn: _Connection) -> None:
        with self._lock:
            conn.waiting_since = time.monotonic()

    def serving(self, conn: _Connection) -> None:
        with self._lock:
            conn.waiting_since = None

    def closed(self, conn: _Connection) -> None:
        with self._lock:
            self._served.discard(conn)
            self._shed.discard(conn)

    def cut_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            for conn in self._served | self._shed:
                limit = SHED_TIMEOUT_SECONDS if conn.shed else REQUEST_TIMEOUT_SECONDS
                if conn.waiting_since is not None and now - conn.waiting_since > limit:
                    conn.cut()


class _HeaderReader(cheroot_server.HeaderReader):
    """cheroot's header parser, stopping after MAX_HEADER_LINES lines (cheroot
    bounds the head's size only)."""

    def __call__(self, rfile, hdict=None):
        return super().__call__(_LineBudget(rfile, MAX_HEADER_LINES + 1), hdict)  # + the empty last line


class _LineBudget:
    def __init__(self, rfile, lines: int):
        self._rfile = rfile
        self._left = lines

    def readline(self) -> bytes:
        if self._left == 0:
            raise errors.MaxSizeExceeded()
        self._left -= 1
        return self._rfile.readline()


class _Request(cheroot_server.HTTPRequest):
    header_reader = _HeaderReader()

    def parse_request(self):
        super().parse_request()
        if self.ready:
            self.server.cap.serving(self.conn)

    def read_request_headers(self) -> bool:
        try:
            if not super().read_request_headers():
                return False
        except errors.MaxSizeExceeded:  # cheroot answers 413, the status for a body
            self.simple_response("431 Request Header Fields Too Large")
            return False
        if self.inheaders.get(b"Content-Length", b"0") != b"0" or b"Transfer-Encoding" in self.inheaders:
            self.close_connection = True  # the body is never read: it must not be taken for a next request
        return True

    def respond(self):
        if self.conn.shed:
            self.simple_response("503 Service Unavailable", "Service Unavailable: too many connections")
        else:
            super().respond()

    def simple_response(self, status, msg=""):
        """cheroot's own answers (its errors, and the 431 and 503 above), each
        closing the connection, with the configured headers and the status's
        own (cheroot answers CONNECT with a 405 without Allow)."""
        status = str(status)
        body = f"{msg or status[4:]}\n".encode("latin-1", "replace")
        headers = [TEXT, ("Content-Length", str(len(body))), ("Connection", "close"),
                   *STATUS_HEADERS.get(status[:3], ()), *self.server.extra_headers]
        self.close_connection = True
        response = (f"{self.server.protocol} {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
                    + "\r\n").encode("latin-1")
        if getattr(self, "method", None) != b"HEAD":  # known once the request line is parsed
            response += body
        # a client that is gone cannot be answered; raising would end cheroot's worker thread
        with contextlib.suppress(OSError):
            self.conn.wfile.write(response)


class _Connection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _Request
    admitted = False  # set by _ConnectionCap.admit
    shed = False  # over the cap: answered 503
    waiting_since: float | None = None  # waiting for (the rest of) a request since; None while one is served

    def __init__(self, server, sock, makefile):
        super().__init__(server, sock, makefile)
        self._handshake_pending = isinstance(sock, ssl.SSLSocket)

    def communicate(self) -> bool:
        if self._handshake_pending and not self._handshake():
            return False
        keep_open = super().communicate()
        if keep_open:
            self.server.cap.waiting(self)  # for its next request, in cheroot's selector
        return keep_open

    def _handshake(self) -> bool:
        """The TLS handshake, here in a worker thread (see _TLSAdapter.wrap)."""
        self._handshake_pending = False
        try:
            self.socket.do_handshake()
            return True
        except ssl.SSLError as e:
            if e.reason == "HTTP_REQUEST":  # OpenSSL read "GET ", "POST", "HEAD" or "PUT "
                _answer_in_clear(self.socket, PLAIN_HTTP_TO_TLS)
            else:
                log.debug("TLS handshake with %s failed: %s", self.remote_addr, e)
        except OSError as e:  # reset, timeout, cut off at the deadline
            log.debug("TLS handshake with %s failed: %s", self.remote_addr, e)
        return False

    def cut(self) -> None:
        """Hang up on a client that is sending no request: its reader (a
        worker, or cheroot's selector) sees end-of-file."""
        self.waiting_since = None
        with contextlib.suppress(OSError):
            # the socket class's own shutdown, also for an SSLSocket (whose
            # own would unwrap it under its reader's feet)
            socket.socket.shutdown(self.socket, socket.SHUT_RDWR)

    def close(self):
        self.server.cap.closed(self)
        super().close()


def _answer_in_clear(sock: ssl.SSLSocket, reply: bytes) -> None:
    """Send a plain-text reply under TLS, then read what the client still
    sends until it closes, so that it reads the reply, not a reset."""
    raw = socket.socket  # its methods act on the file descriptor, not through TLS
    with contextlib.suppress(OSError):
        raw.sendall(sock, reply)
        raw.shutdown(sock, socket.SHUT_WR)
        sock.settimeout(0.2)
        drained = 0
        while drained < 65536 and (chunk := raw.recv(sock, 4096)):
            drained += len(chunk)


def _stamp(paths: tuple[str, ...]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class _TLSAdapter(BuiltinSSLAdapter):
    """cheroot's builtin adapter with the configured context (client
    certificates, versions), rebuilt when the certificate files change, and
    without the handshake in wrap()."""

    def __init__(self, config: TLSConfig):
        super().__init__(config.cert_file, config.key_file)
        self._config = config
        self.context = config.context()
        self._stamp = _stamp(config.files)
        self._checked = time.monotonic()

    def wrap(self, sock):
        """cheroot calls this from its one accepting thread (so no lock here).
        BuiltinSSLAdapter.wrap handshakes right here: a client that connects
        and sends nothing holds up every other connection for ``timeout``
        (cheroot#748). The worker does it (_Connection._handshake)."""
        self._reload_if_rotated()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), {}

    def _reload_if_rotated(self) -> None:
        """Rotated certificates (cert-manager, a Kubernetes secret volume, a
        renew hook) are served to new connections without a restart. A new
        set of files that does not load (say the certificate was replaced but
        not yet its key) is logged and the previous context kept until the
        files change again."""
        now = time.monotonic()
        if now - self._checked < TLS_RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        stamp = _stamp(self._config.files)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.context = self._config.context()
            log.info("TLS files changed: reloaded %s", ", ".join(self._config.files))
        except ConfigError as e:
            log.warning("TLS files changed but do not load, keeping the previous ones: %s", e)


class _Cheroot(wsgi.Server):
    """cheroot's WSGI server, with the connection class and cap above, and
    listening from construction."""

    ConnectionClass = _Connection

    def __init__(self, bind_addr: tuple[str, int], family: int, app: _App, cap: _ConnectionCap,
                 web_config: WebConfig):
        super().__init__(bind_addr, app, numthreads=MAX_CONNECTIONS + SHED_WORKERS, server_name="connwatch",
                         request_queue_size=128, timeout=REQUEST_TIMEOUT_SECONDS, shutdown_timeout=1)
        self.max_request_header_size = MAX_REQUEST_HEAD_BYTES
        self.cap = cap
        self.extra_headers = web_config.headers
        if web_config.tls is not None:
            self.ssl_adapter = _TLSAdapter(web_config.tls)
        # listening from here on: a connection made while the agent starts up
        # waits in the accept queue until the threads start
        self._listener = super().bind(family, socket.SOCK_STREAM)
        self._listener.listen(self.request_queue_size)

    def bind(self, family, type, proto=0):
        """prepare() makes its socket here: it is the one listening since __init__."""
        self.socket = self._listener
        return self.socket

    def process_conn(self, conn: _Connection):
        """cheroot passes new connections, and kept-alive ones with a next
        request, to its workers here; its own answer to overload is a queue."""
        if not conn.admitted and not self.cap.admit(conn):
            conn.close()
            return
        super().process_conn(conn)

    def stop(self):
        super().stop()  # does nothing unless started
        self._listener.close()

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        # cheroot writes these to stderr. Up to warnings they are a client's
        # doing (a reset, a broken TLS record), not the agent's.
        log.log(level if level >= logging.ERROR else logging.DEBUG, "%s", msg, exc_info=traceback)


class _HttpCollector:
    """connwatch_http_connections_total{outcome}: the endpoint's own load shedding."""

    def __init__(self, cap: _ConnectionCap):
        self._cap = cap

    def describe(self):
        return []

    def collect(self):
        c = metrics.HTTP_CONNECTIONS.family()
        for outcome, n in sorted(self._cap.outcomes.items()):
            c.add_metric([outcome], n)
        yield c


class MetricsServer:
    """The endpoint: listening from construction, serving from start().

    start() is separate so that the agent can start the threads after it
    dropped its capabilities: threads made before keep the old sets.
    """

    def __init__(self, address: str, path: str, registry: CollectorRegistry, web_config: WebConfig | None = None):
        host, port = parse_listen_address(address)
        web_config = web_config or WebConfig()
        family = socket.AF_INET6 if (not host or ":" in host) else socket.AF_INET
        self._cap = _ConnectionCap()
        auth = _BasicAuth(web_config.users) if web_config.users else None
        app = _App(path, make_wsgi_app(registry), auth, web_config.headers)
        self._cheroot = _Cheroot((host or "::", port), family, app, self._cap, web_config)
        self._stopping = threading.Event()
        registry.register(_HttpCollector(self._cap))

    @property
    def address(self) -> tuple[str, int]:
        return self._cheroot.bind_addr[:2]

    def start(self) -> None:
        """cheroot's workers, its accepting thread, and the reaper of overdue requests."""
        self._cheroot.prepare()
        threading.Thread(target=self._cheroot.serve, name="http", daemon=True).start()
        threading.Thread(target=self._reap, name="http-reaper", daemon=True).start()

    def _reap(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL_SECONDS):
            self._cap.cut_overdue()

    def stop(self) -> None:
        self._stopping.set()
        self._cheroot.stop()
