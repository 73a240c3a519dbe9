"""WebSocket echo throughput with and without the agent (issue 12 item 5).

The workload connwatch exists for: a WebSocket server, one process, 32
connections, each ping-ponging one 64-byte binary message at a time with a
load generator (`loadgen ws-echo`, C, RFC 6455 framing over plain TCP,
every echo checked). Two servers: Node's `ws` and Python's `websockets`
(bench/servers/). The server is the bottleneck by construction (one
single-threaded process against a C client that needs a few microseconds
per message); every phase records both processes' CPU so that is checked,
not assumed.

Both servers run for the whole benchmark (JIT and allocator warm; the one
not being measured is idle), and every phase measures each in turn under
the same condition, so one agent start serves both. Every measurement
opens 32 fresh connections, so the agent under test sees their handshakes
and upgrades and measures its steady state after classification. Paired
rounds (bench/paired.py) of: nothing attached; nothing attached again (an
A/A control: what this machine's own drift does to a ratio); the agent as
installed; the agent with `syscall_tracing: always`.

Then, in separate rounds with kernel.bpf_stats_enabled=1 (it adds clock
reads to every BPF run, so it never overlaps the throughput rounds): the BPF
time each agent program spends per echoed message, and the same load with
only an empty `sock_send_length` + `sock_recv_length` pair attached, whose
ns per run is the floor of any program on those hooks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from . import common as C
from . import paired
from .overhead import agent_config, agent_rows
from .paired import ALWAYS_AGENT, DEFAULT_AGENT, NOTHING, NOTHING_AGAIN, Condition, Rounds

CONDITIONS = [NOTHING, NOTHING_AGAIN, DEFAULT_AGENT, ALWAYS_AGENT]
EMPTY_SEND_RECV = Condition("empty_send_recv", "empty tp_btf/sock_send_length + sock_recv_length programs",
                            programs=frozenset({"bench_empty_send", "bench_empty_recv"}))
BPF_CONDITIONS = [DEFAULT_AGENT, ALWAYS_AGENT, EMPTY_SEND_RECV]
# connwatch's programs on the send/recv tracepoints and their empty twins
SEND_RECV_TWINS = {"sock_send": "bench_empty_send", "sock_recv": "bench_empty_recv"}


@dataclass(frozen=True)
class ServerKind:
    name: str
    label: str
    argv: tuple[str, ...]
    env: dict


SERVERS = {
    "node": ServerKind("node", "Node ws", ("node", str(C.ROOT / "bench" / "servers" / "ws_echo.js")),
                       {"NODE_PATH": str(C.ROOT / "tests" / "node" / "node_modules")}),
    "python": ServerKind("python", "Python websockets",
                         (sys.executable, str(C.ROOT / "bench" / "servers" / "ws_echo.py")), {}),
}


class EchoServer(C.LineProcess):
    def __init__(self, kind: ServerKind):
        super().__init__(kind.argv, env=kind.env, what=f"{kind.label} echo server")
        self.kind = kind
        _, port, pid = self.expect("ready")
        self.port, self.server_pid = int(port), int(pid)


def _echo(profile, server: EchoServer, warmup: float, seconds: float) -> dict:
    res = C.loadgen("ws-echo", server.port, profile.ws_connections, profile.ws_message_bytes, warmup, seconds,
                    server.server_pid)
    res["gen_cores"] = res["gen_cpu_s"] / res["seconds"]
    res["server_cores"] = res["server_cpu_s"] / res["seconds"]
    res["server_cpu_us_per_msg"] = res["server_cpu_s"] * 1e6 / max(res["msgs"], 1)
    res["other_cpu_cores"] = (res["cpu_busy_s"] - res["gen_cpu_s"] - res["server_cpu_s"]) / res["seconds"]
    return res


def _throughput_measure(profile, servers: list[EchoServer]):
    def measure(_attached) -> dict:
        return {s.kind.name: _echo(profile, s, profile.warmup, profile.ws_seconds) for s in servers}
    return measure


def _summary(rounds: Rounds, server: str) -> dict:
    out = {}
    for c in rounds.conditions:
        row = {k: C.summary(rounds.values(c.name, server, k))
               for k in ("rate", "server_cores", "gen_cores", "server_cpu_us_per_msg", "other_cpu_cores")}
        if not c.is_baseline:
            row["ratio"] = C.summary(rounds.ratios(c.name, server, "rate"))
            row["server_cpu_ratio"] = C.summary(rounds.ratios(c.name, server, "server_cpu_us_per_msg"))
        if c.agent_config is not None:
            row.update(agent_rows(rounds, c.name))
        out[c.name] = row
    out["generator_max_cores"] = max(p.result[server]["gen_cores"] for p in rounds.phases)
    return out


# ---- BPF time per message (bpf_stats) ------------------------------------------------------


def _stats(attached: paired.Attached) -> dict[str, C.ProgramStats]:
    return attached.agent.program_stats() if attached.agent else attached.bpf.run_stats()


def _bpf_measure(profile, servers: list[EchoServer]):
    """Per server, one echo run; each program's run count and time over it."""
    def one(attached: paired.Attached, server: EchoServer) -> dict:
        before = _stats(attached)
        res = _echo(profile, server, profile.warmup, profile.ws_seconds)
        t_end = time.time()
        delta = C.stats_delta(before, _stats(attached))
        msgs = res["msgs_total"]  # the stats cover the warm-up too
        out = {"msgs": msgs, "rate": res["rate"],
               "programs": {p: [d.run_ns, d.runs] for p, d in delta.items() if d.runs},
               "bpf_ns_per_msg": sum(d.run_ns for d in delta.values()) / msgs}
        if attached.agent:
            # what the agent exports (connwatch_bpf_program_runs_total),
            # cumulative since its start: at least what was measured here
            m = attached.agent.metrics_after(t_end)
            exported = {lab["program"]: v for n, lab, v in m if n == "connwatch_bpf_program_runs_total"}
            out["exported_missing"] = sorted(p for p, (_, runs) in out["programs"].items()
                                             if exported.get(p, 0) < runs)
        return out

    def measure(attached: paired.Attached) -> dict:
        return {s.kind.name: one(attached, s) for s in servers}
    return measure


def _bpf_summary(rounds: Rounds, server: str) -> dict:
    out: dict = {}
    for c in rounds.conditions:
        results = [ph.result[server] for ph in rounds.of(c.name)]
        progs = sorted({p for r in results for p in r["programs"]})
        rows = {}
        for p in progs:
            runs = [(r["programs"].get(p, [0, 0]), r["msgs"]) for r in results]
            rows[p] = {"runs": sum(n for (_, n), _ in runs),
                       "ns_per_run": C.median([t / n for (t, n), _ in runs if n]),
                       "runs_per_msg": C.median([n / m for (_, n), m in runs]),
                       "ns_per_msg": C.median([t / m for (t, _), m in runs])}
        out[c.name] = {"programs": rows, "bpf_ns_per_msg": C.summary([r["bpf_ns_per_msg"] for r in results])}
        if c.agent_config is not None:
            # programs whose exported run count fell short of the kernel's (should be none)
            out[c.name]["exported_missing"] = sorted({p for r in results for p in r["exported_missing"]})
            out[c.name]["hook_armed_phases"] = sum(1 for ph in rounds.of(c.name) if ph.hook_armed)
    # per round: the agent's ns/run on a hook minus its empty twin's
    empty = {ph.round: ph.result[server]["programs"] for ph in rounds.of(EMPTY_SEND_RECV.name)}
    out["excess_ns_per_run"] = {}
    for prog, twin in SEND_RECV_TWINS.items():
        xs = []
        for ph in rounds.of(DEFAULT_AGENT.name):
            a, e = ph.result[server]["programs"].get(prog), empty.get(ph.round, {}).get(twin)
            if a and e and a[1] and e[1]:
                xs.append(a[0] / a[1] - e[0] / e[1])
        out["excess_ns_per_run"][prog] = C.summary(xs)
    return out


def _cpu_accounting(summary: dict, bpf: dict) -> dict:
    """What the hooks cost the server by CPU accounting instead of throughput,
    which this machine cannot resolve to 1 %: of the server's CPU per echo
    with nothing attached, the share that an empty send/recv pair takes (the
    floor of any program on those hooks) and the share the default agent's
    send/recv programs take. Each echo runs one send and one receive at each
    end, so the server's end is half of the per-echo numbers. bpf_stats time
    holds a clock read that a run without it does not pay and leaves out the
    tracepoint's dispatch into BPF: both shares are estimates, not bounds."""
    server_ns = summary["none"]["server_cpu_us_per_msg"]["median"] * 1000
    empty = bpf["empty_send_recv"]["programs"]
    agent = bpf["agent"]["programs"]
    floor = sum(empty.get(p, {}).get("ns_per_msg", 0) for p in SEND_RECV_TWINS.values()) / 2
    used = sum(agent.get(p, {}).get("ns_per_msg", 0) for p in SEND_RECV_TWINS) / 2
    return {"server_cpu_ns_per_msg": server_ns, "floor_server_ns_per_msg": floor,
            "floor_share": floor / server_ns, "agent_server_ns_per_msg": used,
            "agent_share": used / server_ns, "cpu_accounted_ratio": server_ns / (server_ns + used)}


def ws(profile) -> dict:
    out = {"connections": profile.ws_connections, "message_bytes": profile.ws_message_bytes}
    servers: list[EchoServer] = []
    try:
        for name in profile.ws_servers:
            servers.append(EchoServer(SERVERS[name]))
            _echo(profile, servers[-1], 0, profile.ws_server_warmup)  # JIT, allocator, caches
        rounds = paired.run(profile, CONDITIONS, profile.ws_rounds, _throughput_measure(profile, servers),
                            "ws", agent_config(profile))
        # bpf_stats adds clock reads to every BPF run: never during the rounds above
        with C.sysctl("kernel.bpf_stats_enabled", "1"):
            bpf_rounds = paired.run(profile, BPF_CONDITIONS, profile.ws_bpf_rounds,
                                    _bpf_measure(profile, servers), "ws bpf_stats", agent_config(profile))
    finally:
        for s in servers:
            s.stop()
    out["rounds"] = rounds.to_json()
    out["bpf_rounds"] = bpf_rounds.to_json()
    out["foreign_max"] = max((p.foreign for p in rounds.phases + bpf_rounds.phases), default=0)
    for s in servers:
        summary, bpf = _summary(rounds, s.kind.name), _bpf_summary(bpf_rounds, s.kind.name)
        out[s.kind.name] = {"label": s.kind.label, **summary, "bpf": bpf,
                            "cpu_accounting": _cpu_accounting(summary, bpf)}
    return out
