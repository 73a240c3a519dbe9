"""`connwatch doctor`: what stops this host from holding N connections, and the fix.

The reference article's check-limits.sh as a diagnosis: every limit on the
way to N connections, read from /proc, /proc/sys, sock_diag and systemd,
compared with what N needs, with a ready-to-install fix for each shortfall.
Needs no BPF and no root: what it cannot read is listed, never guessed.
The JSON schema is documented in docs/doctor.md; keep it stable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from . import fds, procinfo
from .system import TCP_LISTEN, SystemLimits, TcpSocket, read_system, read_text, sysctl_path, tcp_sockets

SCHEMA_VERSION = 1

OK = "OK"
SHORT = "SHORT"
UNKNOWN = "UNKNOWN"

# fds a connection-serving process needs beside its connections: listeners,
# epoll, logs, libraries, pipes to workers
FD_RESERVE = 1024
# listen() backlogs were 16-bit for decades and most runtimes still clamp
# there; the reference article's value for 100k+ connections
BACKLOG_CEILING = 65535
# one 4 KiB page of buffered data per connection: an idle WebSocket's
# steady state; busy connections need more (see docs/doctor.md)
TCP_MEM_PAGES_PER_CONNECTION = 1
LOWEST_EPHEMERAL_PORT = 1024
HIGHEST_PORT = 65535

SYSCTL_FILE = "/etc/sysctl.d/99-connwatch.conf"
LIMITS_FILE = "/etc/security/limits.d/99-connwatch.conf"
DROPIN_NAME = "99-connwatch.conf"
SYSTEMCTL_TIMEOUT_SECONDS = 5


@dataclass
class Check:
    id: str
    scope: str  # "host", "session", "process" or "listener"
    description: str
    current: int | str | None
    needed: int | None
    verdict: str
    source: str
    fix: str | None = None  # "sysctl", "limits", "systemd", "application"
    note: str = ""
    pid: int | None = None
    comm: str | None = None
    port: int | None = None


@dataclass
class Listener:
    address: str
    port: int
    inode: int
    queue_length: int | None
    backlog_effective: int | None
    backlog_requested: None = None  # listen()'s argument is only visible to the agent's BPF probe
    pids: list[int] = field(default_factory=list)


@dataclass
class ProcessInfo:
    pid: int
    comm: str | None
    unit: str | None
    ports: list[int]
    open_fds: int | None
    rlimit_nofile_soft: int | str | None
    rlimit_nofile_hard: int | str | None
    systemd_limit_nofile: int | str | None = None
    systemd_limit_nofile_soft: int | str | None = None


# per-network-namespace sysctls that decide a listener's or a client's limits
NAMESPACED_SYSCTLS = ("net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_max_tw_buckets")


@dataclass
class NamespaceLimits:
    """A network namespace other than doctor's own, whose per-namespace
    sysctls differ from doctor's namespace's (a pod's, a container's)."""
    network_namespace: str
    pids: list[int]  # the processes in it (the first few)
    comms: list[str]
    differs: dict[str, str]  # sysctl -> its value in that namespace


@dataclass
class Diagnosis:
    target_connections: int
    fds_needed_per_process: int
    backlog_needed: int
    network_namespace: str | None
    checks: list[Check] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    processes: list[ProcessInfo] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    other_namespaces: list[NamespaceLimits] = field(default_factory=list)
    # what the fixes must set: sysctl key -> value; RLIMIT_NOFILE for login
    # sessions (limits.d); systemd unit -> LimitNOFILE
    sysctl_fixes: dict[str, str] = field(default_factory=dict)
    nofile_fix: int | None = None
    systemd_fixes: dict[str, int] = field(default_factory=dict)
    application_fixes: list[str] = field(default_factory=list)
    runtime_fixes: list[str] = field(default_factory=list)

    @property
    def short(self) -> bool:
        return any(c.verdict == SHORT for c in self.checks)


def _verdict(current: int | str | None, needed: int) -> str:
    if current is None:
        return UNKNOWN
    if current == "unlimited" or current == "infinity":
        return OK
    return OK if int(current) >= needed else SHORT


# ---- host-wide sysctls -------------------------------------------------------

def _sysctl_check(d: Diagnosis, key: str, current: int | None, needed: int, description: str,
                  note: str = "", fix_value: str | None = None) -> None:
    verdict = _verdict(current, needed)
    if current is None:
        note = ("could not read it here (tcp_mem and tcp_max_orphans exist only in the host's network "
                "namespace)" if key.startswith("net.") else "could not read it")
    d.checks.append(Check(id=key, scope="host", description=description, current=current, needed=needed,
                          verdict=verdict, source="/proc/sys/" + key.replace(".", "/"),
                          fix="sysctl" if verdict == SHORT else None, note=note))
    if current is None:
        d.unreadable.append(f"{key} (/proc/sys/{key.replace('.', '/')})")
    if verdict == SHORT:
        d.sysctl_fixes[key] = fix_value if fix_value is not None else str(needed)


def _host_checks(d: Diagnosis, s: SystemLimits) -> None:
    n = d.target_connections
    open_now = s.open_files or 0
    _sysctl_check(d, "fs.file-max", s.open_files_limit, open_now + n,
                  "system-wide open files (ENFILE past it)",
                  note=f"{open_now} open now + {n} connections")
    _sysctl_check(d, "fs.nr_open", s.nr_open, d.fds_needed_per_process,
                  "ceiling of any process's RLIMIT_NOFILE",
                  note="setrlimit/LimitNOFILE above it fail")
    _sysctl_check(d, "net.core.somaxconn", s.somaxconn, d.backlog_needed,
                  "cap on every listen() backlog",
                  note="a reconnect storm brings many SYNs at once; listeners keep the backlog they got "
                       "at listen(): restart them after raising it")
    _sysctl_check(d, "net.ipv4.tcp_max_syn_backlog", s.tcp_max_syn_backlog, d.backlog_needed,
                  "half-open connections per listener before SYN cookies/drops")

    per_destination = min(n, HIGHEST_PORT - LOWEST_EPHEMERAL_PORT + 1)
    if s.ephemeral_port_range is None or s.ephemeral_ports is None:
        _sysctl_check(d, "net.ipv4.ip_local_port_range", None, per_destination,
                      "local ports per destination for outbound connections")
    else:
        # widen, never narrow: keep the current low end if it is low enough
        lo = max(LOWEST_EPHEMERAL_PORT, min(s.ephemeral_port_range[0], HIGHEST_PORT - per_destination + 1))
        note = "matters for outbound connections (proxies, clients): each destination ip:port gets at most this many"
        if n > per_destination:
            note += f"; {n} connections to one destination need more destination or source addresses"
        d.checks.append(Check(id="net.ipv4.ip_local_port_range", scope="host",
                              description="local ports per destination for outbound connections",
                              current=s.ephemeral_ports, needed=per_destination,
                              verdict=_verdict(s.ephemeral_ports, per_destination),
                              source="/proc/sys/net/ipv4/ip_local_port_range (minus ip_local_reserved_ports)",
                              note=note))
        if d.checks[-1].verdict == SHORT:
            d.checks[-1].fix = "sysctl"
            d.sysctl_fixes["net.ipv4.ip_local_port_range"] = f"{lo} {HIGHEST_PORT}"

    if s.conntrack_entries_limit is None:
        d.checks.append(Check(id="net.netfilter.nf_conntrack_max", scope="host",
                              description="connection-tracking table size", current=None, needed=None,
                              verdict=OK, source="/proc/sys/net/netfilter/nf_conntrack_max",
                              note="nf_conntrack is not loaded: no conntrack limit (it loads with the first "
                                   "NAT/stateful firewall rule; run doctor again then)"))
    else:
        in_use = s.conntrack_entries or 0
        _sysctl_check(d, "net.netfilter.nf_conntrack_max", s.conntrack_entries_limit, in_use + n,
                      "connection-tracking table size (new flows dropped when full)",
                      note=f"{in_use} tracked now + {n} connections; it is read-only inside containers' "
                           "network namespaces")

    _sysctl_check(d, "net.ipv4.tcp_max_tw_buckets", s.tcp_time_wait_limit, n,
                  "TIME_WAIT sockets (past it, closes skip TIME_WAIT)",
                  note="a mass disconnect closed from this side leaves one TIME_WAIT per connection")
    _sysctl_check(d, "net.ipv4.tcp_max_orphans", s.tcp_orphans_limit, n,
                  "orphaned sockets (past it, they are reset)",
                  note="a mass disconnect can orphan every connection at once")

    needed_pages = n * TCP_MEM_PAGES_PER_CONNECTION
    tcp_mem = s.tcp_memory_pages_limit
    pressure = tcp_mem.pressure if tcp_mem else None
    fix_value = None
    if tcp_mem:
        fix_value = (f"{max(tcp_mem.min, needed_pages * 3 // 4)} {max(tcp_mem.pressure, needed_pages)} "
                     f"{max(tcp_mem.max, needed_pages * 3 // 2)}")
    _sysctl_check(d, "net.ipv4.tcp_mem", pressure, needed_pages,
                  "TCP buffer memory pressure threshold (pages)",
                  note=f"{TCP_MEM_PAGES_PER_CONNECTION} page of buffered data per connection; "
                       "the fix sets min/pressure/max", fix_value=fix_value)


# ---- RLIMIT_NOFILE: this session and every listening process ------------------

def _rlimit_text(value: int | None) -> int | str:
    return "unlimited" if value is None else value


def _session_checks(d: Diagnosis) -> None:
    limits = fds.nofile_limits("self")
    for index, which in enumerate(("soft", "hard")):
        current = None if limits is None else _rlimit_text(limits[index])
        verdict = _verdict(current, d.fds_needed_per_process)
        d.checks.append(Check(
            id=f"rlimit_nofile_{which}", scope="session",
            description=f"{which} RLIMIT_NOFILE of this session (ulimit -{which[0].upper()}n)",
            current=current, needed=d.fds_needed_per_process, verdict=verdict, source="/proc/self/limits",
            fix="limits" if verdict == SHORT else None,
            note=("processes started from this shell inherit it"
                  + ("; only root (CAP_SYS_RESOURCE) raises a hard limit" if which == "hard" else ""))))
        if verdict == SHORT:
            d.nofile_fix = d.fds_needed_per_process


_SERVICE = re.compile(r"^[^/]+\.service$")


def systemd_unit(pid: int) -> str | None:
    """The .service a process runs in, from its cgroup path (v2 or v1 name=systemd)."""
    text = None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if hierarchy not in ("", "name=systemd"):
            continue
        services = [part for part in path.split("/") if _SERVICE.match(part)]
        if services:
            return services[-1]
    return None


def systemd_limit_nofile(unit: str) -> tuple[dict[str, str] | None, str]:
    """LimitNOFILE (hard) and LimitNOFILESoft of `unit`, or None and why not."""
    try:
        out = subprocess.run(["systemctl", "show", "-p", "LimitNOFILE", "-p", "LimitNOFILESoft", unit],
                             capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"systemctl show {unit}: {e}"
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[0]
        return None, f"systemctl show {unit}: {reason}"
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return props, ""


def _systemd_value(text: str | None) -> int | str | None:
    if text is None:
        return None
    return "infinity" if text == "infinity" else int(text) if text.isdigit() else None


def _process_checks(d: Diagnosis, p: ProcessInfo) -> None:
    needed = d.fds_needed_per_process
    fds_now = f", {p.open_fds} fds open" if p.open_fds is not None else ""
    where = f"pid {p.pid} ({p.comm or '?'}{fds_now}), listening on {', '.join(map(str, p.ports))}"
    for which, current in (("soft", p.rlimit_nofile_soft), ("hard", p.rlimit_nofile_hard)):
        verdict = _verdict(current, needed)
        d.checks.append(Check(id=f"process_rlimit_nofile_{which}", scope="process",
                              description=f"{which} RLIMIT_NOFILE of {where}", current=current, needed=needed,
                              verdict=verdict, source=f"/proc/{p.pid}/limits",
                              fix=("systemd" if p.unit else "limits") if verdict == SHORT else None,
                              note="" if p.unit else "not a systemd service: raise it where the process is "
                                                     "started (limits.d for login sessions, prlimit now)",
                              pid=p.pid, comm=p.comm))
        if verdict == SHORT:
            if p.unit:
                d.systemd_fixes[p.unit] = needed
            else:
                d.nofile_fix = needed
            d.runtime_fixes.append(f"prlimit --pid {p.pid} --nofile={needed}:{needed}")
    if p.unit is None:
        return
    props, why_not = systemd_limit_nofile(p.unit)
    if props is None:
        d.checks.append(Check(id="process_systemd_limit_nofile", scope="process",
                              description=f"LimitNOFILE of {p.unit} ({where})", current=None, needed=needed,
                              verdict=UNKNOWN, source=f"systemctl show -p LimitNOFILE {p.unit}",
                              note=f"systemd not reachable, skipped: {why_not}", pid=p.pid, comm=p.comm))
        d.unreadable.append(f"LimitNOFILE of {p.unit}: {why_not}")
        return
    p.systemd_limit_nofile = _systemd_value(props.get("LimitNOFILE"))
    p.systemd_limit_nofile_soft = _systemd_value(props.get("LimitNOFILESoft"))
    for which, current in (("", p.systemd_limit_nofile), ("_soft", p.systemd_limit_nofile_soft)):
        verdict = _verdict(current, needed)
        d.checks.append(Check(id=f"process_systemd_limit_nofile{which}", scope="process",
                              description=f"LimitNOFILE{'Soft' if which else ''} of {p.unit} ({where})",
                              current=current, needed=needed, verdict=verdict,
                              source=f"systemctl show -p LimitNOFILE{'Soft' if which else ''} {p.unit}",
                              fix="systemd" if verdict == SHORT else None,
                              note="what the process gets at its next restart", pid=p.pid, comm=p.comm))
        if verdict == SHORT:
            d.systemd_fixes[p.unit] = needed


def _listener_checks(d: Diagnosis, listener: Listener, somaxconn: int | None, comms: dict[int, str | None]) -> None:
    # no owner: held by a process in another PID namespace, or by a
    # process whose fds we may not read (see `unreadable`)
    owners = ", ".join(f"pid {pid} {comms.get(pid) or '?'}" for pid in listener.pids) or "owner not found"
    if listener.backlog_effective is None:
        verdict, note = UNKNOWN, "effective backlog needs sock_diag (unavailable): /proc/net/tcp does not show it"
    else:
        verdict = _verdict(listener.backlog_effective, d.backlog_needed)
        # listen()'s argument itself is only visible to the agent's BPF probe
        if somaxconn is not None and listener.backlog_effective >= somaxconn:
            note = ("capped by net.core.somaxconn (what the application requested is unknown without BPF): "
                    "raise somaxconn, then restart the listener")
        else:
            note = ("below net.core.somaxconn, so the application requested exactly this "
                    "(listen()'s argument): raise it in the application")
    d.checks.append(Check(id="listen_backlog", scope="listener",
                          description=f"effective backlog of {listener.address}:{listener.port} ({owners})",
                          current=listener.backlog_effective, needed=d.backlog_needed, verdict=verdict,
                          source="sock_diag idiag_wqueue (ss -ltn Send-Q)",
                          fix="application" if verdict == SHORT else None, note=note,
                          pid=listener.pids[0] if listener.pids else None,
                          comm=comms.get(listener.pids[0]) if listener.pids else None, port=listener.port))
    if verdict == SHORT and (somaxconn is None or listener.backlog_effective < somaxconn):
        d.application_fixes.append(
            f"port {listener.port} ({owners}): listen() with backlog {d.backlog_needed}, then restart it")


# ---- finding listeners and their processes ------------------------------------

def _socket_owners(inodes: set[int], d: Diagnosis) -> dict[int, list[int]]:
    """inode -> pids holding it, by reading every /proc/<pid>/fd link.

    Costs one readlink per fd on the host: fine for a one-off diagnosis,
    which is why the agent does not do it.
    """
    owners: dict[int, list[int]] = {}
    denied = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except PermissionError:
            denied += 1
            continue
        except OSError:
            continue  # exited
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except PermissionError:
                # listing needs DAC rights, reading the links ptrace rights:
                # CAP_DAC_READ_SEARCH alone lists but cannot read
                denied += 1
                break
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes and pid not in owners.setdefault(inode, []):
                    owners[inode].append(pid)
    if denied:
        why = ("ptrace access denied even to root: another user namespace or an LSM policy" if os.geteuid() == 0
               else "permission denied: run as root to attribute their listeners")
        d.unreadable.append(f"/proc/<pid>/fd of {denied} processes ({why})")
    return owners


def _listeners(d: Diagnosis) -> list[Listener]:
    try:
        sockets, source = tcp_sockets({TCP_LISTEN})
    except OSError as e:
        d.unreadable.append(f"TCP listening sockets: {e}")
        return []
    if source != "sock_diag":
        d.unreadable.append("sock_diag (fell back to /proc/net/tcp: no effective backlogs)")
    owners = _socket_owners({s.inode for s in sockets}, d)
    return sorted((_listener(s, owners.get(s.inode, [])) for s in sockets), key=lambda x: (x.port, x.address))


def _listener(s: TcpSocket, pids: list[int]) -> Listener:
    return Listener(address=s.local_address, port=s.local_port, inode=s.inode, queue_length=s.recv_queue,
                    backlog_effective=s.send_queue, pids=sorted(pids))


def _process_info(pid: int, ports: list[int]) -> ProcessInfo:
    limits = fds.nofile_limits(pid)
    return ProcessInfo(pid=pid, comm=procinfo.comm(pid), unit=systemd_unit(pid), ports=sorted(set(ports)),
                       open_fds=fds.open_fds(pid),
                       rlimit_nofile_soft=None if limits is None else _rlimit_text(limits[0]),
                       rlimit_nofile_hard=None if limits is None else _rlimit_text(limits[1]))


def _network_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _own_namespace_sysctls() -> dict[str, str]:
    return {key: " ".join(text.split()) for key in NAMESPACED_SYSCTLS
            if (text := read_text(sysctl_path(key))) is not None}


def _namespace_sysctls(pid: int) -> dict[str, str] | None:
    """NAMESPACED_SYSCTLS as the namespace of `pid` sees them. /proc/sys/net
    shows the reader's namespace, so the read runs there (nsenter); None if
    it cannot (not root, or the process is gone)."""
    paths = [sysctl_path(key) for key in NAMESPACED_SYSCTLS]
    cmd = ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "cat", *paths]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    values = [" ".join(line.split()) for line in out.stdout.splitlines()]
    return dict(zip(NAMESPACED_SYSCTLS, values)) if out.returncode == 0 and len(values) == len(paths) else None


def _other_namespaces(own: str | None, limit_pids: int = 5) -> list[NamespaceLimits]:
    """Every other network namespace a process on the host is in, where a
    per-namespace sysctl differs from doctor's own namespace."""
    members: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ns := _network_namespace(entry)) and ns != own:
            members.setdefault(ns, []).append(int(entry))
    mine = _own_namespace_sysctls()
    found = []
    for ns, pids in sorted(members.items()):
        pids.sort()
        theirs = next((v for pid in pids[:limit_pids] if (v := _namespace_sysctls(pid)) is not None), None)
        differs = {k: v for k, v in (theirs or {}).items() if mine.get(k) != v}
        if differs:
            found.append(NamespaceLimits(ns, pids[:limit_pids],
                                         [procinfo.comm(pid) or "?" for pid in pids[:limit_pids]], differs))
    return found


def diagnose(target_connections: int) -> Diagnosis:
    d = Diagnosis(target_connections=target_connections,
                  fds_needed_per_process=target_connections + FD_RESERVE,
                  backlog_needed=min(target_connections, BACKLOG_CEILING),
                  network_namespace=_network_namespace())
    system = read_system(with_socket_table=False)
    _host_checks(d, system)
    _session_checks(d)
    d.listeners = _listeners(d)
    ports_of: dict[int, list[int]] = {}
    for listener in d.listeners:
        for pid in listener.pids:
            ports_of.setdefault(pid, []).append(listener.port)
    d.processes = [_process_info(pid, ports) for pid, ports in sorted(ports_of.items())]
    for p in d.processes:
        if p.rlimit_nofile_soft is None:
            d.unreadable.append(f"/proc/{p.pid}/limits (process exited?)")
        _process_checks(d, p)
    comms = {p.pid: p.comm for p in d.processes}
    for listener in d.listeners:
        _listener_checks(d, listener, system.somaxconn, comms)
    d.other_namespaces = _other_namespaces(d.network_namespace)
    return d


# ---- the fixes as files ---------------------------------------------------------

def fixes(d: Diagnosis) -> dict[str, Any]:
    out: dict[str, Any] = {"sysctl": None, "limits": None, "systemd": [], "application": d.application_fixes,
                           "runtime": d.runtime_fixes}
    # fs.nr_open needs no special care: its check asks for the same value as
    # the RLIMIT_NOFILE fixes, so it is in the sysctl file whenever they need it
    sysctls = dict(d.sysctl_fixes)
    if sysctls:
        header = (f"# {SYSCTL_FILE}: written by `connwatch doctor --target-connections {d.target_connections}`\n"
                  f"# apply now: sysctl -p {SYSCTL_FILE}\n")
        out["sysctl"] = {"path": SYSCTL_FILE,
                         "content": header + "".join(f"{k} = {v}\n" for k, v in sysctls.items()),
                         "apply": f"sysctl -p {SYSCTL_FILE}"}
    if d.nofile_fix:
        v = d.nofile_fix
        out["limits"] = {
            "path": LIMITS_FILE,
            "content": (f"# {LIMITS_FILE}: applies to new PAM login sessions; services started by systemd "
                        "ignore it (use the drop-in)\n"
                        "# '*' does not match root: root has its own lines\n"
                        f"*    soft nofile {v}\n*    hard nofile {v}\n"
                        f"root soft nofile {v}\nroot hard nofile {v}\n"),
            "apply": "log in again (new sessions get it); running processes keep their limits"}
    for unit, v in sorted(d.systemd_fixes.items()):
        path = f"/etc/systemd/system/{unit}.d/{DROPIN_NAME}"
        out["systemd"].append({"unit": unit, "path": path, "content": f"[Service]\nLimitNOFILE={v}\n",
                               "apply": f"systemctl daemon-reload && systemctl restart {unit}"})
    return out


def to_json(d: Diagnosis) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "target_connections": d.target_connections,
        "fds_needed_per_process": d.fds_needed_per_process,
        "backlog_needed": d.backlog_needed,
        "network_namespace": d.network_namespace,
        "verdict": SHORT if d.short else OK,
        "checks": [asdict(c) for c in d.checks],
        "listeners": [asdict(x) for x in d.listeners],
        "processes": [asdict(p) for p in d.processes],
        "fixes": fixes(d),
        "unreadable": d.unreadable,
        "other_network_namespaces": [asdict(n) for n in d.other_namespaces],
    }


# ---- the human report -------------------------------------------------------------

def _cell(value: Any) -> str:
    return "?" if value is None else str(value)


def render(d: Diagnosis) -> str:
    lines = [f"connwatch doctor: limits between this host and {d.target_connections} connections",
             f"(network namespace {d.network_namespace or '?'}: listeners and net.* values are this "
             "namespace's; run doctor inside a container's namespace for its own)", ""]
    rows = [("CHECK", "CURRENT", "NEEDED", "VERDICT", "WHAT")]
    for c in d.checks:
        rows.append((c.id, _cell(c.current), _cell(c.needed), c.verdict, c.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    # one line per distinct note: the same advice for ten listeners is said once
    notes: dict[tuple[str, str], list[str]] = {}
    for c in d.checks:
        if c.verdict != OK and c.note:
            subject = str(c.port) if c.port is not None else str(c.pid) if c.pid is not None else ""
            notes.setdefault((c.id, c.note), []).append(subject)
    if notes:
        lines += ["", "Notes:"]
        for (check_id, note), subjects in notes.items():
            which = ", ".join(x for x in subjects if x)
            lines.append(f"  {check_id}{f' ({which})' if which else ''}: {note}")
    f = fixes(d)
    if d.short:
        lines += ["", "Fixes:"]
        if f["sysctl"]:
            lines += [f"  --- {f['sysctl']['path']}  (then: {f['sysctl']['apply']})"]
            lines += ["  " + x for x in f["sysctl"]["content"].splitlines()]
        if f["limits"]:
            lines += [f"  --- {f['limits']['path']}  ({f['limits']['apply']})"]
            lines += ["  " + x for x in f["limits"]["content"].splitlines()]
        for dropin in f["systemd"]:
            lines += [f"  --- {dropin['path']}  (then: {dropin['apply']})"]
            lines += ["  " + x for x in dropin["content"].splitlines()]
        if f["runtime"]:
            lines += ["  --- now, without a restart (root; cannot exceed fs.nr_open):"]
            lines += ["  " + x for x in sorted(set(f["runtime"]))]
        if f["application"]:
            lines += ["  --- in the application (e.g. nginx `listen PORT backlog=N;`, "
                      "Node.js `server.listen({port, backlog: N})`, Go needs somaxconn only):"]
            lines += ["  " + x for x in f["application"]]
    if d.other_namespaces:
        lines += ["", "Other network namespaces whose limits differ from this one's (pods, containers):"]
        for n in d.other_namespaces:
            who = ", ".join(f"{c} ({p})" for p, c in zip(n.pids, n.comms))
            lines.append(f"  {n.network_namespace}: {who}")
            lines += [f"    {k} = {v}" for k, v in n.differs.items()]
    if d.unreadable:
        lines += ["", "Could not read:"] + [f"  {x}" for x in d.unreadable]
    lines += ["", f"verdict: {'SHORT: at least one limit is below the target' if d.short else 'OK'}"]
    return "\n".join(lines) + "\n"


def main(target_connections: int, as_json: bool) -> int:
    d = diagnose(target_connections)
    if as_json:
        json.dump(to_json(d), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(d))
    return 1 if d.short else 0
