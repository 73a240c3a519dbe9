"""Host-wide limits and their usage, read from /proc, /proc/sys and sock_diag.

Every usage is read beside the limit that bounds it, so a dashboard or an
alert can divide one by the other. Nothing here raises on a missing file: a
kernel without conntrack, a container without /proc/sys/net/ipv4/tcp_mem or
an unreadable file gives ``None`` and the metric is simply absent.

Network namespaces: /proc/net/*, /proc/sys/net/* and sock_diag all describe
the network namespace of the *reading* process. The agent runs in the host's
namespace (hostNetwork in Kubernetes), so these are the host's numbers;
containers with their own namespaces have their own socket tables, TIME_WAIT
counts, somaxconn and port ranges, which this module does not see. Some
values are global whatever the namespace: fs.*, tcp_mem and the TCP memory in
use, tcp_max_orphans and the orphan count, nf_conntrack_max.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

PROC = "/proc"

# TCP states as the kernel numbers them (include/net/tcp_states.h)
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11

# States in which a socket holds its local port against a 4-tuple: the
# connecting side's whole life, TIME_WAIT included (it blocks the tuple until
# it expires unless tcp_tw_reuse lets a new connect() take it over).
PORT_HOLDING_STATES = frozenset({
    TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT,
    TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING,
})


class DestinationUse(NamedTuple):
    """Outbound TCP sockets towards one remote ip:port, each holding a local port."""

    destination: str  # "ip:port", "[ipv6]:port"
    sockets: int


@dataclass(frozen=True)
class TcpMem:
    """net.ipv4.tcp_mem, in pages."""

    min: int
    pressure: int
    max: int


@dataclass(frozen=True)
class SystemLimits:
    """One reading of the host's limits, each usage next to its limit.

    ``None`` means "could not be read here" (module not loaded, file absent
    in this namespace, no permission), never zero.
    """

    # fs.file-nr (allocated - free) vs fs.file-max; fs.nr_open caps any
    # process's RLIMIT_NOFILE
    open_files: int | None = None
    open_files_limit: int | None = None
    nr_open: int | None = None
    # nf_conntrack_count vs nf_conntrack_max (None: conntrack not loaded)
    conntrack_entries: int | None = None
    conntrack_entries_limit: int | None = None
    # net.ipv4.ip_local_port_range (inclusive) minus ip_local_reserved_ports
    ephemeral_port_range: tuple[int, int] | None = None
    ephemeral_ports: int | None = None
    # distinct local ports in the range held by outbound TCP sockets
    ephemeral_ports_in_use: int | None = None
    # most first: connect() runs out per destination
    port_destinations: tuple[DestinationUse, ...] | None = None
    # where the socket-table numbers came from: "bpf_iterator", "sock_diag" or "proc"
    socket_table_source: str | None = None
    socket_table_cpu_seconds: float | None = None  # what that count cost
    # /proc/net/sockstat "tw" vs net.ipv4.tcp_max_tw_buckets
    tcp_time_wait: int | None = None
    tcp_time_wait_limit: int | None = None
    # /proc/net/sockstat "orphan" vs net.ipv4.tcp_max_orphans
    tcp_orphans: int | None = None
    tcp_orphans_limit: int | None = None
    # /proc/net/sockstat TCP "mem" (pages) vs net.ipv4.tcp_mem
    tcp_memory_pages: int | None = None
    tcp_memory_pages_limit: TcpMem | None = None
    somaxconn: int | None = None
    tcp_max_syn_backlog: int | None = None
    # /proc/net/netstat TcpExt counters (monotonic since boot)
    listen_overflows: int | None = None
    listen_drops: int | None = None

    @property
    def busiest_destination_sockets(self) -> int:
        """Outbound sockets to the busiest destination; 0 if none were counted."""
        return self.port_destinations[0].sockets if self.port_destinations else 0


# ---- small /proc readers: None instead of an exception ------------------------

def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_ints(path: str) -> list[int] | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return [int(x) for x in text.split()]
    except ValueError:
        return None


def read_int(path: str) -> int | None:
    values = read_ints(path)
    return values[0] if values else None


def sysctl_path(key: str) -> str:
    """net.core.somaxconn -> /proc/sys/net/core/somaxconn"""
    return f"{PROC}/sys/" + key.replace(".", "/")


def read_sysctl_int(key: str) -> int | None:
    return read_int(sysctl_path(key))


def parse_sockstat(text: str) -> dict[str, dict[str, int]]:
    """'TCP: inuse 1 orphan 0 tw 3 alloc 1 mem 330' -> {'TCP': {'inuse': 1, ...}}"""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        words = rest.split()
        try:
            out[proto] = {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
        except ValueError:
            continue
    return out


def parse_conntrack_stat(text: str) -> int | None:
    """/proc/net/stat/nf_conntrack: a header line, then one line of hex
    counters per CPU; `entries` is the namespace's table count, the same on
    every line."""
    lines = text.splitlines()
    if len(lines) < 2:
        return None
    try:
        return int(lines[1].split()[lines[0].split().index("entries")], 16)
    except (ValueError, IndexError):
        return None


def parse_netstat(text: str) -> dict[str, dict[str, int]]:
    """/proc/net/netstat and /proc/net/snmp: header line, value line, per prefix."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        prefix, _, names = header.partition(":")
        vprefix, _, nums = values.partition(":")
        if prefix != vprefix:
            continue
        try:
            out[prefix] = dict(zip(names.split(), (int(v) for v in nums.split())))
        except ValueError:
            continue
    return out


def parse_port_ranges(text: str) -> set[int]:
    """ip_local_reserved_ports: '8000-8080,9000' -> the set of ports."""
    ports: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            ports.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return ports


# ---- the socket table ---------------------------------------------------------

@dataclass(frozen=True)
class TcpSocket:
    """One entry of the kernel's TCP socket table (this network namespace)."""

    family: int  # socket.AF_INET or AF_INET6
    state: int
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    # accept-queue length and effective backlog for LISTEN sockets (ss's
    # Recv-Q / Send-Q); None when read from /proc, which shows neither
    recv_queue: int | None
    send_queue: int | None
    inode: int


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then a zero sockid
_REQ_V2 = struct.Struct("=BBBxI48x")
# inet_diag_msg head: family, state, timer, retrans, then the sockid, whose
# ports and addresses are in network byte order
_MSG_HEAD = struct.Struct(">BBxxHH16s16s")
# inet_diag_msg tail: expires, rqueue, wqueue, uid, inode (host order)
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_TAIL_OFFSET = 52
_MSG_LEN = 72
_RECV_BUFFER = 1 << 16
_DUMP_TIMEOUT_SECONDS = 5.0
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
_BC_OP = struct.Struct("=BBH")


class SockDiagUnavailable(OSError):
    """The kernel refused the sock_diag request (no inet_diag, seccomp, ...)."""


def _states_mask(states: Iterable[int]) -> int:
    mask = 0
    for s in states:
        mask |= 1 << s
    return mask


def _sport_range_bytecode(lo: int, hi: int) -> bytes:
    """An inet_diag filter program: lo <= sport <= hi.

    Each op jumps `yes` bytes on a match and `no` bytes otherwise; landing
    exactly on the end accepts, jumping past it (remaining + 4) rejects.
    """
    return (_BC_OP.pack(INET_DIAG_BC_S_GE, 8, 20) + _BC_OP.pack(0, 0, lo)
            + _BC_OP.pack(INET_DIAG_BC_S_LE, 8, 12) + _BC_OP.pack(0, 0, hi))


def _sock_diag_raw(family: int, states_mask: int, sport_range: tuple[int, int] | None = None
                   ) -> Iterator[tuple[int, int, int, int, bytes, bytes, int, int, int]]:
    """(family, state, sport, dport, src16, dst16, rqueue, wqueue, inode) per socket.

    A raw NETLINK_SOCK_DIAG dump: binary, so no kernel-side text formatting
    and no parsing of hex strings; the caller decodes only what it needs.
    With `sport_range` the kernel itself skips sockets whose local port is
    outside it (a server's accepted sockets, on its listening port), so they
    never cross into Python.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as e:
        raise SockDiagUnavailable(e.errno, f"sock_diag socket: {e.strerror}") from None
    with sock:
        # the kernel always ends a dump with NLMSG_DONE; a timeout only
        # guards the refresher against the unforeseen (it falls back to /proc)
        sock.settimeout(_DUMP_TIMEOUT_SECONDS)
        body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, states_mask)
        if sport_range is not None:
            bytecode = _sport_range_bytecode(*sport_range)
            body += struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
        sock.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body, (0, 0))
        buf = bytearray(_RECV_BUFFER)
        view = memoryview(buf)
        head_unpack = _MSG_HEAD.unpack_from
        tail_unpack = _MSG_TAIL.unpack_from
        hdr_unpack = _NLMSGHDR.unpack_from
        while True:
            n = sock.recv_into(view)
            off = 0
            while off + 16 <= n:
                length, mtype, _flags, _seq, _pid = hdr_unpack(buf, off)
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, off + 16)[0]
                    raise SockDiagUnavailable(err, f"sock_diag dump: {os.strerror(err)}")
                if mtype == SOCK_DIAG_BY_FAMILY and length >= 16 + _MSG_LEN:
                    fam, state, sport, dport, src, dst = head_unpack(buf, off + 16)
                    _exp, rq, wq, _uid, inode = tail_unpack(buf, off + 16 + _MSG_TAIL_OFFSET)
                    yield fam, state, sport, dport, src, dst, rq, wq, inode
                if length < 16:
                    return  # malformed; never loop forever
                off += (length + 3) & ~3
            if n == 0:
                return


def _addr_text(family: int, raw16: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw16[:4])
    addr = ipaddress.IPv6Address(raw16)
    # v4-mapped peers of dual-stack sockets are IPv4 destinations
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def _proc_addr(hexaddr: str) -> tuple[int, bytes]:
    """/proc/net/tcp's address: the in-kernel bytes printed as host-order words."""
    words = bytes.fromhex(hexaddr)
    raw = b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4)) if _LITTLE else words
    return (int(socket.AF_INET), raw + bytes(12)) if len(raw) == 4 else (int(socket.AF_INET6), raw)


_LITTLE = struct.pack("=I", 1) == struct.pack("<I", 1)


def _proc_net_tcp_raw(states_mask: int, proc_net: str = f"{PROC}/net"
                      ) -> Iterator[tuple[int, int, int, int, bytes, bytes, int | None, int | None, int]]:
    for name in ("tcp", "tcp6"):
        try:
            f = open(f"{proc_net}/{name}", encoding="ascii")
        except OSError:
            continue
        with f:
            next(f, None)  # header
            for line in f:
                # sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                fields = line.split(None, 10)
                if len(fields) < 10:
                    continue
                state = int(fields[3], 16)
                if not states_mask >> state & 1:
                    continue
                local, _, lport = fields[1].partition(":")
                remote, _, rport = fields[2].partition(":")
                fam, src = _proc_addr(local)
                _, dst = _proc_addr(remote)
                rq = int(fields[4].partition(":")[2], 16) if state == TCP_LISTEN else None
                yield fam, state, int(lport, 16), int(rport, 16), src, dst, rq, None, int(fields[9])


def tcp_sockets(states: set[int] | frozenset[int], prefer: str = "sock_diag") -> tuple[list[TcpSocket], str]:
    """Every TCP socket of this network namespace in one of `states`.

    sock_diag first (faster, and the only source of a listener's effective
    backlog); /proc/net/tcp{,6} when the kernel refuses netlink.
    Returns the sockets and the source used.
    """
    rows, source = _raw_sockets(_states_mask(states), prefer)
    return [TcpSocket(fam, st, _addr_text(fam, src), sp, _addr_text(fam, dst), dp, rq, wq, ino)
            for fam, st, sp, dp, src, dst, rq, wq, ino in rows], source


def _raw_sockets(mask: int, prefer: str, sport_range: tuple[int, int] | None = None,
                 proc_net: str = f"{PROC}/net") -> tuple[list, str]:
    if prefer == "sock_diag":
        try:
            rows = [r for fam in (socket.AF_INET, socket.AF_INET6) for r in _sock_diag_raw(fam, mask, sport_range)]
            return rows, "sock_diag"
        except OSError:
            pass
    rows = list(_proc_net_tcp_raw(mask, proc_net))
    if sport_range is not None:
        rows = [r for r in rows if sport_range[0] <= r[2] <= sport_range[1]]
    return rows, "proc"


@dataclass(frozen=True)
class PortUse:
    """Local ports of the ephemeral range held by outbound TCP sockets."""

    in_use: int  # distinct local ports
    # most first: connect() runs out per destination, because it can reuse a
    # local port for another one
    destinations: tuple[DestinationUse, ...] = ()

    @property
    def busiest(self) -> tuple[str | None, int]:
        return self.destinations[0] if self.destinations else (None, 0)


def ephemeral_port_use(port_range: tuple[int, int], prefer: str = "sock_diag",
                       proc_net: str = f"{PROC}/net") -> tuple[PortUse, str] | None:
    """Local ports in `port_range` held by outbound TCP sockets, from a dump of
    the socket table (the agent counts them in the kernel where it can).
    proc_net names the /proc/<pid>/net of another network namespace for the
    /proc/net/tcp{,6} text dump (prefer="proc"): sock_diag sees only ours.

    "Outbound" = not a listener and not accepted from a local listener: an
    accepted socket's local port is its listener's port, so sockets whose
    local port is a listening port are left out.
    """
    lo, hi = port_range
    try:
        # listeners outside the range do not matter: their accepted sockets'
        # local ports are outside it too
        rows, source = _raw_sockets(_states_mask(PORT_HOLDING_STATES | {TCP_LISTEN}), prefer, port_range, proc_net)
    except (OSError, ValueError, struct.error):  # unreadable or unparsable: no numbers, no crash
        return None
    listening = {r[2] for r in rows if r[1] == TCP_LISTEN}
    used: set[int] = set()
    per_destination: Counter[tuple[bytes, int]] = Counter()
    for fam, state, sport, dport, _src, dst, *_ in rows:
        if state == TCP_LISTEN or not lo <= sport <= hi or sport in listening:
            continue
        used.add(sport)
        if fam == socket.AF_INET6 and dst[:12] == _V4_MAPPED:
            dst = dst[12:] + bytes(12)  # same destination as the IPv4 socket's
            fam = socket.AF_INET
        per_destination[(bytes([fam]) + dst, dport)] += 1
    destinations = []
    for (key, dport), count in per_destination.most_common():
        addr = _addr_text(key[0], key[1:])
        destinations.append(DestinationUse(f"[{addr}]:{dport}" if ":" in addr else f"{addr}:{dport}", count))
    return PortUse(len(used), tuple(destinations)), source


_V4_MAPPED = bytes(10) + b"\xff\xff"


# ---- the snapshot -------------------------------------------------------------

def read_port_range() -> tuple[int, int] | None:
    values = read_ints(sysctl_path("net.ipv4.ip_local_port_range"))
    return (values[0], values[1]) if values and len(values) == 2 else None


SOCKET_TABLE_FIELDS = ("ephemeral_ports_in_use", "port_destinations", "socket_table_source",
                       "socket_table_cpu_seconds")


def read_system(with_socket_table: bool = True, previous: SystemLimits | None = None,
                port_use: Callable[[tuple[int, int]], PortUse | None] | None = None) -> SystemLimits:
    """Read every limit and usage; never raises for a missing or unreadable file.

    with_socket_table=False skips the ephemeral-port count, the only part
    whose cost grows with the number of sockets; its numbers are then taken
    from `previous`, if given. port_use counts them (the agent's BPF
    iterator); without it, or when it returns None, a socket-table dump does.
    """
    fields: dict = {}
    if not with_socket_table and previous is not None:
        fields.update({k: getattr(previous, k) for k in SOCKET_TABLE_FIELDS})
    file_nr = read_ints(f"{PROC}/sys/fs/file-nr")
    if file_nr and len(file_nr) >= 3:
        # allocated - free (free is always 0 since 2.6, but be exact)
        fields["open_files"] = file_nr[0] - file_nr[1]
    fields["open_files_limit"] = read_sysctl_int("fs.file-max")
    fields["nr_open"] = read_sysctl_int("fs.nr_open")

    # present only while nf_conntrack is loaded; absent => None, no metric
    fields["conntrack_entries"] = read_sysctl_int("net.netfilter.nf_conntrack_count")
    fields["conntrack_entries_limit"] = read_sysctl_int("net.netfilter.nf_conntrack_max")

    port_range = read_port_range()
    if port_range:
        lo, hi = port_range
        reserved_text = read_text(sysctl_path("net.ipv4.ip_local_reserved_ports")) or ""
        reserved = sum(1 for p in parse_port_ranges(reserved_text) if lo <= p <= hi)
        fields["ephemeral_port_range"] = port_range
        fields["ephemeral_ports"] = max(hi - lo + 1 - reserved, 0)
        if with_socket_table:
            started = time.thread_time()
            use = port_use(port_range) if port_use else None
            found = (use, "bpf_iterator") if use is not None else ephemeral_port_use(port_range)
            if found:
                use, source = found
                fields["ephemeral_ports_in_use"] = use.in_use
                fields["port_destinations"] = use.destinations
                fields["socket_table_source"] = source
                fields["socket_table_cpu_seconds"] = time.thread_time() - started

    sockstat = parse_sockstat(read_text(f"{PROC}/net/sockstat") or "").get("TCP", {})
    fields["tcp_time_wait"] = sockstat.get("tw")
    fields["tcp_orphans"] = sockstat.get("orphan")
    fields["tcp_memory_pages"] = sockstat.get("mem")
    fields["tcp_time_wait_limit"] = read_sysctl_int("net.ipv4.tcp_max_tw_buckets")
    fields["tcp_orphans_limit"] = read_sysctl_int("net.ipv4.tcp_max_orphans")
    tcp_mem = read_ints(sysctl_path("net.ipv4.tcp_mem"))
    if tcp_mem and len(tcp_mem) == 3:
        fields["tcp_memory_pages_limit"] = TcpMem(*tcp_mem)
    fields["somaxconn"] = read_sysctl_int("net.core.somaxconn")
    fields["tcp_max_syn_backlog"] = read_sysctl_int("net.ipv4.tcp_max_syn_backlog")

    tcp_ext = parse_netstat(read_text(f"{PROC}/net/netstat") or "").get("TcpExt", {})
    fields["listen_overflows"] = tcp_ext.get("ListenOverflows")
    fields["listen_drops"] = tcp_ext.get("ListenDrops")
    return SystemLimits(**fields)
