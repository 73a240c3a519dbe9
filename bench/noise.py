"""Benchmarks run alone: what else on this machine would be measured with us.

Another connwatch agent, or anybody's BPF program on a hook the benchmarks
measure, changes both sides of every comparison: a program on a syscall
tracepoint puts every syscall of every task on the slow path (the baseline
pays it too), one on `inet_sock_set_state` or `sock_{send,recv}_length`
runs for our load's events. So the harness refuses to start when it finds
any (one line on stderr, exit 2) unless `--allow-noise` is given, in which
case the results table says what was there. During a run it waits (a
while) for foreign programs to go before each phase, and records what it
still saw.

"Ours" are the links held open by the harness and the processes it
started (their /proc/<pid>/fdinfo); every link of ours is remembered
(common.OWN_LINKS), and `leftovers()` checks at the end that none is still
attached.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import common as C

# Tracepoints the benchmarks' loads fire and connwatch hooks on this host,
# the syscall ones included (any program there slows every syscall).
MEASURED_TRACEPOINTS = frozenset({
    "sys_enter", "sys_exit", "inet_sock_set_state", "sock_send_length", "sock_recv_length",
    "kfree_skb", "sched_process_exit",
})
FENTRY_ATTACH_TYPES = frozenset({"trace_fentry", "trace_fexit", "modify_return"})


@dataclass(frozen=True)
class Attachment:
    """A BPF program attached to a measured hook by someone else."""

    hook: str                 # "sys_exit", "inet_sock_set_state", "perf_event link ...", ...
    prog_id: int
    link_id: int | None       # None for programs attached through perf events without a link


@dataclass(frozen=True)
class OtherAgent:
    pid: int
    cmdline: str


@dataclass(frozen=True)
class Noise:
    agents: tuple[OtherAgent, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    # kernel.bpf_stats_enabled=1 set by someone else: every BPF run then pays
    # two clock reads, which the throughput benchmarks would count as ours
    bpf_stats_enabled: bool = False

    def __bool__(self) -> bool:
        return bool(self.agents or self.attachments or self.bpf_stats_enabled)

    def describe(self) -> str:
        """One line: who and what."""
        parts = ["kernel.bpf_stats_enabled=1"] if self.bpf_stats_enabled else []
        if self.agents:
            first = self.agents[0]
            parts.append(f"{len(self.agents)} connwatch agent(s): pid {first.pid} ({first.cmdline[:60]})"
                         + "".join(f", pid {a.pid}" for a in self.agents[1:]))
        if self.attachments:
            hooks: dict[str, int] = {}
            for a in self.attachments:
                hooks[a.hook] = hooks.get(a.hook, 0) + 1
            parts.append(f"{len(self.attachments)} foreign BPF program(s) on measured hooks: " + ", ".join(
                f"{h} x{n}" for h, n in sorted(hooks.items())))
        return "; ".join(parts) or "nothing"

    def to_json(self) -> dict:
        return {"agents": [a.__dict__ for a in self.agents],
                "attachments": [a.__dict__ for a in self.attachments],
                "bpf_stats_enabled": self.bpf_stats_enabled, "summary": self.describe()}


# ---- what is attached ---------------------------------------------------------------

# program types that can be attached through a perf event without a BPF link
# (perf_event_open + PERF_EVENT_IOC_SET_BPF, as bcc does)
PERF_PROG_TYPES = frozenset({"kprobe", "tracepoint", "perf_event"})


def _link_hook(link: dict) -> str | None:
    """The measured hook a `bpftool link` entry is on, or None.

    Not `bpftool perf`, which names the targets of perf-event links: it asks
    the kernel about every fd of every process, which takes minutes on a host
    where some process holds 100,000 sockets (the scale benchmark's, or
    another engineer's)."""
    kind = link.get("type")
    if kind == "raw_tracepoint":
        tp = link.get("tp_name", "")
        return tp if tp in MEASURED_TRACEPOINTS else None
    if kind == "perf_event":
        # classic tracepoints (syscalls:* among them), kprobes, uprobes: this
        # bpftool does not say which, so count it
        return "perf_event link (tracepoint/kprobe, target not shown)"
    if kind == "tracing" and link.get("attach_type") in FENTRY_ATTACH_TYPES:
        # nor the target of fentry/fexit: count it, an fentry program anywhere
        # on the network path is in our numbers
        return f"{link['attach_type']} (btf id {link.get('target_btf_id', '?')})"
    return None


def foreign_attachments(own_pids=()) -> tuple[Attachment, ...]:
    """Programs on measured hooks that are neither the harness's nor held by
    the processes it started (own_pids)."""
    own = C.fd_object_ids([os.getpid(), *own_pids])
    try:
        links = C.bpftool_json("link", "show")
        progs = C.bpftool_json("prog", "show")
    except (OSError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"cannot list BPF links and programs with bpftool: {e}") from None
    found = []
    for lk in links:
        hook = _link_hook(lk)
        if hook and lk["id"] not in own["link_id"]:
            found.append(Attachment(hook, lk["prog_id"], lk["id"]))
    linked = {lk.get("prog_id") for lk in links}
    for p in progs:
        if p.get("type") in PERF_PROG_TYPES and p["id"] not in linked and p["id"] not in own["prog_id"]:
            found.append(Attachment(f"{p['type']} program without a link (perf-event attached?)", p["id"], None))
    return tuple(found)


# ---- other agents ---------------------------------------------------------------------


def _is_agent(argv: list[str]) -> bool:
    """`connwatch [run] ...` (console script, .deb, container) or `python -m
    connwatch.cli [run] ...`; not `connwatch doctor`, --help or --version
    (the CLI's rule: no subcommand means run)."""
    for i, a in enumerate(argv):
        if os.path.basename(a) == "connwatch" or (a in ("connwatch", "connwatch.cli") and argv[i - 1:i] == ["-m"]):
            rest = argv[i + 1:]
            return not rest or rest[0] == "run" or (rest[0] != "doctor" and not
                                                    {"-h", "--help", "--version"} & set(rest))
    return False


def other_agents(own_pids=()) -> tuple[OtherAgent, ...]:
    mine = {os.getpid(), *own_pids}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv and _is_agent(argv):
            found.append(OtherAgent(int(d.name), " ".join(argv)))
    return tuple(sorted(found, key=lambda a: a.pid))


def survey(own_pids=()) -> Noise:
    """Everything that would be measured with us (at the start: nothing of ours runs yet)."""
    return Noise(other_agents(own_pids), foreign_attachments(own_pids),
                 C.sysctl_get("kernel.bpf_stats_enabled") != "0")


# ---- during a run -------------------------------------------------------------------------

_persistent: set[tuple] = set()  # foreign attachments that outlasted a full wait: not waited for again
worst = Noise()  # the most foreign attachments seen before a phase, for the table


def _key(a: Attachment) -> tuple:
    return (a.prog_id, a.link_id, a.hook)


def wait_quiet(max_wait: float, own_pids=()) -> Noise:
    """Before a phase: wait (up to max_wait s) until nobody else has a program
    on a measured hook; return what is still there (and remember the worst).
    Attachments that already outlasted one full wait (a leaked agent, or
    what --allow-noise let through) are not waited for again."""
    global worst
    deadline = time.monotonic() + max_wait
    while True:
        n = Noise(attachments=foreign_attachments(own_pids))
        keys = {_key(a) for a in n.attachments}
        if not keys or keys <= _persistent or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if n.attachments and not keys <= _persistent:
        C.log(f"still present after {max_wait:.0f} s: {n.describe()}")
        _persistent.update(keys)
    if len(n.attachments) > len(worst.attachments):
        worst = n
    return n


def tolerate(n: Noise) -> None:
    """What --allow-noise let through at the start: not waited for before each phase."""
    _persistent.update(_key(a) for a in n.attachments)


# ---- what is left of ours ------------------------------------------------------------------


def leftovers() -> list[dict]:
    """Links of ours still attached after cleanup, and bench programs still loaded."""
    try:
        links = C.bpftool_json("link", "show")
        progs = C.bpftool_json("prog", "show")
    except (OSError, RuntimeError, ValueError) as e:
        return [{"error": str(e)}]
    bench_progs = {p["id"] for p in progs if p.get("name", "").startswith("bench_")}
    return [lk for lk in links if lk["id"] in C.OWN_LINKS or lk.get("prog_id") in bench_progs]
