"""ctypes mirrors of bpf/connwatch.h, and the check that they match the object.

The header is the single source of the layout; these mirrors are compared
member by member with the BTF of the loaded object (see :func:`check_layout`),
so a drift between the two stops the agent at start-up with a clear message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import ipaddress

from .config import MapConfig
from .libbpf import Btf

u8, u16, u32, u64, s64 = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32,
                          ctypes.c_uint64, ctypes.c_int64)

COMM_LEN = 16
ADDR_LEN = 16
HIST_BUCKETS = 32
WS_PORTS_MAX = 16
PORT_WORDS = 1024


class Kind(enum.IntEnum):
    TCP = 0
    WEBSOCKET = 1
    TLS = 2


# The bounded maps (enum cw_map_id), one per key of the configuration's
# `maps` section, in its order: CW_MAP_<NAME> is map <name>, sized by
# maps.<name>. check_layout() compares it with the object's enum at start-up,
# tests/test_map_table.py with bpf/connwatch.h.
MapId = enum.IntEnum("MapId", [f.name.upper() for f in dataclasses.fields(MapConfig)], start=0)


class Syscall(enum.IntEnum):
    OTHER = 0
    ACCEPT = enum.auto()
    ACCEPT4 = enum.auto()
    SOCKET = enum.auto()
    SOCKETPAIR = enum.auto()
    OPEN = enum.auto()
    OPENAT = enum.auto()
    OPENAT2 = enum.auto()
    CREAT = enum.auto()
    DUP = enum.auto()
    DUP2 = enum.auto()
    DUP3 = enum.auto()
    FCNTL = enum.auto()
    PIPE = enum.auto()
    PIPE2 = enum.auto()
    EPOLL_CREATE = enum.auto()
    EPOLL_CREATE1 = enum.auto()
    EVENTFD = enum.auto()
    EVENTFD2 = enum.auto()
    TIMERFD_CREATE = enum.auto()
    SIGNALFD = enum.auto()
    SIGNALFD4 = enum.auto()
    INOTIFY_INIT = enum.auto()
    INOTIFY_INIT1 = enum.auto()
    MEMFD_CREATE = enum.auto()
    RECVMSG = enum.auto()
    PIDFD_OPEN = enum.auto()
    IO_URING_SETUP = enum.auto()
    CONNECT = enum.auto()
    BIND = enum.auto()


class Sock(ctypes.Structure):
    _fields_ = [
        ("accepted_ns", u64), ("pstart", u64), ("acceptor_pstart", u64), ("peer", u8 * ADDR_LEN),
        ("tgid", u32), ("acceptor_tgid", u32), ("lport", u16), ("rport", u16), ("kind", u8),
        ("class_state", u8), ("close_wait", u8), ("queued", u8),
    ]


class ConnKey(ctypes.Structure):
    _fields_ = [("pstart", u64), ("tgid", u32), ("lport", u16), ("kind", u8), ("_pad", u8)]


class ConnCounts(ctypes.Structure):
    _fields_ = [("open", s64), ("close_wait", s64), ("accepted", u64), ("closed", u64)]


class Proc(ctypes.Structure):
    _fields_ = [("pstart", u64), ("comm", ctypes.c_char * COMM_LEN)]


class FailKey(ctypes.Structure):
    _fields_ = [("pstart", u64), ("tgid", u32), ("syscall", u16), ("err", u16)]


class Listener(ctypes.Structure):
    _fields_ = [
        ("pstart", u64), ("overflow_drops", u64), ("tgid", u32), ("netns", u32),
        ("backlog_requested", u32), ("flags", u32), ("lport", u16), ("_pad", u16),
        ("state", u32), ("queue_length", u32), ("backlog", u32), ("drops", u32), ("somaxconn", u32),
        ("port_range_low", u16), ("port_range_high", u16), ("max_tw_buckets", u32),
    ]


LISTENER_BACKLOG_SEEN = 1


class PeerKey(ctypes.Structure):
    _fields_ = [("peer", u8 * ADDR_LEN), ("pstart", u64), ("tgid", u32), ("lport", u16), ("_pad", u16)]


class UpgradeKey(ctypes.Structure):
    _fields_ = [("pstart", u64), ("tgid", u32), ("lport", u16), ("status", u16)]


class DurationKey(ctypes.Structure):
    _fields_ = [("pstart", u64), ("tgid", u32), ("lport", u16), ("kind", u8), ("_pad", u8)]


class DurationHist(ctypes.Structure):
    _fields_ = [("buckets", u64 * HIST_BUCKETS), ("sum_ns", u64), ("count", u64)]


class PortUseKey(ctypes.Structure):
    _fields_ = [("daddr", u8 * ADDR_LEN), ("dport", u16), ("_pad", u16)]


class PortUse(ctypes.Structure):
    _fields_ = [("generation", u64), ("sockets", u64)]


class PortWord(ctypes.Structure):
    """port_use.bpf.h's struct port_word: 64 ports of a bitmap, tagged with the run."""
    _fields_ = [("generation", u64), ("bits", u64)]


class ArmEvent(ctypes.Structure):
    _fields_ = [("pstart", u64), ("tgid", u32), ("reason", u32), ("used", u64), ("limit", u64)]


# C struct name -> mirror
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "cw_sock": Sock,
    "cw_conn_key": ConnKey,
    "cw_conn_counts": ConnCounts,
    "cw_proc": Proc,
    "cw_fail_key": FailKey,
    "cw_listener": Listener,
    "cw_peer_key": PeerKey,
    "cw_upgrade_key": UpgradeKey,
    "cw_duration_key": DurationKey,
    "cw_duration_hist": DurationHist,
    "cw_port_use_key": PortUseKey,
    "cw_port_use": PortUse,
    "port_word": PortWord,
    "cw_arm_event": ArmEvent,
}

# C enum name -> (mirror, prefix of the C enumerators)
ENUMS: dict[str, tuple[type[enum.IntEnum], str]] = {
    "cw_kind": (Kind, "CW_KIND_"),
    "cw_map_id": (MapId, "CW_MAP_"),
    "cw_syscall": (Syscall, "CW_SYS_"),
}


class LayoutMismatch(RuntimeError):
    pass


def check_layout(btf: Btf) -> None:
    """Raise LayoutMismatch unless every mirror equals the object's BTF."""
    problems = []
    for cname, mirror in MIRRORS.items():
        st = btf.struct(cname)
        if st is None:
            problems.append(f"struct {cname} missing from BTF")
            continue
        if st.size != ctypes.sizeof(mirror):
            problems.append(f"struct {cname}: {st.size} bytes in BTF, {ctypes.sizeof(mirror)} in Python")
        ours = [(name, getattr(mirror, name).offset, getattr(mirror, name).size)
                for name, _ in mirror._fields_]
        if list(st.members) != ours:
            problems.append(f"struct {cname}: members {st.members} in BTF, {tuple(ours)} in Python")
    for cname, (mirror, prefix) in ENUMS.items():
        values = btf.enum(cname)
        if values is None:
            problems.append(f"enum {cname} missing from BTF")
            continue
        theirs = {k[len(prefix):]: v for k, v in values.items()
                  if k.startswith(prefix) and not k.endswith(("_MAX", "_COUNT"))}
        ours = {m.name: m.value for m in mirror}
        if theirs != ours:
            problems.append(f"enum {cname}: {theirs} in BTF, {ours} in Python")
    if problems:
        raise LayoutMismatch("; ".join(problems))


def peer_address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode a 16-byte peer; IPv4-mapped addresses come back as IPv4."""
    addr = ipaddress.IPv6Address(bytes(raw))
    return addr.ipv4_mapped or addr
