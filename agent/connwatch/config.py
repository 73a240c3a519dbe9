"""The agent's YAML configuration: schema, defaults and validation.

Every key is checked: unknown keys, wrong types and out-of-range values are
errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger("connwatch.config")


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key."""


ATTACH_KINDS = ("fentry", "kprobe", "tracepoint", "syscall_hook", "iterator")
SYSCALL_TRACING = ("always", "on_demand", "never")
# keys that were valid once: accepted with a warning saying what became of them
DEPRECATED = {
    "maps.overflow_drops": "overflow drops are counted per listener now; remove the key",
}
# the old boolean syscall_tracing
_SYSCALL_TRACING_BOOLS = {True: "always", False: "never"}


@dataclass(frozen=True)
class PeerConfig:
    # per local port, how many peers get their own series
    top_k: int = 20
    # peers are aggregated to these prefixes before they become labels
    ipv4_prefix: int = 32
    ipv6_prefix: int = 128
    # replace peer addresses in labels by a keyed hash (privacy)
    hash: bool = False
    hash_key: str = ""


@dataclass(frozen=True)
class MapConfig:
    """Capacity (max_entries) of each bounded BPF map (enum cw_map_id)."""

    socks: int = 262144
    conn_counts: int = 16384
    procs: int = 16384
    fd_failures: int = 4096
    port_exhaustion: int = 4096
    listeners: int = 4096
    peers: int = 65536
    upgrades: int = 4096
    durations: int = 1024
    port_use: int = 4096
    queued: int = 65536

    # maps without a key of their own, sized like the map they accompany
    _SIZED_LIKE = {"listen_owners": "listeners"}

    def capacity(self, map_name: str) -> int | None:
        """The configured max_entries of a BPF map, None for maps of fixed size."""
        return getattr(self, self._SIZED_LIKE.get(map_name, map_name), None)


@dataclass(frozen=True)
class Config:
    # how often the background refresher rebuilds the snapshot scrapes read
    refresh_interval_seconds: float = 2.0
    # connections accepted on these ports count as WebSocket (wss terminated in the app)
    websocket_ports: tuple[int, ...] = ()
    # processes beyond this many get folded into one comm="other" series per metric
    max_process_series: int = 500
    # listeners past it are summed into port="other" of their process
    max_listener_series: int = 1000
    # path of the compiled BPF object; empty = the installed default
    bpf_object: str = ""
    # turn on the kernel's BPF run-time statistics while the agent runs, so
    # connwatch_bpf_program_run_seconds_total is filled (costs ~20 ns per run)
    bpf_stats: bool = False
    # only on kernels where fd-allocation failures, port exhaustion and
    # listen()'s backlog cannot be hooked where they happen (no fentry, no
    # kprobes): whether to hook every syscall's return for them instead,
    # which slows every syscall on the host. always, never, or on_demand:
    # while some process, the host or a destination is past arm_ratio of
    # its limit (docs/configuration.md)
    syscall_tracing: str = "on_demand"
    arm_ratio: float = 0.5
    # the kinds of hooks the agent may use, best first per probe: to work
    # around a kernel, or a conflict with another tracing tool
    attach_kinds: tuple[str, ...] = ATTACH_KINDS
    # the ephemeral-port numbers walk the whole socket table, the one part of
    # a refresh whose cost grows with every socket on the host: done this
    # often while some destination holds arm_ratio of the port range, and
    # every socket_table_idle_interval_seconds while none is near it; other
    # refreshes reuse the last count
    socket_table_interval_seconds: float = 10.0
    socket_table_idle_interval_seconds: float = 60.0
    # besides every process that owns a tracked socket, this many processes of
    # the host nearest their RLIMIT_NOFILE get fd-headroom series (and every
    # one past 50 % of its limit, however many)
    fd_headroom_processes: int = 50
    # how many destinations (remote ip:port) get their own ephemeral-port series
    port_destinations_top_k: int = 10
    peers: PeerConfig = field(default_factory=PeerConfig)
    maps: MapConfig = field(default_factory=MapConfig)


_RANGES: dict[str, tuple[float, float]] = {
    "refresh_interval_seconds": (0.05, 300),
    "socket_table_interval_seconds": (0.05, 3600),
    "socket_table_idle_interval_seconds": (0.05, 3600),
    "max_process_series": (1, 100000),
    "max_listener_series": (1, 100000),
    "fd_headroom_processes": (0, 100000),
    "port_destinations_top_k": (0, 1000),
    "peers.top_k": (0, 1000),
    "peers.ipv4_prefix": (0, 32),
    "peers.ipv6_prefix": (0, 128),
    "maps.*": (1, 16_777_216),
    "arm_ratio": (0.05, 1.0),
}
WEBSOCKET_PORTS_MAX = 16


def _check_type(key: str, value: Any, want: type) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, value: float) -> None:
    lo_hi = _RANGES.get(key) or _RANGES.get(key.split(".")[0] + ".*")
    if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
        lo, hi = (int(x) if float(x).is_integer() else x for x in lo_hi)
        raise ConfigError(f"{key}: {value} is out of range [{lo}, {hi}]")


def _build(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in [k for k in data if f"{prefix}{k}" in DEPRECATED]:
        log.warning("config key %s%s is ignored: %s", prefix, name, DEPRECATED[f"{prefix}{name}"])
        del data[name]
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key, default = prefix + name, getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key + ".")
        elif key in _SPECIAL:
            kwargs[name] = _SPECIAL[key](key, value)
        else:
            kwargs[name] = _check_type(key, value, type(default))
            if isinstance(kwargs[name], (int, float)):
                _check_range(key, kwargs[name])
    return cls(**kwargs)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _syscall_tracing(key: str, value: Any) -> str:
    if isinstance(value, bool):
        new = _SYSCALL_TRACING_BOOLS[value]
        log.warning("%s: %s is deprecated, it means %s (docs/configuration.md)", key, str(value).lower(), new)
        return new
    return _choice(key, value, SYSCALL_TRACING)


def _attach_kinds(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of {', '.join(ATTACH_KINDS)}")
    return tuple(dict.fromkeys(_choice(key, v, ATTACH_KINDS) for v in value))


def _ports(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of ports, got {type(value).__name__}")
    if len(value) > WEBSOCKET_PORTS_MAX:
        raise ConfigError(f"{key}: at most {WEBSOCKET_PORTS_MAX} ports, got {len(value)}")
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ConfigError(f"{key}: {p!r} is not a port number (1-65535)")
    return tuple(value)


# keys whose values are not a plain bool, int, float or string
_SPECIAL = {
    "websocket_ports": lambda key, value: _ports(key, value),
    "syscall_tracing": _syscall_tracing,
    "attach_kinds": _attach_kinds,
}

MAX_FILE_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice is an error instead of last-one-wins."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def safe_load(text: str):
    """YAML -> Python with the safe loader, refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_error(e: yaml.YAMLError) -> str:
    """One line: where in the file and what is wrong."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"malformed YAML{where}: {' '.join(str(problem).split())}"


def read_text(path: str, what: str = "config file") -> str:
    """A small UTF-8 file's text; ConfigError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None


def parse(text: str, source: str = "config") -> Config:
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {yaml_error(e)}") from None
    try:
        cfg = _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if cfg.peers.hash and not cfg.peers.hash_key:
        raise ConfigError(f"{source}: peers.hash_key: required when peers.hash is true")
    return cfg


def load(path: str | None) -> Config:
    if not path:
        return Config()
    return parse(read_text(path), path)


def peer_network(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, peers: PeerConfig):
    """The prefix a peer is aggregated to (a /32 or /128 is the address itself)."""
    bits = peers.ipv4_prefix if addr.version == 4 else peers.ipv6_prefix
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False)
