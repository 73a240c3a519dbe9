"""What the agent costs the loads it watches: connection churn and
syscall-heavy loops (benchmarks 1 and 2, and the churn-rate half of 5).

Paired rounds (bench/paired.py) of: nothing attached, the agent as
installed (syscall hook on demand, so none on these loads), and the agent
with `syscall_tracing: always` (what the old default cost); the syscall
loops add an empty program on `sys_exit`, the floor of any syscall hook.
"""

from __future__ import annotations

import os

from . import common as C
from . import paired
from .paired import ALWAYS_AGENT, DEFAULT_AGENT, NOTHING, NOTHING_AGAIN, Condition, Rounds

NCPU = os.cpu_count() or 2
CHURN_CONDITIONS = [NOTHING, NOTHING_AGAIN, DEFAULT_AGENT, ALWAYS_AGENT]
EMPTY_SYS_EXIT = Condition("empty_sys_exit", "empty tp_btf/sys_exit program (any syscall hook's floor)",
                           programs=frozenset({"bench_empty_exit"}))
SYSCALL_CONDITIONS = [NOTHING, DEFAULT_AGENT, ALWAYS_AGENT, EMPTY_SYS_EXIT]
SYSCALL_MODES = {"getppid": "getppid()", "pipe": "1-byte write+read on a pipe"}


def agent_config(profile) -> dict:
    """What every benchmark's agent gets on top of its condition's settings."""
    return {"refresh_interval_seconds": profile.agent_refresh}


def agent_rows(rounds: Rounds, cond: str) -> dict:
    """What every agent phase reports besides the measurement."""
    ph = rounds.of(cond)
    return {"agent_cpu_cores": C.summary([p.agent_cpu_cores for p in ph]),
            "hook_armed_phases": sum(1 for p in ph if p.hook_armed),
            "arm_reasons": sorted({p.arm_reason for p in ph if p.arm_reason}),
            "agent_alive_after_load": [p.agent_alive for p in ph]}


# ---- 1 and 5b: connection churn ----------------------------------------------------


def _churn_measure(profile, rate: float):
    def measure(_attached) -> dict:
        res = C.loadgen("churn", profile.churn_servers, profile.churn_clients, profile.warmup,
                        profile.churn_seconds, rate, "127.0.0.10")
        res["cpu_us_per_conn"] = res["cpu_busy_s"] * 1e6 / max(res["conns"], 1)
        res["gen_cpu_us_per_conn"] = res["cpu_procs_s"] * 1e6 / max(res["conns"], 1)
        # CPU of other processes on the machine while the generator ran (cores)
        res["other_cpu_cores"] = (res["cpu_busy_s"] - res["cpu_procs_s"]) / res["seconds"]
        return res
    return measure


def _churn_summary(rounds: Rounds, rate: float) -> dict:
    conds = rounds.conditions
    out = {"offered_rate": rate, "rounds": rounds.to_json(),
           "rate": {c.name: C.summary(rounds.values(c.name, "rate")) for c in conds},
           "gen_cpu_us_per_conn": {c.name: C.summary(rounds.values(c.name, "gen_cpu_us_per_conn")) for c in conds},
           "foreign_max": max((p.foreign for p in rounds.phases), default=0),
           "failed_connects": sum(p.result["failed"] for p in rounds.phases)}
    for c in conds[1:]:
        out[c.name] = {"ratio": C.summary(rounds.ratios(c.name, "rate")),
                       "cpu_ratio": C.summary(rounds.ratios(c.name, "cpu_us_per_conn")),
                       "gen_cpu_ratio": C.summary(rounds.ratios(c.name, "gen_cpu_us_per_conn"))}
        if c.agent_config is not None:
            out[c.name].update(agent_rows(rounds, c.name))
    return out


def churn(profile) -> dict:
    rounds = paired.run(profile, CHURN_CONDITIONS, profile.rounds, _churn_measure(profile, 0), "churn",
                        agent_config(profile))
    return _churn_summary(rounds, 0)


def churn_growth(profile) -> dict:
    out = {}
    for rate in profile.churn_rates:
        rounds = paired.run(profile, [NOTHING, DEFAULT_AGENT], profile.growth_rounds,
                            _churn_measure(profile, rate), f"churn at {rate}/s", agent_config(profile))
        out[str(rate)] = _churn_summary(rounds, rate)
    return out


# ---- 2: syscall-heavy loops ---------------------------------------------------------------


def _syscall_measure(profile):
    def measure(_attached) -> dict:
        res = {}
        for mode in SYSCALL_MODES:
            r = C.loadgen("sysloop", mode, NCPU, profile.warmup / 2, profile.syscall_seconds)
            res[f"{mode}_cpu_ns"] = r["cpu_ns_per_iter"]
            res[f"{mode}_wall_ns"] = r["ns_per_iter"]
            res[f"{mode}_other_cpu_cores"] = (r["cpu_busy_s"] - r["cpu_procs_s"]) / r["seconds"]
        return res
    return measure


def syscall(profile) -> dict:
    rounds = paired.run(profile, SYSCALL_CONDITIONS, profile.syscall_rounds, _syscall_measure(profile),
                        "syscall", agent_config(profile))
    out = {"rounds": rounds.to_json(), "foreign_max": max((p.foreign for p in rounds.phases), default=0)}
    for mode, label in SYSCALL_MODES.items():
        m = out[mode] = {"label": label}
        for c in SYSCALL_CONDITIONS:
            row = {"cpu_ns": C.summary(rounds.values(c.name, f"{mode}_cpu_ns")),
                   "wall_ns": C.summary(rounds.values(c.name, f"{mode}_wall_ns"))}
            if not c.is_baseline:
                row["slowdown"] = C.summary(rounds.ratios(c.name, f"{mode}_cpu_ns"))
                row["wall_slowdown"] = C.summary(rounds.ratios(c.name, f"{mode}_wall_ns"))
            else:
                row["other_cpu_cores"] = C.summary(rounds.values(c.name, f"{mode}_other_cpu_cores"))
            m[c.name] = row
    for c in SYSCALL_CONDITIONS:
        if c.agent_config is not None:
            out.setdefault("agents", {})[c.name] = agent_rows(rounds, c.name)
    return out
