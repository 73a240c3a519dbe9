"""TLS and basic auth for /metrics, in the Prometheus exporter-toolkit
web-config format (the file node_exporter takes as --web.config.file):

    tls_server_config:
      cert_file: /etc/connwatch/tls.crt
      key_file: /etc/connwatch/tls.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: /etc/connwatch/ca.crt           # optional
      min_version: TLS12                              # optional
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt hash

Passwords are checked with bcrypt, and each verified (header -> user)
pair is cached so a 15 s scrape interval does not pay bcrypt's cost each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import threading
from dataclasses import dataclass, field

import bcrypt
import yaml

from .config import ConfigError

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
             "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    _verified: dict[bytes, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_basic_auth(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        digest = hashlib.sha256(header.encode(errors="replace")).digest()
        with self._lock:
            if digest in self._verified:
                return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        # compare against a dummy hash for unknown users: no user-enumeration timing
        ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH) and hashed is not None
        if ok:
            with self._lock:
                if len(self._verified) > 1024:
                    self._verified.clear()
                self._verified[digest] = user
        return ok


_DUMMY_HASH = bcrypt.hashpw(b"connwatch-dummy", bcrypt.gensalt(rounds=4))


def _tls_context(tls: dict, base: str) -> ssl.SSLContext:
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise ConfigError(f"tls_server_config: unknown key {sorted(unknown)[0]}")
    for key in ("cert_file", "key_file"):
        if not isinstance(tls.get(key), str) or not tls[key]:
            raise ConfigError(f"tls_server_config.{key}: required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS.get(tls.get("min_version", "TLS12"), ssl.TLSVersion.TLSv1_2)
    if "max_version" in tls:
        ctx.maximum_version = _VERSIONS[tls["max_version"]]
    path = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    try:
        ctx.load_cert_chain(path(tls["cert_file"]), path(tls["key_file"]))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls_server_config: cannot load cert_file/key_file: {e}") from None
    mode = tls.get("client_auth_type", "NoClientCert")
    if mode not in _CLIENT_AUTH:
        raise ConfigError(f"tls_server_config.client_auth_type: {mode!r} is not one of {sorted(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[mode]
    if tls.get("client_ca_file"):
        try:
            ctx.load_verify_locations(path(tls["client_ca_file"]))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls_server_config.client_ca_file: {e}") from None
    return ctx


def load(path: str | None) -> WebConfig | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read web config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"web config file {path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"web config file {path}: expected a mapping")
    unknown = set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise ConfigError(f"web config file {path}: unknown key {sorted(unknown)[0]}")
    wc = WebConfig()
    try:
        if data.get("tls_server_config"):
            wc.ssl_context = _tls_context(data["tls_server_config"], os.path.dirname(os.path.abspath(path)))
        users = data.get("basic_auth_users") or {}
        if not isinstance(users, dict):
            raise ConfigError("basic_auth_users: expected a mapping of user: bcrypt hash")
        for user, hashed in users.items():
            if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ConfigError(f"basic_auth_users.{user}: not a bcrypt hash")
            wc.users[str(user)] = hashed.encode()
    except ConfigError as e:
        raise ConfigError(f"web config file {path}: {e}") from None
    return wc
