"""The syscall hook, armed on demand.

On kernels where EMFILE/ENFILE, port exhaustion and listen()'s backlog can
only be seen at every syscall's exit (no fentry, no kprobes), hooking that
exit slows every syscall on the host. With ``syscall_tracing: on_demand``
the hook is attached only while something is close to a limit: a process
at ``arm_ratio`` of its RLIMIT_NOFILE, the host at that share of
fs.file-max, or a destination at that share of the ephemeral port range.

Two ways to notice: each refresh compares every process's fd count with its
limit (:meth:`Arming.update`, from the headroom source's walk of the host), and between refreshes the BPF side wakes us
through a ring buffer when a process touching a socket has passed the ratio
(bpf/arming.bpf.h), so a burst cannot outrun the refresh interval. The hook
is detached once everything has stayed below ``DISARM_FRACTION`` of the
ratio for ``DISARM_AFTER_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
import time

from . import bpf_types, procinfo
from .libbpf import RingBuffer
from .probes import Probes
from .snapshot import Snapshot
from .sources.headroom import Headroom
from .sources.system import System

log = logging.getLogger("connwatch.arming")

# hysteresis: below this share of arm_ratio, for this long, before detaching
DISARM_FRACTION = 0.8
DISARM_AFTER_SECONDS = 30.0
POLL_MS = 500


class Arming:
    def __init__(self, probes: Probes, arm_ratio: float):
        self._hook = probes.syscall_hook
        self._ratio = arm_ratio
        self._lock = threading.Lock()
        self._calm_since: float | None = None
        self._stop = threading.Event()
        self._events = RingBuffer(probes.maps["arm_events"], self._on_wakeup)
        self._thread = threading.Thread(target=self._poll, name="arming", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._events.close()

    # ---- the in-kernel early trigger ------------------------------------------

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._events.poll(POLL_MS)

    def _on_wakeup(self, record: bytes) -> None:
        e = bpf_types.ArmEvent.from_buffer_copy(record)
        comm = procinfo.comm(e.tgid) or "?"
        self._arm(f"pid {e.tgid} ({comm}) reached fd {e.used} of its limit {e.limit}")

    # ---- each refresh ----------------------------------------------------------

    def update(self, snapshot: Snapshot) -> None:
        """Arm when something has reached arm_ratio of its limit; disarm once
        everything has stayed well below it for a while."""
        worst, why = self._highest_fill(snapshot.piece("headroom"), snapshot.piece("system"))
        if worst >= self._ratio:
            self._arm(why)
            return
        with self._lock:  # the ring-buffer thread may arm meanwhile
            if worst >= self._ratio * DISARM_FRACTION:
                self._calm_since = None
                return
            now = time.monotonic()
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= DISARM_AFTER_SECONDS:
                self._hook.disarm(f"everything below {self._ratio * DISARM_FRACTION:.0%} of its limit "
                                  f"for {DISARM_AFTER_SECONDS:.0f} s")

    @staticmethod
    def _highest_fill(headroom: Headroom | None, system_piece: System | None) -> tuple[float, str]:
        """The largest usage/limit share among the limits the hook guards, and what it is."""
        worst, why = 0.0, ""
        busiest = headroom.busiest if headroom else None
        if busiest is not None and busiest.ratio > worst:
            worst, why = busiest.ratio, f"pid {busiest.pid} has {busiest.open} of {busiest.limit} fds open"
        system = system_piece.limits if system_piece else None
        if system is not None:
            if system.open_files is not None and system.open_files_limit:
                share = system.open_files / system.open_files_limit
                if share > worst:
                    worst, why = share, f"{system.open_files} of fs.file-max {system.open_files_limit} in use"
            if system.port_destinations and system.ephemeral_ports:
                dest, used = system.port_destinations[0]  # the busiest
                share = used / system.ephemeral_ports
                if share > worst:
                    worst, why = share, f"{used} of {system.ephemeral_ports} ephemeral ports towards {dest}"
        return worst, why

    def _arm(self, why: str) -> None:
        with self._lock:
            self._calm_since = None  # the hysteresis starts over
            self._hook.arm(why)
