"""What accepting one connection costs in BPF (issue 12 item 4: <= 300 ns).

Method. kernel.bpf_stats_enabled=1 makes the kernel count, per program, its
runs and the time spent in them. `loadgen accept-phases N` opens N loopback
connections in one step (client: connect, write one byte; server, in its
own process with its own listener: accept, read that byte, so the accepting
process does the connection's first I/O as real servers do) and closes them
in a second step (the server closes, the client reads the FIN and resets).
Every program's counters are read directly from the kernel before the
open step, between the two and after the close step, so the open step's
delta is the accept path alone and the close step's the close path alone.

On this host (no fentry, no kprobes) the accept path is the handshake branch
of cw_sock_state and cw_sock_state_nested (SYN_RECV -> ESTABLISHED: the
connection is counted, queued under the listener's owner) plus the
first-I/O claim in cw_sock_recv (the accepting process reads first: the
connection leaves the queue and is owned by it). The same tracepoints also
fire for the client ends of these loopback connections (SYN_SENT,
ESTABLISHED, the client's write), so they are in the open step too: both
ends of a connection are on this host, as they would be for a local proxy.

To separate the dispatch every program on these hooks pays from the work
connwatch's code does, the same steps run with only the bench's empty twins
attached (bench/bpf/empty.bpf.c: two programs on inet_sock_set_state, one
on each of sock_send_length / sock_recv_length), in paired rounds with the
agent. Reported per accepted connection: each program's runs, ns per run
and ns; the agent's total (raw bpf_stats time), and that total minus the
empty twins' (connwatch's own work). bpf_stats' clock reads around each run
are inside both; the tracepoint's call into BPF before them is in neither.

On kernels with fentry the accept path is cw_accept_fexit on
inet_csk_accept instead; `accept_vm` measures it in Debian's 6.12 booted
under QEMU (tests/kernels/run-in-vm). That guest is emulated (TCG, about
ten times slower than the host, unevenly so), so only its ratios mean
anything: accept_fexit's ns per run against an empty fexit twin and
against the tracepoint programs measured in the same guest.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from . import common as C
from . import paired
from .overhead import agent_config
from .paired import DEFAULT_AGENT, Condition, Rounds

# the agent's programs on the accept path here, and their empty twins
TWINS = {"sock_state": "bench_empty_state", "sock_state_nested": "bench_empty_state2",
         "sock_send": "bench_empty_send", "sock_recv": "bench_empty_recv"}
EMPTY_ACCEPT_PATH = Condition("empty_twins", "empty twins of the accept-path programs",
                              programs=frozenset(TWINS.values()))
# Runs of those hooks that belong to the server's end of one connection, by
# construction: its child socket's two state changes (CLOSE -> SYN_RECV,
# SYN_RECV -> ESTABLISHED), each calling both state programs, and its first
# read. The other two state changes and the write are the loopback client's,
# which a server whose clients are elsewhere would not pay for.
SERVER_END_RUNS = {"sock_state": 2, "sock_state_nested": 2, "sock_recv": 1}
# in a kernel with fentry: the agent's fexit program and its twin
FEXIT_TWINS = {"accept_fexit": "bench_empty_accept", "sock_state": "bench_empty_state",
               "sock_state_nested": "bench_empty_state2"}
FEXIT_SERVER_END_RUNS = {"accept_fexit": 1, "sock_state": 2, "sock_state_nested": 2}
EMPTY_FEXIT_PATH = Condition("empty_twins", "empty fexit/inet_csk_accept and inet_sock_set_state twins",
                             programs=frozenset(FEXIT_TWINS.values()))
SRC_IP = "127.0.0.30"
VM_KERNEL = "6.12"
RESULT_MARK = "BENCH-RESULT "


def _stats(attached: paired.Attached) -> dict[str, C.ProgramStats]:
    return attached.agent.program_stats() if attached.agent else attached.bpf.run_stats()


def _measure(conns: int):
    """One open step and one close step of `conns` connections: each
    program's (ns, runs) delta in each. An unmeasured open+close cycle goes
    first: the first runs of freshly loaded programs pay for cold caches and,
    under QEMU's emulator, for translating the programs' code (tens of
    microseconds a run for the first few hundred runs there)."""
    def measure(attached: paired.Attached) -> dict:
        gen = C.LineProcess([C.LOADGEN, "accept-phases", conns, SRC_IP], what="loadgen accept-phases")
        try:
            gen.expect("ready")  # its listener exists: listen() is not in the steps
            for step, answer in (("open", "opened"), ("close", "closed")):  # the warm-up cycle
                gen.send(step)
                gen.expect(answer)
            s0 = _stats(attached)
            gen.send("open")
            opened = gen.expect("opened")
            s1 = _stats(attached)
            gen.send("close")
            closed = gen.expect("closed")
            s2 = _stats(attached)
        finally:
            gen.stop()
        return {"conns": conns, "open_seconds": float(opened[2]), "close_seconds": float(closed[2]),
                "open": {p: [d.run_ns, d.runs] for p, d in C.stats_delta(s0, s1).items() if d.runs},
                "close": {p: [d.run_ns, d.runs] for p, d in C.stats_delta(s1, s2).items() if d.runs}}
    return measure


def _per_connection(rounds: Rounds, cond: str, step: str) -> dict:
    """Per program: medians over rounds of runs/conn, ns/run, ns/conn."""
    progs = sorted({p for ph in rounds.of(cond) for p in ph.result[step]})
    out = {}
    for p in progs:
        rows = [(ph.result[step].get(p, [0, 0]), ph.result["conns"]) for ph in rounds.of(cond)]
        out[p] = {"runs_per_conn": C.median([r / n for (_, r), n in rows]),
                  "ns_per_run": C.median([t / r for (t, r), _ in rows if r]),
                  "ns_per_conn": C.summary([t / n for (t, _), n in rows])}
    return out


def _totals(rounds: Rounds, agent: str, empty: str, step: str, twins: dict[str, str],
            server_end_runs: dict[str, int]) -> dict:
    """The agent's BPF ns per connection in a step (all its programs); the
    floor: the empty twins' ns/run in the paired round times the agent's
    runs (what the hooks alone cost, whatever a program on them does), and
    the same for the server's end alone; and the raw total minus the floor
    (connwatch's own work)."""
    empty_by_round = {ph.round: ph.result for ph in rounds.of(empty)}
    raw, work, floors, server_floors = [], [], [], []
    for ph in rounds.of(agent):
        n = ph.result["conns"]
        total = sum(t for t, _ in ph.result[step].values())
        raw.append(total / n)
        e = empty_by_round.get(ph.round)
        if e is None:
            continue
        floor = server_floor = 0.0
        for prog, twin in twins.items():
            t_e, r_e = e[step].get(twin, [0, 0])
            _, r_a = ph.result[step].get(prog, [0, 0])
            if r_e:
                floor += t_e / r_e * r_a
                server_floor += t_e / r_e * server_end_runs.get(prog, 0)
        work.append((total - floor) / n)
        floors.append(floor / n)
        server_floors.append(server_floor)
    out = {"raw_ns_per_conn": C.summary(raw), "over_empty_ns_per_conn": C.summary(work),
           "floor_ns_per_conn": C.summary(floors)}
    if server_end_runs:  # the open step's: a close's runs are not split by end
        out["server_end_floor_ns_per_conn"] = C.summary(server_floors)
    return out


def _summarize(rounds: Rounds, agent: str, empty: str, twins: dict[str, str],
               server_end_runs: dict[str, int]) -> dict:
    out = {"rounds": rounds.to_json()}
    for step in ("open", "close"):
        out[step] = {"agent": _per_connection(rounds, agent, step), "empty": _per_connection(rounds, empty, step),
                     **_totals(rounds, agent, empty, step, twins, server_end_runs if step == "open" else {})}
    return out


def accept_path(profile) -> dict:
    with C.sysctl("kernel.bpf_stats_enabled", "1"):
        rounds = paired.run(profile, [DEFAULT_AGENT, EMPTY_ACCEPT_PATH], profile.accept_rounds,
                            _measure(profile.accept_conns), "accept path", agent_config(profile))
    out = _summarize(rounds, DEFAULT_AGENT.name, EMPTY_ACCEPT_PATH.name, TWINS, SERVER_END_RUNS)
    out["conns_per_step"] = profile.accept_conns
    out["hook_armed_phases"] = sum(1 for p in rounds.of(DEFAULT_AGENT.name) if p.hook_armed)
    return out


# ---- the same in a kernel with fentry/fexit, under QEMU --------------------------------------


def accept_vm(profile) -> dict:
    """Run bench.bpfcost's guest side in Debian's 6.12 (tests/kernels/run-in-vm)."""
    runner = C.ROOT / "tests" / "kernels" / "run-in-vm"
    if not C.which("qemu-system-x86_64"):
        return {"skipped": "QEMU missing: `make kernels` installs it and fetches the kernels"}
    cmd = [str(runner), "--timeout", str(int(profile.vm_timeout)), VM_KERNEL, sys.executable, "-m",
           "bench.bpfcost", "--guest", str(profile.vm_accept_conns), str(profile.vm_accept_rounds)]
    C.log(f"booting {VM_KERNEL} under QEMU: {' '.join(cmd[1:])}")
    p = C.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line.rstrip())
        p.wait()
    finally:
        C.reap(p)
    result = next((json.loads(ln[len(RESULT_MARK):]) for ln in lines if ln.startswith(RESULT_MARK)), None)
    if p.returncode != 0 or result is None:
        raise RuntimeError(f"run-in-vm {VM_KERNEL} exited {p.returncode}: " + " | ".join(lines[-8:]))
    result["kernel"] = VM_KERNEL
    return result


def _guest(conns: int, rounds: int) -> dict:
    """Inside the VM: the accept-path measurement with fexit, as on the host."""
    C.RUN_DIR = Path("/tmp/connwatch-bench")  # the checkout is read-only in the guest
    # the guest gives processes Debian's soft 1024 open files; both ends of
    # every connection are in loadgen's two processes
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings = SimpleNamespace(quiet_wait=0)
    with C.sysctl("kernel.bpf_stats_enabled", "1"):
        r = paired.run(settings, [DEFAULT_AGENT, EMPTY_FEXIT_PATH], rounds, _measure(conns),
                       "accept path (VM)", {"refresh_interval_seconds": 2})
    out = _summarize(r, DEFAULT_AGENT.name, EMPTY_FEXIT_PATH.name, FEXIT_TWINS, FEXIT_SERVER_END_RUNS)
    out["uname"] = os.uname().release
    out["conns_per_step"] = conns
    return out


if __name__ == "__main__":
    # python -m bench.bpfcost --guest CONNS ROUNDS (what accept_vm runs in the VM)
    if sys.argv[1:2] != ["--guest"] or len(sys.argv) != 4:
        sys.exit("usage: python -m bench.bpfcost --guest CONNS ROUNDS (run by accept_vm inside the VM)")
    try:
        res = _guest(int(sys.argv[2]), int(sys.argv[3]))
    finally:
        C.cleanup()
    print(RESULT_MARK + json.dumps(res), flush=True)
