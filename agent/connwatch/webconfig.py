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

`parse` returns a frozen `WebConfig`. What changes while the agent runs (the
TLS context rebuilt when certificates rotate, the cache of verified
passwords) belongs to the server, web.py.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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


@dataclass(frozen=True)
class TLSConfig:
    """`tls_server_config`, checked; file paths are absolute."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    verify_mode: ssl.VerifyMode
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion | None

    @property
    def files(self) -> tuple[str, ...]:
        """The files a new context is built from: when one changes, the certificates rotated."""
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)

    def context(self) -> ssl.SSLContext:
        """A server context from the files as they are now; ConfigError if they do not load."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        if self.max_version is not None:
            ctx.maximum_version = self.max_version
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except FileNotFoundError as e:
            raise ConfigError(f"tls_server_config: cert_file/key_file {e.filename or self.cert_file}: "
                              "no such file") from None
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls_server_config: cannot load cert_file {self.cert_file} / "
                              f"key_file {self.key_file}: {_reason(e)}") from None
        ctx.verify_mode = self.verify_mode
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(self.client_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"tls_server_config.client_ca_file {self.client_ca_file}: {_reason(e)}") from None
        return ctx


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))  # name -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()  # added to every response


def _reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


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


def _tls(tls, base: str) -> TLSConfig:
    if not isinstance(tls, dict):
        raise ConfigError(f"tls_server_config: expected a mapping, got {type(tls).__name__}")
    unknown = sorted((k for k in tls if k not in _TLS_KEYS), key=str)
    if unknown:
        raise ConfigError(f"tls_server_config: unknown key {unknown[0]} (known: {', '.join(sorted(_TLS_KEYS))})")
    path = lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
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
    min_version = _version(tls, "min_version", "TLS12")
    max_version = _version(tls, "max_version", None)
    if max_version is not None and max_version < min_version:
        raise ConfigError("tls_server_config.max_version: lower than min_version")
    config = TLSConfig(path(cert), path(key), path(ca), verify_mode, min_version, max_version)
    config.context()  # the files must load now: an error at start, not a failed first handshake
    return config


def _users(users) -> Mapping[str, bytes]:
    if users is None:
        return MappingProxyType({})
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
    return MappingProxyType(out)


def _http_server_config(http) -> tuple[tuple[str, str], ...]:
    if http is None:
        return ()
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
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise ConfigError(f"http_server_config.headers: {name!r} is not a header connwatch can set")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"http_server_config.headers.{name}: expected a one-line string")
        out.append((name, value))
    return tuple(out)


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
    try:
        tls = _tls(data["tls_server_config"], base) if data.get("tls_server_config") is not None else None
        wc = WebConfig(tls, _users(data.get("basic_auth_users")), _http_server_config(data.get("http_server_config")))
    except ConfigError as e:
        raise ConfigError(f"web config file {source}: {e}") from None
    if wc.users and wc.tls is None:
        log.warning("basic auth without TLS: passwords cross the network in clear text")
    return wc


def load(path: str | None) -> WebConfig | None:
    if not path:
        return None
    text = read_text(path, "web config file")
    return parse(text, path, os.path.dirname(os.path.abspath(path)))
