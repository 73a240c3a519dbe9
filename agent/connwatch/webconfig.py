"""TLS and basic auth for /metrics, in the Prometheus exporter-toolkit
web-config format (the file node_exporter takes as --web.config.file):

    tls_server_config:
      cert_file: /etc/connwatch/tls.crt
      key_file: /etc/connwatch/tls.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: /etc/connwatch/ca.crt           # required with the *Verify* modes
      min_version: TLS12                              # optional
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt hash
    http_server_config:
      headers:                                        # optional, added to every response
        Strict-Transport-Security: max-age=31536000

Every key is checked like the main config: unknown keys, wrong types and
unsupported values are errors naming the key (exit 2), never ignored.
Relative file paths are relative to the web config file's directory.

Passwords are checked with bcrypt; each verified Authorization header is
cached (by its SHA-256) so a 15 s scrape interval does not pay bcrypt's cost
each time, and at most two bcrypt checks run at once so wrong-password
floods cannot take every CPU.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import bcrypt
import yaml

from .config import ConfigError, read_text, safe_load, yaml_error

log = logging.getLogger("connwatch.webconfig")

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
# exporter-toolkit client_auth_type -> (ssl verify mode, CA required)
_CLIENT_AUTH = {
    "NoClientCert": (ssl.CERT_NONE, False),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
# Go can ask for a client certificate without verifying it; OpenSSL through
# Python's ssl module cannot, so these are refused rather than weakened.
_UNSUPPORTED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert"}
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# $2a$/$2b$/$2y$, cost 04-31, 22 chars of salt + 31 of hash in bcrypt's base64
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# headers the server sets itself; configuring them would break responses
_RESERVED_HEADERS = {"content-length", "content-type", "connection", "transfer-encoding",
                     "www-authenticate", "date", "server"}
BCRYPT_CONCURRENCY = 2
# certificate files are checked for changes at most this often (rotation)
TLS_RELOAD_CHECK_SECONDS = 1.0


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _verified: dict[bytes, str] = field(default_factory=dict)
    _dummy: bytes | None = None
    _tls_build: Callable[[], ssl.SSLContext] | None = None
    _tls_files: tuple[str, ...] = ()
    _tls_stamp: tuple = ()
    _tls_checked: float = 0.0

    def current_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context, rebuilt when a certificate, key or CA file changed.

        Rotated certificates (cert-manager, a Kubernetes secret volume, a
        renew hook) are picked up by new connections without a restart. A
        new set of files that does not load (say the cert was replaced but
        not yet its key) is logged and the previous context kept until the
        files change again.
        """
        if self.ssl_context is None or self._tls_build is None:
            return self.ssl_context
        now = time.monotonic()
        if now - self._tls_checked < TLS_RELOAD_CHECK_SECONDS:
            return self.ssl_context
        with self._lock:
            if now - self._tls_checked < TLS_RELOAD_CHECK_SECONDS:
                return self.ssl_context
            self._tls_checked = now
            stamp = _stamp(self._tls_files)
            if stamp != self._tls_stamp:
                self._tls_stamp = stamp
                try:
                    self.ssl_context = self._tls_build()
                    log.info("TLS files changed: reloaded %s", ", ".join(self._tls_files))
                except ConfigError as e:
                    log.warning("TLS files changed but do not load, keeping the previous ones: %s", e)
        return self.ssl_context
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bcrypt_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(BCRYPT_CONCURRENCY))

    def _dummy_hash(self) -> bytes:
        """A hash as costly as the configured ones, for unknown user names."""
        if self._dummy is None:
            cost = max(int(h[4:6]) for h in self.users.values())
            self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(rounds=cost))
        return self._dummy

    def check_basic_auth(self, header: str | None) -> bool:
        if not self.users:
            return True
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
        hashed = self.users.get(user)
        # compare against a dummy hash for unknown users: no user-enumeration timing
        with self._bcrypt_slots:
            try:
                ok = bcrypt.checkpw(password.encode(), hashed or self._dummy_hash()) and hashed is not None
            except ValueError:  # NUL bytes in the password and the like
                ok = False
        if ok:
            with self._lock:
                if len(self._verified) > 1024:
                    self._verified.clear()
                self._verified[digest] = user
        return ok




def _stamp(paths: tuple[str, ...]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _tls_files(tls: dict, base: str) -> tuple[str, ...]:
    path = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    return tuple(path(tls[k]) for k in ("cert_file", "key_file", "client_ca_file") if tls.get(k))


def _str(tls: dict, key: str, required: bool = False) -> str | None:
    value = tls.get(key)
    if value is None:
        if required:
            raise ConfigError(f"tls_server_config.{key}: required")
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"tls_server_config.{key}: expected a non-empty string, got {value!r}")
    return value


def _version(tls: dict, key: str, default: str | None) -> ssl.TLSVersion | None:
    value = tls.get(key, default)
    if value is None:
        return None
    if value not in _VERSIONS:
        raise ConfigError(f"tls_server_config.{key}: {value!r} is not one of {', '.join(_VERSIONS)}")
    return _VERSIONS[value]


def _tls_context(tls, base: str) -> ssl.SSLContext:
    if not isinstance(tls, dict):
        raise ConfigError(f"tls_server_config: expected a mapping, got {type(tls).__name__}")
    unknown = sorted((k for k in tls if k not in _TLS_KEYS), key=str)
    if unknown:
        raise ConfigError(f"tls_server_config: unknown key {unknown[0]} (known: {', '.join(sorted(_TLS_KEYS))})")
    path = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cert, key = _str(tls, "cert_file", True), _str(tls, "key_file", True)
    ca = _str(tls, "client_ca_file")
    mode = tls.get("client_auth_type", "NoClientCert")
    if mode in _UNSUPPORTED_CLIENT_AUTH:
        raise ConfigError(f"tls_server_config.client_auth_type: {mode} is not supported "
                          "(use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file)")
    if mode not in _CLIENT_AUTH:
        raise ConfigError(f"tls_server_config.client_auth_type: {mode!r} is not one of {', '.join(_CLIENT_AUTH)}")
    verify_mode, needs_ca = _CLIENT_AUTH[mode]
    if needs_ca and not ca:
        raise ConfigError(f"tls_server_config.client_ca_file: required when client_auth_type is {mode}")
    for key_name, want in (("cipher_suites", list), ("curve_preferences", list),
                           ("prefer_server_cipher_suites", bool)):
        if key_name in tls:
            if not isinstance(tls[key_name], want):
                raise ConfigError(f"tls_server_config.{key_name}: expected a {want.__name__}")
            log.warning("tls_server_config.%s is accepted for compatibility and ignored: "
                        "OpenSSL's defaults apply", key_name)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(tls, "min_version", "TLS12")
    max_version = _version(tls, "max_version", None)
    if max_version is not None:
        if max_version < ctx.minimum_version:
            raise ConfigError("tls_server_config.max_version: lower than min_version")
        ctx.maximum_version = max_version
    try:
        ctx.load_cert_chain(path(cert), path(key))
    except FileNotFoundError as e:
        raise ConfigError(f"tls_server_config: cert_file/key_file {e.filename or path(cert)}: "
                          "no such file") from None
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"tls_server_config: cannot load cert_file {cert} / key_file {key}: {reason}") from None
    ctx.verify_mode = verify_mode
    if ca:
        try:
            ctx.load_verify_locations(path(ca))
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            raise ConfigError(f"tls_server_config.client_ca_file {ca}: {reason}") from None
    return ctx


def _users(users) -> dict[str, bytes]:
    if users is None:
        return {}
    if not isinstance(users, dict):
        raise ConfigError("basic_auth_users: expected a mapping of user: bcrypt hash")
    out = {}
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(f"basic_auth_users: {user!r} is not a valid user name")
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise ConfigError(f"basic_auth_users.{user}: not a bcrypt hash "
                              "(expected $2y$10$ and 53 characters; make one with `htpasswd -nBC 10 \"\" | tr -d ':'`)")
        out[user] = hashed.encode()
    return out


def _http_server_config(http) -> dict[str, str]:
    if http is None:
        return {}
    if not isinstance(http, dict):
        raise ConfigError("http_server_config: expected a mapping")
    unknown = sorted((k for k in http if k not in ("http2", "headers")), key=str)
    if unknown:
        raise ConfigError(f"http_server_config: unknown key {unknown[0]} (known: headers, http2)")
    if "http2" in http and not isinstance(http["http2"], bool):
        raise ConfigError("http_server_config.http2: expected a bool")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError("http_server_config.headers: expected a mapping of header: value")
    out = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"http_server_config.headers: {name!r} is not a header connwatch can set")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"http_server_config.headers.{name}: expected a one-line string")
        out[name] = value
    return out


def parse(text: str, source: str, base: str = ".") -> WebConfig:
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"web config file {source}: {yaml_error(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"web config file {source}: expected a mapping, got {type(data).__name__}")
    known = ("basic_auth_users", "http_server_config", "tls_server_config")
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        raise ConfigError(f"web config file {source}: unknown key {unknown[0]} (known: {', '.join(known)})")
    wc = WebConfig()
    try:
        if data.get("tls_server_config") is not None:
            tls = data["tls_server_config"]
            wc.ssl_context = _tls_context(tls, base)
            wc._tls_files = _tls_files(tls, base)
            wc._tls_stamp = _stamp(wc._tls_files)
            wc._tls_checked = time.monotonic()
            wc._tls_build = lambda: _tls_context(tls, base)
        wc.users = _users(data.get("basic_auth_users"))
        wc.headers = _http_server_config(data.get("http_server_config"))
    except ConfigError as e:
        raise ConfigError(f"web config file {source}: {e}") from None
    if wc.users and wc.ssl_context is None:
        log.warning("basic auth without TLS: passwords cross the network in clear text")
    return wc


def load(path: str | None) -> WebConfig | None:
    if not path:
        return None
    text = read_text(path, "web config file")
    return parse(text, path, os.path.dirname(os.path.abspath(path)))
