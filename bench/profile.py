"""Where the time goes: `perf record -e cpu-clock -g` profiles of the load
generator's processes (kernel work done on their behalf included: syscalls,
BPF programs, loopback softirqs run in their context), for the syscall loop
(nothing attached, the agent with `syscall_tracing: always`, an empty
`sys_exit` program) and for connection churn (nothing, the default agent)
(`python -m bench --only profile`). Not system-wide (-a): on a shared
machine that would mostly profile other people's work. The top of each
`perf report` is kept in the results and in build/bench/profile-*.txt.
"""

from __future__ import annotations

import re
import subprocess

from . import common as C
from . import noise
from .overhead import NCPU, agent_config


# symbol -> what it is part of (first match wins)
CATEGORIES = [
    ("BPF programs", re.compile(r"^bpf_prog_")),
    ("BPF maps and helpers", re.compile(r"htab|lookup_nulls_elem_raw|^bpf_map|^bpf_probe_read|^bpf_get_current"
                                        r"|^bpf_ktime|copy_from_kernel_nofault|pcpu_freelist|^bpf_lru|^bpf_obj_")),
    ("tracepoint dispatch (BPF trampoline)", re.compile(r"^bpf_trace_run|^__bpf_trace_|^__traceiter_"
                                                        r"|^perf_syscall|^perf_trace|^trace_call_bpf|^bpf_prog_run"
                                                        r"|^perf_tp_event|^__bpf_prog")),
    ("syscall tracing slow path", re.compile(r"^syscall_exit_work|^syscall_trace_enter"
                                             r"|^syscall_exit_to_user_mode_prepare")),
]


def categorize(lines: list[str]) -> dict[str, float]:
    out = {name: 0.0 for name, _ in CATEGORIES}
    for ln in lines:
        m = re.match(r"\s*([\d.]+)%\s+\[[k.]\]\s+(\S+)", ln)
        if not m:
            continue
        for name, rx in CATEGORIES:
            if rx.search(m.group(2)):
                out[name] += float(m.group(1))
                break
    return {k: round(v, 2) for k, v in out.items()}


def _perf(tag: str, argv: list, top: int = 30) -> dict:
    data = C.BUILD / f"profile-{tag}.data"
    rec = subprocess.run(["perf", "record", "-q", "-o", str(data), "-e", "cpu-clock", "-g", "--",
                          str(C.LOADGEN), *map(str, argv)], capture_output=True, text=True, timeout=300)
    if rec.returncode != 0:
        return {"top": [f"perf record failed: {rec.stderr.strip()[-500:]}"], "categories_pct": {}}
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                          "--sort", "sym", "--percent-limit", "0.02"], capture_output=True, text=True, timeout=300)
    lines = [ln.rstrip() for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    (C.BUILD / f"profile-{tag}.txt").write_text("\n".join(lines) + "\n")
    data.unlink(missing_ok=True)
    return {"top": lines[:top], "categories_pct": categorize(lines),
            "foreign": len(noise.foreign_attachments())}


def profile(profile) -> dict:
    if not C.which("perf"):
        return {"error": {"top": ["perf not installed (apt-get install linux-perf)"], "categories_pct": {}}}
    out = {}
    getppid = ["sysloop", "getppid", NCPU, 0.1, max(profile.syscall_seconds, 1.0)]
    churn = ["churn", profile.churn_servers, profile.churn_clients, 0.2, max(profile.churn_seconds, 2.0), 0,
             "127.0.0.10"]
    noise.wait_quiet(profile.quiet_wait)
    out["getppid_none"] = _perf("getppid-none", getppid)
    agent = C.Agent({**agent_config(profile), "syscall_tracing": "always"}, tag="profile-always")
    try:
        agent.settle()
        out["getppid_agent_always"] = _perf("getppid-agent-always", getppid)
    finally:
        agent.stop()
    noise.wait_quiet(profile.quiet_wait)
    b = C.Bpf(C.EMPTY_OBJ, {"bench_empty_exit"})
    try:
        out["getppid_empty_sys_exit"] = _perf("getppid-empty-sys-exit", getppid)
    finally:
        b.close()
    noise.wait_quiet(profile.quiet_wait)
    out["churn_none"] = _perf("churn-none", churn)
    agent = C.Agent(agent_config(profile), tag="profile")
    try:
        agent.settle()
        out["churn_agent"] = _perf("churn-agent", churn)
    finally:
        agent.stop()
    return out
