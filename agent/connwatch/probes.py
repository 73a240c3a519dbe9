"""Load connwatch's BPF object, probe which programs this kernel accepts, attach.

Each program is one probe. A program the verifier rejects or that cannot
attach is reported (``connwatch_probe_enabled{probe=...} 0`` and a log line)
and skipped; start-up fails only when nothing at all can attach.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import bpf_types
from .config import Config
from .libbpf import BpfObject, LibbpfError

log = logging.getLogger("connwatch.probes")

# BPF program name -> probe name used in metrics and logs
PROBES = {
    "cw_sys_exit": "sys_exit",
    "cw_sock_state": "inet_sock_set_state",
    "cw_sock_state_nested": "inet_sock_set_state_nested",
    "cw_kfree_skb": "kfree_skb",
    "cw_process_exit": "sched_process_exit",
    "cw_sock_send": "sock_send_length",
    "cw_sock_recv": "sock_recv_length",
    "cw_seed_listeners": "seed_listeners",
    "cw_seed_conns": "seed_connections",
    "cw_listener_stats": "listener_stats",
}

# iterator programs: attached as iterator links, run on demand
ITERATORS = {"cw_seed_listeners", "cw_seed_conns", "cw_listener_stats"}
SEED_ITERATORS = ("cw_seed_listeners", "cw_seed_conns")

INSTALLED_OBJECT = "/usr/share/connwatch/bpf/connwatch.bpf.o"


def switched_off(cfg: Config) -> set[str]:
    """Programs the configuration turns off (not loaded, not reported as probes)."""
    return set() if cfg.syscall_tracing else {"cw_sys_exit"}


class ProbeError(RuntimeError):
    """Nothing could be loaded or attached; the message says why and what to do."""


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


def _configure(obj: BpfObject, cfg: Config) -> None:
    for name, mp in obj.maps.items():
        # one owner entry per listening address: sized like the listeners
        cap = getattr(cfg.maps, "listeners" if name == "listen_owners" else name, None)
        if cap:
            mp.set_max_entries(cap)
    ports = (ctypes.c_uint16 * bpf_types.WS_PORTS_MAX)(*cfg.websocket_ports)
    obj.set_rodata("websocket_ports", ports)
    obj.set_rodata("websocket_ports_len", ctypes.c_uint32(len(cfg.websocket_ports)))
    obj.set_rodata("count_at_handshake", ctypes.c_bool(not cfg.syscall_tracing))


def _open(path: str, cfg: Config, only: set[str] | None = None) -> BpfObject:
    obj = BpfObject(path)
    try:
        _configure(obj, cfg)
        off = switched_off(cfg)
        for name, prog in obj.programs.items():
            prog.autoload = name not in off and (only is None or name in only)
    except Exception:
        obj.close()
        raise
    return obj


@dataclass
class Probes:
    obj: BpfObject
    enabled: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def maps(self):
        return self.obj.maps

    def run_iterator(self, name: str) -> bytes | None:
        """Output of an attached iterator program; None if it is not attached."""
        prog = self.obj.programs.get(name)
        return prog.run_iter() if prog is not None and prog.attached else None

    def seed(self) -> tuple[int, int]:
        """Record listeners and accepted connections that predate the agent.

        Runs after the tracepoints are attached, so nothing falls between
        the two; the BPF side inserts with BPF_NOEXIST, so sockets the
        probes already track are left alone. Returns (listeners, sockets).
        """
        if not all(self.run_iterator(name) is not None for name in SEED_ITERATORS):
            log.warning("start-up seeding incomplete: %s not attached",
                        " or ".join(PROBES[n] for n in SEED_ITERATORS))
        maps = self.obj.maps
        return (sum(1 for _ in maps["listeners"].items(ctypes.c_uint64, bpf_types.Listener)),
                sum(maps["socks_live"].lookup_percpu(ctypes.c_uint32(0), ctypes.c_int64)))

    def close(self) -> None:
        self.obj.close()


def _loadable(path: str, cfg: Config) -> tuple[set[str], dict[str, str]]:
    """Which programs this kernel's verifier accepts, each tried on its own."""
    with BpfObject(path) as probe:
        names = list(probe.programs)
    ok, errors = set(), {}
    for name in set(names) - switched_off(cfg):
        obj = _open(path, cfg, only={name})
        try:
            obj.load()
            ok.add(name)
        except LibbpfError as e:
            errors[name] = f"load failed: {e.strerror}"
        finally:
            obj.close()
    return ok, errors


def load_and_attach(cfg: Config) -> Probes:
    path = find_object(cfg.bpf_object)
    errors: dict[str, str] = {}
    obj = _open(path, cfg)
    try:
        bpf_types.check_layout(obj.btf)
    except bpf_types.LayoutMismatch as e:
        obj.close()
        raise ProbeError(f"{path} does not match this agent's struct layout ({e}); "
                         "rebuild the BPF object from the same source tree") from None
    try:
        obj.load()
    except LibbpfError as e:
        obj.close()
        if e.errno == 1:  # EPERM
            raise ProbeError(
                "loading BPF programs was refused (EPERM): run as root or grant "
                "CAP_BPF and CAP_PERFMON (see docs/security.md)"
            ) from None
        log.warning("loading all programs failed (%s); probing them one by one", e.strerror)
        ok, errors = _loadable(path, cfg)
        if not ok:
            raise ProbeError(f"no BPF program of {path} passed the verifier: {errors}") from None
        obj = _open(path, cfg, only=ok)
        obj.load()

    probes = Probes(obj, errors=dict(errors))
    off = switched_off(cfg)
    for name, prog in obj.programs.items():
        probe = PROBES.get(name, name)
        if name in off:
            log.info("probe %s switched off by configuration", probe)
            continue
        if not prog.autoload:
            probes.enabled[probe] = False
            log.warning("probe %s disabled: %s", probe, errors.get(name, "not loaded"))
            continue
        try:
            prog.attach_iter() if name in ITERATORS else prog.attach()
            probes.enabled[probe] = True
        except LibbpfError as e:
            probes.enabled[probe] = False
            probes.errors[name] = f"attach failed: {e.strerror}"
            log.warning("probe %s disabled: attach failed: %s", probe, e.strerror)
    if not any(probes.enabled.values()):
        probes.close()
        raise ProbeError(f"no BPF program could attach: {probes.errors}; "
                         "check `connwatch doctor` and that this kernel has BTF")
    log.info("probes attached: %s", ", ".join(p for p, on in probes.enabled.items() if on))
    return probes
