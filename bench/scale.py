"""Benchmarks 4 and 5: the agent with many established connections.

Several `loadgen hold-server` processes (at most 19,000 fds each: the hard
RLIMIT_NOFILE here is 20,000) accept and keep connections that several
`loadgen hold-client` processes open from 127.0.0.2, 127.0.0.3, ... Each
level adds connections while the agent runs, then measures the agent's
/metrics against the ways users count the same thing today, after checking
that every method reports the same per-process counts.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from collections import Counter

from . import common as C

PER_PROCESS_MAX = 19000
SERVER_PORTS = (21000, 21999)  # holders listen on the first free port of 21000+100*i ... +99


class Holders:
    def __init__(self, nproc: int):
        self.servers, self.clients, self.ports, self.accepted = [], [], [], []
        self.opened = [0] * nproc
        for i in range(nproc):
            # a service port below the ephemeral range, as real servers have
            # (accepted sockets then stay out of the agent's port-use dump)
            s = C.spawn([C.LOADGEN, "hold-server", PER_PROCESS_MAX, SERVER_PORTS[0] + 100 * i, SERVER_PORTS[0] + 100 * i + 99],
                        stdout=subprocess.PIPE, text=True, bufsize=1)
            first = s.stdout.readline().split()
            if first[:1] != ["port"]:
                raise RuntimeError(f"hold-server: {first}")
            self.servers.append(s)
            self.ports.append(int(first[1]))
            self.accepted.append(0)
            C.drain_lines(s.stdout, lambda line, i=i: self._on_server(i, line))
            c = C.spawn([C.LOADGEN, "hold-client", f"127.0.0.{2 + i}", self.ports[i]],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self.clients.append(c)

    def _on_server(self, i: int, line: str) -> None:
        if line.startswith("accepted "):
            self.accepted[i] = int(line.split()[1])

    @property
    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def grow_to(self, total: int, timeout: float = 60) -> None:
        n = len(self.clients)
        want = [total // n + (1 if i < total % n else 0) for i in range(n)]
        if max(want) > PER_PROCESS_MAX:
            raise ValueError(f"{total} connections need more than {n} holder processes")
        for i, c in enumerate(self.clients):  # all clients work in parallel
            c.stdin.write(f"{want[i] - self.opened[i]}\n")
            c.stdin.flush()
        for i, c in enumerate(self.clients):
            reply = c.stdout.readline().split()
            if reply[:1] != ["ok"] or int(reply[3]) != 0:
                raise RuntimeError(f"hold-client {i}: {reply} (connect failures)")
            self.opened[i] = int(reply[1])
        deadline = time.monotonic() + timeout
        while self.accepted != self.opened:
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers accepted {self.accepted}, clients opened {self.opened}")
            time.sleep(0.05)

    def expected(self) -> dict[int, int]:
        return {s.pid: n for s, n in zip(self.servers, self.accepted)}

    def close(self) -> None:
        for c in self.clients:  # clients first: their exit RSTs everything, no TIME_WAIT
            C.reap(c)
        for s in self.servers:
            C.reap(s)


# ---- the ways users count connections per process today ---------------------------------------

_SS_PID = re.compile(r"pid=(\d+)")


def count_ss(ports: set[int]) -> dict[int, int]:
    """`ss -tanp`, then count ESTAB lines per pid whose local port is a server port."""
    out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=True).stdout
    counts: Counter = Counter()
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) < 6 or f[0] != "ESTAB":
            continue
        if int(f[3].rpartition(":")[2]) in ports:
            m = _SS_PID.search(f[5])
            if m:
                counts[int(m.group(1))] += 1
    return dict(counts)


def count_ss_filtered(ports: set[int]) -> dict[int, int]:
    """Same with the filter done in the kernel: `ss -tnp state established '( sport = :P or ... )'`."""
    expr = " or ".join(f"sport = :{p}" for p in sorted(ports))
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( {expr} )"],
                         capture_output=True, text=True, check=True).stdout
    counts: Counter = Counter()
    for line in out.splitlines():
        m = _SS_PID.search(line)
        if m:
            counts[int(m.group(1))] += 1
    return dict(counts)


def count_psutil(ports: set[int]) -> dict[int, int]:
    import psutil

    counts: Counter = Counter()
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports and c.pid:
            counts[c.pid] += 1
    return dict(counts)


def _established_inodes(ports: set[int]) -> set[int]:
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fld = line.split()
                if fld[3] == "01" and int(fld[1].rpartition(":")[2], 16) in ports:
                    inodes.add(int(fld[9]))
    return inodes


def count_procfs(ports: set[int]) -> dict[int, int]:
    """Scan /proc/*/fd for socket inodes, joined with /proc/net/tcp{,6}."""
    wanted = _established_inodes(ports)
    counts: Counter = Counter()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        d = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(d)
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                link = os.readlink(f"{d}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in wanted:
                n += 1
        if n:
            counts[int(pid)] = n
    return dict(counts)


BASELINES = {
    "ss -tanp": count_ss,
    "psutil.net_connections()": count_psutil,
    "/proc/*/fd scan": count_procfs,
    "ss -tnp state established '( sport = :P ... )'": count_ss_filtered,
}
NAMED_BASELINES = ("ss -tanp", "psutil.net_connections()", "/proc/*/fd scan")


def agent_counts(agent: C.Agent, pids: set[int], ports: set[int]) -> dict[int, int]:
    counts: Counter = Counter()
    for name, lab, v in agent.metrics():
        if name == "connwatch_connections" and lab.get("pid", "").isdigit():
            pid = int(lab["pid"])
            if pid in pids and int(lab["port"]) in ports:
                counts[pid] += int(v)
    return dict(counts)


def _wait_agent_counts(agent, expected, ports, timeout=30.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = agent_counts(agent, set(expected), ports)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _map_memory(metrics) -> tuple[int, dict[str, int], dict[str, int]]:
    mem = {lab["map"]: int(v) for n, lab, v in metrics if n == "connwatch_bpf_map_memory_bytes"}
    ent = {lab["map"]: int(v) for n, lab, v in metrics if n == "connwatch_bpf_map_entries"}
    return sum(mem.values()), mem, ent


def measure_level(profile, agent: C.Agent, holders: Holders, level: int) -> dict:
    t0 = time.monotonic()
    holders.grow_to(level)
    setup_s = time.monotonic() - t0
    expected = holders.expected()
    ports = set(holders.ports)
    assert sum(expected.values()) == level, (expected, level)
    got = _wait_agent_counts(agent, expected, ports)
    if got != expected:
        raise AssertionError(f"{level} connections: agent counts {got} != held {expected}")
    reps = profile.baseline_reps if level <= 10000 else max(1, profile.baseline_reps - 2)
    baselines = {}
    for name, fn in BASELINES.items():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            counts = fn(ports)
            times.append(time.perf_counter() - t)
            # only our holders' pids: someone else's socket may share a port number
            counts = {pid: n for pid, n in counts.items() if pid in expected}
            if counts != expected:
                raise AssertionError(f"{name} counts {counts} != held {expected} (agent agrees with held)")
        baselines[name] = C.summary(times)

    # agent: background CPU first (idle window), then the same window with scrapes
    n = profile.scrapes
    snap = []
    c0 = agent.cpu_ns()
    time.sleep(profile.idle_window)
    bg_ns_per_s = (agent.cpu_ns() - c0) / profile.idle_window
    lat = []
    c0, w0 = agent.cpu_ns(), time.monotonic()
    for _ in range(n):
        dt, body = agent.scrape()
        lat.append(dt)
        m = re.search(r"^connwatch_snapshot_duration_seconds (\S+)$", body, re.M)
        if m:
            snap.append(float(m.group(1)))
    c1, w1 = agent.cpu_ns(), time.monotonic()
    cpu_per_scrape = max(0.0, (c1 - c0) - bg_ns_per_s * (w1 - w0)) / n / 1e9
    # snapshot builds over a few refreshes (one build per refresh interval)
    while len(set(snap)) < 3:
        time.sleep(profile.agent_refresh / 3)
        m = re.search(r"^connwatch_snapshot_duration_seconds (\S+)$", agent.scrape()[1], re.M)
        snap.append(float(m.group(1)))
    metrics = agent.metrics()
    mem_total, mem, entries = _map_memory(metrics)
    named = {k: baselines[k]["median"] for k in NAMED_BASELINES}
    fastest = min(named, key=named.get)
    fastest_any = min(baselines, key=lambda k: baselines[k]["median"])
    res = {
        "connections": level,
        "setup_seconds": setup_s,
        "counts_agree": True,
        "per_process": expected,
        "scrape_seconds": {"median": C.median(lat), "p99": C.pctl(lat, 0.99), "max": max(lat), "n": n},
        "snapshot_build_seconds": C.summary(sorted(set(snap))),
        "agent_cpu_seconds_per_scrape": cpu_per_scrape,
        "agent_background_cpu_fraction": bg_ns_per_s / 1e9,
        "agent_memory": agent.memory(),
        "bpf_map_memory_bytes": mem_total,
        "bpf_map_memory": mem,
        "bpf_map_entries": entries,
        "baselines": baselines,
        "fastest_baseline": fastest,
        "speedup_vs_fastest": named[fastest] / C.median(lat),
        "fastest_any_baseline": fastest_any,
        "speedup_vs_fastest_any": baselines[fastest_any]["median"] / C.median(lat),
    }
    if level == max(profile.levels) and profile.pyspy_seconds:
        from . import pyspy

        res["pyspy_scrapes"] = pyspy.profile_scrapes(agent, profile.pyspy_seconds)
    C.log(f"scale {level}: scrape {res['scrape_seconds']['median'] * 1e3:.1f} ms "
          f"(p99 {res['scrape_seconds']['p99'] * 1e3:.1f}), RSS {res['agent_memory']['VmRSS'] / 2**20:.1f} MiB, "
          f"{fastest} {named[fastest] * 1e3:.0f} ms -> {res['speedup_vs_fastest']:.0f}x")
    return res


def scale(profile) -> dict:
    levels = profile.levels
    nproc = max(profile.holder_procs, math.ceil(max(levels) / PER_PROCESS_MAX))
    agent = C.Agent({"refresh_interval_seconds": profile.agent_refresh,
                     "syscall_tracing": profile.scale_syscall_tracing}, tag="scale")
    holders = None
    try:
        holders = Holders(nproc)
        out = {"holder_processes": nproc, "agent_startup_seconds": agent.startup_seconds,
               "agent_probes": agent.probes, "levels": []}
        for level in levels:
            try:
                out["levels"].append(measure_level(profile, agent, holders, level))
            except Exception as e:  # keep the levels measured so far
                C.log(f"scale {level}: FAILED: {e}")
                out["error"] = f"{level} connections: {type(e).__name__}: {e}"
                break
        return out
    finally:
        if holders:
            holders.close()
        agent.stop()
