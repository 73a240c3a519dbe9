"""Load connwatch's BPF object with one attach strategy per logical probe.

Each logical probe (accept, fd_failures, ...) lists the ways it can attach,
best first: fentry/fexit on the kernel function where the event happens,
kprobe/kretprobe on the same function, then a tracepoint fallback. At
start-up each probe gets the first strategy this kernel can do, judged from
the running kernel's BTF and from two tiny feature-probe programs, and the
object is loaded with only the chosen programs. A program the verifier still
refuses moves its probe to the next strategy. A probe with none left is
reported off (``connwatch_probe_enabled{probe} 0`` and one log line naming
what the kernel lacks); start-up fails only when connections cannot be
counted at all.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import bpf_types, libbpf
from .config import Config
from .libbpf import Btf, BpfObject, GlobalVars, LibbpfError, LoadError

log = logging.getLogger("connwatch.probes")

INSTALLED_OBJECT = "/usr/share/connwatch/bpf/connwatch.bpf.o"
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1
# Maps whose elements are deleted while other code holds pointers to their
# values: peers (pruned by the agent while BPF programs add to them) and
# listeners (their stats written by a bpf_for_each_map_elem walk while
# closes delete). On 5.10 a deleted element of a map without preallocation is
# freed after an RCU grace period, so such a pointer never starts meaning
# another key. Since 6.1 ("bpf: Convert hash map to bpf_mem_alloc") it goes
# back to a per-CPU cache that the next insert on that CPU may take at once,
# as a preallocated one always could: what that race costs is in
# docs/architecture.md. Not preallocating still saves the memory of entries
# never used.
NOT_PREALLOCATED = ("peers", "listeners")


class ProbeError(RuntimeError):
    """Nothing could be loaded or attached; the message says why and what to do."""


# ---- what the running kernel offers ---------------------------------------------


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a uname release such as '6.1.0-27-cloud-amd64'
    (the running kernel's by default); (0, 0) if it has no such prefix."""
    parts = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(parts[1]), int(parts[2])) if parts else (0, 0)


class Kernel:
    """The running kernel's BTF, symbols and BPF features, looked up lazily."""

    def __init__(self, btf: Btf, object_path: str):
        self.btf = btf
        self._object_path = object_path

    @cached_property
    def kallsyms(self) -> frozenset[str]:
        try:
            with open("/proc/kallsyms") as f:
                return frozenset(line.split()[2] for line in f if line.split()[1] in "tT")
        except OSError:
            return frozenset()

    @cached_property
    def kprobes(self) -> bool:
        """Kernels built without CONFIG_KPROBES have neither the PMU nor kprobe_events."""
        return os.path.isdir(KPROBE_PMU) or os.path.exists("/sys/kernel/tracing/kprobe_events") \
            or os.path.exists("/sys/kernel/debug/tracing/kprobe_events")

    @cached_property
    def fentry(self) -> str | None:
        """None if fentry/fexit programs load and attach here, else why not."""
        return _feature_probe(self._object_path, "cw_probe_fentry", attach=True)

    def helper(self, name: str) -> bool:
        return f"BPF_FUNC_{name}" in (self.btf.enum("bpf_func_id") or {})

    def enum_value(self, enum: str, value: str) -> bool:
        return value in (self.btf.enum(enum) or {})


def _feature_probe(path: str, program: str, attach: bool) -> str | None:
    """Load one program of the object alone (maps shrunk to one entry): None
    if the kernel takes it, else the reason it gave."""
    with libbpf.quiet(), BpfObject(path) as obj:
        for name, prog in obj.programs.items():
            prog.autoload = name == program
        for mp in obj.maps.values():
            if not mp.is_internal and mp.type != BPF_MAP_TYPE_RINGBUF:
                mp.set_max_entries(1)
        try:
            obj.load()
            if attach:
                obj.programs[program].attach()
        except LibbpfError as e:
            return getattr(e, "reason", None) or e.strerror
    return None


# ---- strategies -----------------------------------------------------------------

# A requirement is checked against the kernel before anything is loaded: it
# returns None when met, or what the kernel lacks.
Requirement = Callable[[Kernel], "str | None"]


def _function(name: str) -> Requirement:
    def check(k: Kernel) -> str | None:
        return None if k.btf.function_arity(name) is not None else f"no kernel function {name} in BTF"
    return check


def _fentry(k: Kernel) -> str | None:
    return f"fentry/fexit unavailable ({k.fentry})" if k.fentry else None


def _ksym(name: str) -> Requirement:
    def check(k: Kernel) -> str | None:
        if not k.kprobes:
            return "kprobes unavailable (kernel built without CONFIG_KPROBES)"
        return None if name in k.kallsyms else f"no kernel symbol {name}"
    return check


def _tracepoint(name: str, min_args: int = 0) -> Requirement:
    def check(k: Kernel) -> str | None:
        nargs = k.btf.tracepoint_arity(name)
        if nargs is None:
            return f"no tracepoint {name}"
        return None if nargs >= min_args else f"tracepoint {name} has {nargs} arguments, {min_args} needed"
    return check


def _enum_value(enum: str, value: str) -> Requirement:
    def check(k: Kernel) -> str | None:
        return None if k.enum_value(enum, value) else f"no {value} in enum {enum}"
    return check


def _helper(name: str) -> Requirement:
    def check(k: Kernel) -> str | None:
        return None if k.helper(name) else f"no BPF helper {name}"
    return check


def _iter_target(name: str) -> Requirement:
    def check(k: Kernel) -> str | None:
        return None if k.btf.function_arity(f"bpf_iter_{name}") is not None else f"no BPF iterator {name}"
    return check


@dataclass(frozen=True)
class Strategy:
    via: str                     # fentry, kprobe, tracepoint, syscall_hook or iterator
    attach: str                  # where, for people: "fexit/inet_csk_accept"
    programs: tuple[str, ...]    # the BPF programs it loads (cw_sys_exit is shared)
    requires: tuple[Requirement, ...] = ()
    fexit_functions: tuple[str, ...] = ()  # their arity goes into nargs_<function>
    # program -> the map it walks, for map-element iterators
    iter_maps: tuple[tuple[str, str], ...] = ()

    def unmet(self, kernel: Kernel) -> str | None:
        for check in self.requires:
            reason = check(kernel)
            if reason:
                return reason
        return None


def fexit(program: str, *functions: str, section: str = "fexit") -> Strategy:
    """An fexit (or fentry) program on a kernel function; fexit reads the
    return value from a slot that depends on the function's arity."""
    return Strategy("fentry", ", ".join(f"{section}/{f}" for f in functions), (program,),
                    (_fentry, *map(_function, functions)),
                    fexit_functions=functions if section == "fexit" else ())


def kprobes(programs: tuple[str, ...], *functions: str, attach: str) -> Strategy:
    return Strategy("kprobe", attach, programs, tuple(map(_ksym, functions)))


SYSCALL_HOOK_PROGRAM = "cw_sys_exit"
SYSCALL_HOOK = Strategy("syscall_hook", "tp_btf/sys_exit", (SYSCALL_HOOK_PROGRAM,), (_tracepoint("sys_exit", 2),))


@dataclass(frozen=True)
class Probe:
    name: str
    strategies: tuple[Strategy, ...]
    metrics: tuple[str, ...]     # what it feeds (docs/kernels.md)
    required: bool = False       # nothing is counted without it


def _merge(*strategies: Strategy) -> Strategy:
    """Several programs of one kind as one strategy (a probe with several hook points)."""
    return Strategy(strategies[0].via, ", ".join(s.attach for s in strategies),
                    tuple(p for s in strategies for p in s.programs),
                    tuple(r for s in strategies for r in s.requires),
                    tuple(f for s in strategies for f in s.fexit_functions))


PROBES: tuple[Probe, ...] = (
    Probe("connection_state", (
        Strategy("tracepoint", "tp_btf/inet_sock_set_state", ("cw_sock_state", "cw_sock_state_nested"),
                 (_tracepoint("inet_sock_set_state", 3),)),
    ), ("connwatch_connections_closed_total", "connwatch_connections_close_wait",
        "connwatch_connection_duration_seconds", "connwatch_listen_backlog"), required=True),
    Probe("accept", (
        fexit("cw_accept_fexit", "inet_csk_accept"),
        kprobes(("cw_accept_kretprobe",), "inet_csk_accept", attach="kretprobe/inet_csk_accept"),
        # no program of its own: cw_sock_state counts handshakes (count_at_handshake)
        Strategy("tracepoint", "tp_btf/inet_sock_set_state (handshake)", (),
                 (_tracepoint("inet_sock_set_state", 3),)),
    ), ("connwatch_connections", "connwatch_connections_accepted_total", "connwatch_peer_connections")),
    Probe("classification", (
        _merge(fexit("cw_sendmsg_fentry", "tcp_sendmsg", section="fentry"),
               fexit("cw_recvmsg_fexit", "tcp_recvmsg")),
        kprobes(("cw_sendmsg_kprobe", "cw_recvmsg_kprobe", "cw_recvmsg_kretprobe"), "tcp_sendmsg", "tcp_recvmsg",
                attach="kprobe/tcp_sendmsg, kretprobe/tcp_recvmsg"),
        Strategy("tracepoint", "tp_btf/sock_send_length, tp_btf/sock_recv_length", ("cw_sock_send", "cw_sock_recv"),
                 (_tracepoint("sock_send_length", 3), _tracepoint("sock_recv_length", 3))),
    ), ('connwatch_connections{kind="websocket"}', 'connwatch_connections{kind="tls"}',
        "connwatch_websocket_upgrades_total")),
    Probe("listen_backlog", (
        fexit("cw_listen_fexit", "__sys_listen"),
        kprobes(("cw_listen_kprobe", "cw_listen_kretprobe"), "__sys_listen", attach="kretprobe/__sys_listen"),
        SYSCALL_HOOK,
    ), ("connwatch_listen_backlog_requested",)),
    Probe("fd_failures", (
        _merge(fexit("cw_alloc_fd_fexit", "alloc_fd"), fexit("cw_alloc_file_fexit", "alloc_empty_file")),
        kprobes(("cw_alloc_fd_kretprobe", "cw_alloc_file_kretprobe"), "alloc_fd", "alloc_empty_file",
                attach="kretprobe/alloc_fd, kretprobe/alloc_empty_file"),
        SYSCALL_HOOK,
    ), ("connwatch_fd_alloc_failures_total",)),
    Probe("port_exhaustion", (
        _merge(fexit("cw_hash_connect_fexit", "inet_hash_connect"),
               fexit("cw_hash_connect6_fexit", "inet6_hash_connect"),
               fexit("cw_get_port_fexit", "inet_csk_get_port")),
        kprobes(("cw_hash_connect_kretprobe", "cw_hash_connect6_kretprobe", "cw_get_port_kprobe",
                 "cw_get_port_kretprobe"), "inet_hash_connect", "inet6_hash_connect", "inet_csk_get_port",
                attach="kretprobe/inet_hash_connect, kretprobe/inet6_hash_connect, kretprobe/inet_csk_get_port"),
        SYSCALL_HOOK,
    ), ("connwatch_port_exhaustion_failures_total",)),
    Probe("overflow_drops", (
        _merge(fexit("cw_syn_recv_fexit", "tcp_v4_syn_recv_sock"),
               fexit("cw_syn_recv6_fexit", "tcp_v6_syn_recv_sock")),
        kprobes(("cw_syn_recv_kprobe", "cw_syn_recv_kretprobe", "cw_syn_recv6_kprobe", "cw_syn_recv6_kretprobe"),
                "tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock",
                attach="kretprobe/tcp_v4_syn_recv_sock, kretprobe/tcp_v6_syn_recv_sock"),
        Strategy("tracepoint", "tp_btf/kfree_skb", ("cw_kfree_skb",),
                 (_tracepoint("kfree_skb", 3),
                  _enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"))),
    ), ("connwatch_listen_overflow_drops_total",)),
    Probe("process_exit", (
        Strategy("tracepoint", "tp_btf/sched_process_exit", ("cw_process_exit",),
                 (_tracepoint("sched_process_exit", 1),)),
    ), ()),
    Probe("seeding", (
        Strategy("iterator", "iter/task_file", ("cw_seed_listeners", "cw_seed_conns"), (_iter_target("task_file"),)),
    ), ()),
    Probe("listener_stats", (
        Strategy("iterator", "iter/bpf_map + bpf_for_each_map_elem", ("cw_listener_stats",),
                 (_iter_target("bpf_map"), _helper("for_each_map_elem"))),
        Strategy("iterator", "iter/bpf_map_elem", ("cw_queued_settle_elem", "cw_listener_stats_elem"),
                 (_iter_target("bpf_map_elem"),),
                 iter_maps=(("cw_queued_settle_elem", "queued"), ("cw_listener_stats_elem", "listeners"))),
    ), ("connwatch_listen_queue_length", "connwatch_listen_backlog", "connwatch_listen_drops_total",
        "connwatch_listen_somaxconn")),
    Probe("port_use", (
        Strategy("iterator", "iter/tcp", ("cw_port_use",), (_iter_target("tcp"),)),
    ), ("connwatch_system_ephemeral_ports_in_use", "connwatch_ephemeral_ports_in_use")),
)

PROBE_NAMES = tuple(p.name for p in PROBES)
SYSCALL_HOOK_PROBES = tuple(p.name for p in PROBES if SYSCALL_HOOK in p.strategies)


# ---- the plan: one strategy per probe ---------------------------------------------


@dataclass
class Plan:
    """Which strategy each probe uses (index into its list), or why none."""

    kernel: Kernel
    cfg: Config
    chosen: dict[str, int] = field(default_factory=dict)
    off: dict[str, str] = field(default_factory=dict)        # probe -> what the kernel lacks
    tried: dict[str, list[str]] = field(default_factory=dict)  # probe -> reasons earlier strategies failed

    def choose(self, probe: Probe, start: int = 0) -> None:
        for i in range(start, len(probe.strategies)):
            s = probe.strategies[i]
            reason = s.unmet(self.kernel) or self._excluded(s)
            if reason is None:
                self.chosen[probe.name] = i
                return
            self.tried.setdefault(probe.name, []).append(f"{s.attach}: {reason}")
        self.chosen.pop(probe.name, None)
        self.off[probe.name] = "; ".join(self.tried.get(probe.name, [])) or "no strategy"

    def _excluded(self, s: Strategy) -> str | None:
        if s.via not in self.cfg.attach_kinds:
            return f"{s.via} not in attach_kinds"
        return None

    def strategy(self, probe: str) -> Strategy | None:
        i = self.chosen.get(probe)
        return None if i is None else _PROBE[probe].strategies[i]

    def programs(self) -> set[str]:
        return {p for name in self.chosen for p in self.strategy(name).programs}

    def owner_of(self, program: str) -> str | None:
        return next((name for name in self.chosen if program in self.strategy(name).programs), None)

    def demote(self, probe: str, reason: str) -> None:
        s = self.strategy(probe)
        self.tried.setdefault(probe, []).append(f"{s.attach}: {reason}")
        self.choose(_PROBE[probe], self.chosen[probe] + 1)

    def uses(self, via: str) -> bool:
        return any(self.strategy(name).via == via for name in self.chosen)

    def syscall_hook_probes(self) -> list[str]:
        return [name for name in self.chosen if self.strategy(name) is SYSCALL_HOOK]


_PROBE = {p.name: p for p in PROBES}


def find_object(configured: str = "") -> str:
    candidates = [configured] if configured else [
        os.environ.get("CONNWATCH_BPF_OBJECT", ""),
        str(Path(__file__).parent / "bpf" / "connwatch.bpf.o"),
        INSTALLED_OBJECT,
    ]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    raise ProbeError(
        f"BPF object not found (looked in {', '.join(c for c in candidates if c)}); "
        "build it with `make bpf` or install the connwatch package"
    )


def _open(path: str, cfg: Config, plan: Plan) -> BpfObject:
    """The object configured for the plan: sizes, settings, which programs load."""
    obj = BpfObject(path)
    try:
        for name, mp in obj.maps.items():
            cap = cfg.maps.capacity(name)
            if cap:
                mp.set_max_entries(cap)
        if not plan.uses("kprobe"):  # before 6.1, kprobe programs need preallocated hash maps
            for name in NOT_PREALLOCATED:
                obj.maps[name].set_flags(obj.maps[name].flags | BPF_F_NO_PREALLOC)
        wanted = plan.programs()
        for name, prog in obj.programs.items():
            prog.autoload = name in wanted
        ports = (ctypes.c_uint16 * bpf_types.WS_PORTS_MAX)(*cfg.websocket_ports)
        obj.set_rodata("websocket_ports", ports)
        obj.set_rodata("websocket_ports_len", ctypes.c_uint32(len(cfg.websocket_ports)))
        accept = plan.strategy("accept")
        obj.set_rodata("count_at_handshake", ctypes.c_bool(accept is not None and accept.via == "tracepoint"))
        hooked = plan.syscall_hook_probes()
        obj.set_rodata("syscall_hook_counts_fd_failures", ctypes.c_bool("fd_failures" in hooked))
        obj.set_rodata("syscall_hook_counts_port_exhaustion", ctypes.c_bool("port_exhaustion" in hooked))
        obj.set_rodata("syscall_hook_sees_listen", ctypes.c_bool("listen_backlog" in hooked))
        obj.set_rodata("arm_trigger", ctypes.c_bool(bool(hooked) and cfg.syscall_tracing == "on_demand"))
        obj.set_rodata("arm_ratio_permille", ctypes.c_uint32(round(cfg.arm_ratio * 1000)))
        for name in plan.chosen:
            for fn in plan.strategy(name).fexit_functions:
                obj.set_rodata(f"nargs_{fn}", ctypes.c_uint32(plan.kernel.btf.function_arity(fn)))
    except Exception:
        obj.close()
        raise
    return obj


def _make_plan(kernel: Kernel, cfg: Config) -> Plan:
    plan = Plan(kernel, cfg)
    for probe in PROBES:
        plan.choose(probe)
    if cfg.syscall_tracing == "never":
        for name in plan.syscall_hook_probes():
            plan.chosen.pop(name)  # switched off by configuration: not "off", which alerts
    return plan


def _memlock_hint() -> str:
    """Before 5.11 BPF maps are charged to RLIMIT_MEMLOCK, not the memory
    cgroup: without CAP_SYS_RESOURCE, libbpf cannot lift the 8 MiB default
    and creating the maps fails with the same EPERM (measured on 5.10)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if kernel_version() >= (5, 11) or soft == resource.RLIM_INFINITY:
        return ""
    return (f", and on kernel {os.uname().release} (before 5.11) an unlimited RLIMIT_MEMLOCK "
            "(systemd LimitMEMLOCK=infinity, or CAP_SYS_RESOURCE)")


def _load(path: str, cfg: Config, plan: Plan) -> BpfObject:
    """Load the plan's programs, demoting probes whose program the verifier refuses."""
    while True:
        if not plan.chosen:
            raise ProbeError("no BPF program can run on this kernel: " + "; ".join(
                f"{p}: {r}" for p, r in plan.off.items()))
        obj = _open(path, cfg, plan)
        try:
            obj.load()
            return obj
        except LoadError as e:
            obj.close()
            if e.errno == errno.EPERM and e.program is None:
                raise ProbeError("loading BPF programs was refused (EPERM): run as root or grant "
                                 "CAP_BPF and CAP_PERFMON" + _memlock_hint() + " (see docs/security.md)") from None
            probe = plan.owner_of(e.program) if e.program else None
            if probe is None:
                raise ProbeError(f"loading {path} failed: {e.reason}") from None
            log.warning("program %s refused: %s", e.program, e.reason)
            plan.demote(probe, f"{e.program} refused: {e.reason}")


# ---- the loaded probes ------------------------------------------------------------


class SyscallHook:
    """The syscall hook where it is a probe's strategy: attached for good
    (``syscall_tracing: always``) or only while something nears a limit
    (``on_demand``: see :meth:`Probes.arm`)."""

    def __init__(self, obj: BpfObject, probes: list[str], bss: GlobalVars):
        self.program = obj.programs[SYSCALL_HOOK_PROGRAM]
        self.probes = probes
        self._globals = bss

    @property
    def armed(self) -> bool:
        return self.program.attached

    def arm(self, why: str) -> None:
        if self.armed:
            return
        self.program.attach()
        self._globals.set("syscall_hook_armed", ctypes.c_uint32, 1)
        log.info("syscall hook armed (%s): counting %s", why, ", ".join(self.probes))

    def disarm(self, why: str) -> None:
        if not self.armed:
            return
        self._globals.set("syscall_hook_armed", ctypes.c_uint32, 0)
        self.program.detach()
        log.info("syscall hook disarmed (%s)", why)


@dataclass
class Probes:
    obj: BpfObject
    plan: Plan
    globals: GlobalVars  # the object's .bss, shared with the kernel
    enabled: dict[str, bool] = field(default_factory=dict)
    syscall_hook: SyscallHook | None = None

    @property
    def maps(self):
        return self.obj.maps

    def via(self, probe: str) -> Strategy | None:
        return self.plan.strategy(probe) if self.enabled.get(probe) else None

    def run_iterator(self, probe: str) -> bytes | None:
        """Output of a probe's iterator programs, run in their order; None if
        the probe is off."""
        s = self.via(probe)
        return b"".join(self.obj.programs[p].run_iter() for p in s.programs) if s else None

    def seed(self) -> tuple[int, int]:
        """Record listeners and accepted connections that predate the agent.

        Runs after everything is attached, so nothing falls between the two;
        the BPF side inserts with BPF_NOEXIST, so sockets the probes already
        track are left alone. Returns (listeners, connections).
        """
        s = self.via("seeding")
        if s is None:
            log.warning("start-up seeding impossible (%s): listeners and connections that predate the "
                        "agent are not counted", self.plan.off.get("seeding", "switched off"))
        else:
            for program in s.programs:
                self.obj.programs[program].run_iter()
        maps = self.obj.maps
        return (sum(1 for _ in maps["listeners"].items(ctypes.c_uint64, bpf_types.Listener)),
                sum(maps["socks_live"].lookup_percpu(ctypes.c_uint32(0), ctypes.c_int64)))

    def bpf_calls_need_capability(self) -> bool:
        """Whether reading maps and running iterators needs CAP_BPF after the
        capability drop. Measured, not looked up by version: a thread (whose
        capabilities are its own) drops them all and reads a map."""
        from . import caps

        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                caps.drop_thread_capabilities()
                next(self.obj.maps["procs"].items(ctypes.c_uint32, bpf_types.Proc), None)
                outcome.append(None)
            except BaseException as e:  # reported to the caller
                outcome.append(e)

        t = threading.Thread(target=attempt, name="bpf-capability-check")
        t.start()
        t.join()
        (error,) = outcome
        if isinstance(error, LibbpfError) and error.errno == errno.EPERM:
            return True
        if error is not None:
            raise error
        return False

    def close(self) -> None:
        self.globals.close()
        self.obj.close()


def _attach(obj: BpfObject, plan: Plan) -> str | None:
    """Attach every chosen program but the syscall hook (armed later, or
    not at all); the first program that will not attach, or None. In name
    order: a tracepoint calls its programs in the order they were attached,
    and cw_sock_state_nested is cheapest called after cw_sock_state
    (connwatch.bpf.c)."""
    for name in sorted(plan.programs() - {SYSCALL_HOOK_PROGRAM}):
        prog, s = obj.programs[name], plan.strategy(plan.owner_of(name))
        try:
            if s.via != "iterator":
                prog.attach()
            else:
                walks = dict(s.iter_maps).get(name)
                prog.attach_iter(obj.maps[walks].fd if walks else None)
        except LibbpfError as e:
            return f"{name}: attach failed: {e.strerror}"
    return None


def load_and_attach(cfg: Config) -> Probes:
    path = find_object(cfg.bpf_object)
    with BpfObject(path) as unloaded:
        try:
            bpf_types.check_layout(unloaded.btf)
        except bpf_types.LayoutMismatch as e:
            raise ProbeError(f"{path} does not match this agent's struct layout ({e}); "
                             "rebuild the BPF object from the same source tree") from None
    kernel = Kernel(Btf.kernel(), path)
    plan = _make_plan(kernel, cfg)
    while True:
        obj = _load(path, cfg, plan)
        failure = _attach(obj, plan)
        if failure is None:
            break
        obj.close()
        program = failure.split(":", 1)[0]
        log.warning("program %s", failure)
        plan.demote(plan.owner_of(program), failure)
    kernel.btf.close()  # every arity is in place
    probes = Probes(obj, plan, obj.globals())
    for probe in PROBES:
        s = plan.strategy(probe.name)
        if s is not None:
            probes.enabled[probe.name] = True
            log.info("probe %s via %s (%s)", probe.name, s.via, s.attach)
        elif probe.name in plan.off:
            probes.enabled[probe.name] = False
            log.warning("probe %s off: %s", probe.name, plan.off[probe.name])
        else:
            log.info("probe %s switched off by configuration (syscall_tracing: never)", probe.name)
    if not any(probes.enabled.get(p.name) for p in PROBES if p.required):
        probes.close()
        raise ProbeError("connections cannot be counted on this kernel: " + "; ".join(
            f"{p.name}: {plan.off.get(p.name)}" for p in PROBES if p.required))
    hooked = plan.syscall_hook_probes()
    if hooked:
        probes.syscall_hook = SyscallHook(obj, hooked, probes.globals)
        if cfg.syscall_tracing == "always":
            probes.syscall_hook.arm("syscall_tracing: always")
    return probes
