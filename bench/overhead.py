"""What the agent costs the host: connection churn, syscall-heavy loops, and the
per-event cost of each BPF program (benchmarks 1, 2, 3 and the churn half of 5).

Every comparison is paired: each round measures every condition back to back
(the order rotates from round to round), and ratios are taken within a round.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

from . import common as C

NCPU = os.cpu_count() or 2


def _quiet(profile, own=()) -> int:
    return C.wait_quiet(profile.quiet_wait, own)


def _agent_accepted(agent: C.Agent, port: int) -> int:
    return int(sum(v for n, lab, v in agent.metrics()
                   if n == "connwatch_connections_accepted_total" and lab.get("port") == str(port)))


# ---- 1 and 5b: connection churn ----------------------------------------------------


class _AgentSpan:
    """One agent kept across adjacent attached phases (rounds alternate
    off,on | on,off | off,on ..., so attached phases come in pairs): half the
    agent start-ups, which matters when start-up is slow."""

    def __init__(self, config: dict | None = None):
        self.config = config
        self.agent: C.Agent | None = None
        self.ports: list[int] = []
        self.conns = 0
        self.checks: list[float] = []
        self.startups: list[float] = []

    def attach(self) -> C.Agent:
        if self.agent is None:
            self.agent = C.Agent(self.config, tag="churn")
            self.startups.append(self.agent.startup_seconds)
            self.agent.settle()
            self.ports, self.conns = [], 0
        return self.agent

    def detach(self) -> None:
        if self.agent is None:
            return
        try:
            self.checks.append(self.agent.proc.poll() is None)  # still alive after the load
        finally:
            self.agent.stop()
            self.agent = None


def churn_phase(profile, span: _AgentSpan, attached: bool, rate: float = 0) -> dict:
    if attached:
        agent = span.attach()
    else:
        span.detach()
        _quiet(profile)
        agent = None
    foreign = C.foreign_syscall_links([agent.pid] if agent else [])
    a0 = agent.cpu_ns() if agent else 0
    res = C.loadgen("churn", profile.churn_servers, profile.churn_clients, profile.warmup,
                    profile.churn_seconds, rate, "127.0.0.10")
    res["foreign_links"] = foreign
    # the agent's own CPU (its threads) over the whole run, warm-up included
    res["agent_cpu_s"] = (agent.cpu_ns() - a0) / 1e9 if agent else 0.0
    if agent:
        span.ports.append(int(res["port"]))
        span.conns += res["conns"]
    res["cpu_us_per_conn"] = res["cpu_busy_s"] * 1e6 / max(res["conns"], 1)
    res["gen_cpu_us_per_conn"] = res["cpu_procs_s"] * 1e6 / max(res["conns"], 1)
    return res


def agent_refresh_wait(profile) -> float:
    return profile.agent_refresh + 0.2  # one snapshot refresh plus a margin


def agent_config(profile) -> dict:
    return {"refresh_interval_seconds": profile.agent_refresh}


def _paired(profile, rates: list[float], rounds: int, config: dict | None = None) -> dict[float, list[dict]]:
    """Rounds of (detached, attached) pairs for each offered rate. The order
    within a pair alternates globally (off,on | on,off | off,on ...), which
    cancels drift and lets one agent serve two adjacent attached phases."""
    rows: dict[float, list[dict]] = {r: [] for r in rates}
    span = _AgentSpan(config)
    k = 0
    try:
        for r in range(rounds):
            for rate in rates:
                order = (False, True) if k % 2 == 0 else (True, False)
                k += 1
                pair = {}
                for attached in order:
                    pair[attached] = churn_phase(profile, span, attached, rate)
                rows[rate].append(pair)
                C.log(f"churn rate={rate or 'max'} round {r + 1}/{rounds}: off {pair[False]['rate']:.0f}/s "
                      f"on {pair[True]['rate']:.0f}/s ratio {pair[True]['rate'] / pair[False]['rate']:.3f}")
    finally:
        span.detach()
    rows["span"] = span
    return rows


def _churn_summary(profile, rows: list[dict], rate: float, span) -> dict:
    ratios = [p[True]["rate"] / p[False]["rate"] for p in rows]
    cpu_ratios = [p[True]["cpu_us_per_conn"] / p[False]["cpu_us_per_conn"] for p in rows]
    return {
        "offered_rate": rate,
        "rate_off": C.summary([p[False]["rate"] for p in rows]),
        "rate_on": C.summary([p[True]["rate"] for p in rows]),
        "ratio": C.summary(ratios),
        "cpu_us_per_conn_off": C.summary([p[False]["cpu_us_per_conn"] for p in rows]),
        "cpu_us_per_conn_on": C.summary([p[True]["cpu_us_per_conn"] for p in rows]),
        "cpu_ratio": C.summary(cpu_ratios),
        "gen_cpu_us_per_conn_off": C.summary([p[False]["gen_cpu_us_per_conn"] for p in rows]),
        "gen_cpu_us_per_conn_on": C.summary([p[True]["gen_cpu_us_per_conn"] for p in rows]),
        "gen_cpu_ratio": C.summary([p[True]["gen_cpu_us_per_conn"] / p[False]["gen_cpu_us_per_conn"] for p in rows]),
        "agent_alive_after_load": span.checks,
        "agent_startup_seconds": span.startups,
        "failed_connects": sum(p[a]["failed"] for p in rows for a in (False, True)),
        "foreign_links_max": max(p[a]["foreign_links"] for p in rows for a in (False, True)),
        "agent_cpu_cores_on": C.summary([p[True]["agent_cpu_s"] / (p[True]["seconds"] + profile.warmup)
                                         for p in rows]),
        "other_cpu_cores_off": C.summary([(p[False]["cpu_busy_s"] - p[False]["cpu_procs_s"]) / p[False]["seconds"]
                                          for p in rows]),
    }


# the agent without its syscall hook (configuration key syscall_tracing)
NO_SYSCALL_TRACING = {"syscall_tracing": False}


def churn(profile) -> dict:
    rows = _paired(profile, [0], profile.rounds)
    out = _churn_summary(profile, rows[0], 0, rows["span"])
    rows = _paired(profile, [0], profile.rounds, NO_SYSCALL_TRACING)
    out["no_syscall_tracing"] = _churn_summary(profile, rows[0], 0, rows["span"])
    return out


def churn_growth(profile) -> dict:
    rows = _paired(profile, list(profile.churn_rates), profile.growth_rounds)
    return {str(rate): _churn_summary(profile, rows[rate], rate, rows["span"]) for rate in profile.churn_rates}


# ---- 2: syscall-heavy loops ---------------------------------------------------------------

SYSCALL_CONDITIONS = {  # the order of a forward round; "agent" last (see syscall())
    "none": "no BPF program attached (baseline)",
    "cw_sys_exit": "(a') connwatch's cw_sys_exit program alone",
    "empty": "(b) empty tp_btf/sys_exit program",
    "alt": "(c) per-syscall tracepoints syscalls:sys_exit_{accept4,socket,openat,...} (alternative design)",
    "agent_no_syscalls": "(d) connwatch agent with syscall_tracing: false (no syscall hook at all)",
    "agent": "(a) connwatch agent running (all its probes, incl. tp_btf/sys_exit)",
}


class _Attach:
    """Attach one condition; an agent is kept if the next condition is the agent again."""

    def __init__(self, cond: str, objs, agent: C.Agent | None):
        self.agent = self.bpf = None
        if cond == "agent":
            self.agent = agent or C.Agent(tag="syscall")
        elif cond == "agent_no_syscalls":
            self.agent = C.Agent(NO_SYSCALL_TRACING, tag="syscall-nosys")
        if self.agent:
            self.agent.settle()
        elif cond == "cw_sys_exit":
            self.bpf = C.Bpf(C.AGENT_OBJ, only={"cw_sys_exit"})
        elif cond == "empty":
            self.bpf = C.Bpf(objs["empty"])
        elif cond == "alt":
            self.bpf = C.Bpf(objs["alt"], only={n for n in _alt_programs(objs)})

    @property
    def pids(self):
        return [self.agent.pid] if self.agent else []

    def close(self, keep_agent: bool = False) -> C.Agent | None:
        if self.bpf:
            self.bpf.close()
        if self.agent and not keep_agent:
            self.agent.stop()
            return None
        return self.agent


def _alt_programs(objs) -> list[str]:
    from connwatch.libbpf import BpfObject

    with BpfObject(str(objs["alt"])) as o:
        return [n for n in o.programs if n.startswith("alt_")]


def syscall(profile, objs) -> dict:
    conds = list(SYSCALL_CONDITIONS)
    modes = ("getppid", "pipe")
    ns = {c: {m: [] for m in modes} for c in conds}      # CPU ns per iteration (primary)
    wall = {c: {m: [] for m in modes} for c in conds}    # wall ns per iteration and process
    noise = {c: [] for c in conds}  # busy CPU not used by the loops, in cores
    foreign = defaultdict(int)
    skipped = {}
    agent = None
    with C.tracefs():
        for r in range(profile.syscall_rounds):
            # ABBA: forward, then reversed; the agent ends one round and starts
            # the next, so one agent start serves two rounds
            order = conds if r % 2 == 0 else conds[::-1]
            for i, cond in enumerate(order):
                if cond == "none":
                    _quiet(profile)
                a = _Attach(cond, objs, agent)
                agent = None
                keep = cond == "agent" and i == len(order) - 1 and r + 1 < profile.syscall_rounds
                try:
                    if a.bpf and a.bpf.skipped:
                        skipped.update(a.bpf.skipped)
                    foreign[cond] = max(foreign[cond], C.foreign_syscall_links(a.pids))
                    for m in modes:
                        res = C.loadgen("sysloop", m, NCPU, profile.warmup / 2, profile.syscall_seconds)
                        ns[cond][m].append(res["cpu_ns_per_iter"])
                        wall[cond][m].append(res["ns_per_iter"])
                        noise[cond].append((res["cpu_busy_s"] - res["cpu_procs_s"]) / res["seconds"])
                finally:
                    agent = a.close(keep_agent=keep)
            C.log(f"syscall round {r + 1}/{profile.syscall_rounds}: " + ", ".join(
                f"{c} {ns[c]['getppid'][-1]:.0f}/{ns[c]['pipe'][-1]:.0f}ns" for c in conds))
    out = {"conditions": SYSCALL_CONDITIONS, "foreign_links_max": dict(foreign),
           "alt_programs_not_attached": skipped,
           "other_cpu_cores": {c: C.summary(v) for c, v in noise.items()}}
    for m in modes:
        out[m] = {}
        base = ns["none"][m]
        for c in conds:
            row = {"ns_per_iter": C.summary(ns[c][m]), "wall_ns_per_iter": C.summary(wall[c][m])}
            if c != "none":
                row["slowdown_pct"] = C.summary([(x / b - 1) * 100 for x, b in zip(ns[c][m], base)])
                row["wall_slowdown_pct"] = C.summary([(x / b - 1) * 100 for x, b in zip(wall[c][m], wall["none"][m])])
            out[m][c] = row
    return out


# ---- 3: per-event BPF cost ------------------------------------------------------------------


def _stats_delta(before, after):
    return {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}


def _agent_prog_stats(agent: C.Agent) -> dict[str, tuple[int, int]]:
    t, n = {}, {}
    for name, lab, v in agent.metrics():
        if name == "connwatch_bpf_program_run_seconds_total":
            t[lab["program"]] = v
        elif name == "connwatch_bpf_program_runs_total":
            n[lab["program"]] = v
    return {p: (int(round(t[p] * 1e9)), int(n.get(p, 0))) for p in t}


def _measure(profile, read_stats, settle=lambda: None) -> dict:
    """Churn, then a getppid loop, then 1-byte write+read loops over loopback TCP
    connections; program stats read before, between and after."""
    s0 = read_stats()
    ch = C.loadgen("churn", profile.churn_servers, profile.churn_clients, profile.warmup / 2,
                   profile.churn_seconds, 0, "127.0.0.10")
    settle()
    s1 = read_stats()
    sl = C.loadgen("sysloop", "getppid", NCPU, 0.1, profile.syscall_seconds)
    # data on established TCP connections: sock_send_length / sock_recv_length
    tcp = C.loadgen("sysloop", "tcp", NCPU, 0.1, profile.syscall_seconds)
    settle()
    s2 = read_stats()
    total, churn_d = _stats_delta(s0, s2), _stats_delta(s0, s1)
    rows = {p: {"runs": n, "ns_per_event": t / n if n else float("nan"), "total_s": t / 1e9}
            for p, (t, n) in sorted(total.items()) if n}
    # conns counts only the measured window, the stats include the warm-up: use the
    # generator's own connection count over its whole run, estimated from its rate
    conns = ch["rate"] * (ch["seconds"] + profile.warmup / 2)
    return {"programs": rows,
            "bpf_ns_per_connection": sum(t for t, _ in churn_d.values()) / max(conns, 1),
            "bpf_ns_per_connection_by_program": {p: t / max(conns, 1) for p, (t, _) in sorted(churn_d.items()) if t},
            "workload": {"conns_measured": ch["conns"], "getppid_calls": sl["iters"],
                         "tcp_1byte_round_trips": tcp["iters"]}}


def bpfcost(profile, objs) -> dict:
    out = {}
    with C.sysctl("kernel.bpf_stats_enabled", "1") as old:
        out["bpf_stats_enabled_before"] = old
        # the agent: read through its own metrics (this also checks the
        # connwatch_bpf_program_* series it exports)
        agent = C.Agent(agent_config(profile), tag="bpfcost")
        try:
            time.sleep(agent_refresh_wait(profile))
            out["agent"] = _measure(profile, lambda: _agent_prog_stats(agent),
                                    lambda: time.sleep(agent_refresh_wait(profile)))
            out["agent_probes"] = agent.probes
        finally:
            agent.stop()
        # the alternatives, same workload, loaded by the bench itself
        with C.tracefs():
            for tag, path, only in (("empty", objs["empty"], None),
                                    ("alt", objs["alt"], set(_alt_programs(objs)))):
                b = C.Bpf(path, only=only)
                try:
                    out[tag] = _measure(profile, b.run_stats)
                finally:
                    b.close()
                if tag == "alt":
                    rows = out[tag]["programs"]
                    tot_t = sum(r["total_s"] for r in rows.values())
                    tot_n = sum(r["runs"] for r in rows.values())
                    rows["(all alt_* programs)"] = {"runs": tot_n, "total_s": tot_t,
                                                    "ns_per_event": tot_t * 1e9 / tot_n if tot_n else float("nan")}
    out["bpf_stats_enabled_after"] = C.sysctl_get("kernel.bpf_stats_enabled")
    return out
