"""`connwatch run`: listen, attach the probes, drop capabilities, serve, keep a snapshot fresh.

The metrics socket listens before anything slow, so a scrape during start-up
waits in the accept queue instead of being refused; it is answered once the
server's threads start, after the capability drop (so that every thread has
the reduced sets), with ``connwatch_ready 0`` until the first snapshot.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from prometheus_client.registry import CollectorRegistry

from . import caps, probes as probes_mod
from .arming import Arming
from .collector import ConnwatchCollector
from .config import Config
from .libbpf import LibbpfError, enable_run_time_stats
from .snapshot import Snapshot, SnapshotReader
from .sources import default_sources
from .web import MetricsServer
from .webconfig import WebConfig

log = logging.getLogger("connwatch.agent")

BTF_PATH = "/sys/kernel/btf/vmlinux"
# The oldest kernel the core is proven on (docs/kernels.md): BTF-typed
# tracepoints, BPF iterators over tasks, files and TCP sockets, and
# bpf_sk_storage all exist from 5.10; Debian 11 and Amazon Linux 2 ship it.
MIN_KERNEL = (5, 10)


class StartupError(RuntimeError):
    """A user-fixable reason the agent cannot start; exit code 2."""


def preflight(release: str | None = None, btf_path: str = BTF_PATH) -> None:
    """Refuse, in one line naming the kernel, what no probe could run on."""
    release = release or os.uname().release
    if probes_mod.kernel_version(release) < MIN_KERNEL:
        raise StartupError(f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, the oldest "
                           "connwatch supports (BTF-typed tracepoints and BPF iterators are missing)")
    if not os.path.exists(btf_path):
        raise StartupError(f"kernel {release} has no BTF ({btf_path} missing): connwatch needs a kernel "
                           "built with CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL and Fedora kernels have it)")


class Agent:
    def __init__(self, cfg: Config, listen_address: str, telemetry_path: str,
                 web_config: WebConfig | None = None):
        self.cfg = cfg
        self._snapshot = Snapshot()
        self._stop = threading.Event()
        self.probes: probes_mod.Probes | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.sources = default_sources(cfg)
        self.collector = ConnwatchCollector(lambda: self._snapshot, cfg, self.sources)
        self.registry.register(self.collector)
        self.server = MetricsServer(listen_address, telemetry_path, self.registry, web_config)
        self._threads: list[threading.Thread] = []
        self._stats_fd: int | None = None
        self._arming: Arming | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def _serve(self) -> None:
        self.server.start()
        host, port = self.server.address
        log.info("serving metrics on %s:%s", host, port)

    def _refresh_loop(self, reader: SnapshotReader) -> None:
        while not self._stop.is_set():
            try:
                self._snapshot = reader.read()
                if self._arming is not None:
                    self._arming.update(self._snapshot)
            except Exception:  # keep serving the previous snapshot
                log.exception("snapshot read failed")
            self._stop.wait(self.cfg.refresh_interval_seconds)

    def _enable_bpf_stats(self) -> None:
        try:
            self._stats_fd = enable_run_time_stats()  # held open for the agent's lifetime
            log.info("BPF run-time statistics enabled")
        except LibbpfError as e:
            log.warning("bpf_stats: cannot enable BPF run-time statistics (%s); set sysctl "
                        "kernel.bpf_stats_enabled=1 or grant CAP_SYS_ADMIN", e.strerror)

    def start(self) -> None:
        self.probes = probes_mod.load_and_attach(self.cfg)
        if self.cfg.bpf_stats:
            self._enable_bpf_stats()
        listeners, sockets = self.probes.seed()
        log.info("seeded %d listeners and %d connections that predate the agent", listeners, sockets)
        keep = caps.AFTER_ATTACH
        if self.probes.bpf_calls_need_capability():
            # on older kernels (measured: 5.10, not 6.1) kernel.unprivileged_bpf_disabled
            # guards every bpf() call (map reads, running iterators), not only loading
            keep = keep | {"CAP_BPF"}
        log.info("capabilities after attach: %s", ", ".join(sorted(caps.drop_all_but(keep)["effective"])) or "none")
        self._serve()
        if self.probes.syscall_hook is not None and self.cfg.syscall_tracing == "on_demand":
            self._arming = Arming(self.probes, self.cfg.arm_ratio)
            self._arming.start()
        reader = SnapshotReader(self.probes, self.cfg, self.sources)
        self._snapshot = reader.read()
        t = threading.Thread(target=self._refresh_loop, args=(reader,), name="refresh", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("ready")

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        if self._arming is not None:
            self._arming.stop()
            self._arming = None
        if self.probes is not None:
            self.probes.close()  # detaches every program
            self.probes = None
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None

    def run_forever(self) -> None:
        # Wait for SIGTERM/SIGINT with sigwait, not a handler: a handler that
        # sets an Event can interrupt the main thread inside that Event's own
        # lock and deadlock, leaving an agent that ignores every SIGTERM.
        # Blocked before any thread starts, so every thread inherits the mask.
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            self.start()
            signal.sigwait(stop_signals)
        finally:
            t0 = time.monotonic()
            self.stop()
            log.info("stopped (%.2fs to detach)", time.monotonic() - t0)
