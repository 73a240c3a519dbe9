"""Per-process fd headroom: open fds beside the soft RLIMIT_NOFILE, for the
processes nearest their limit on the whole host and for every process that
owns a tracked socket (/proc, one walk per refresh: fds.FdCensus)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import fds, identity, metrics, procinfo
from ..reread import RereadCache
from .base import Process, ReadContext, Scrape, Source, summed

# every process past this share of its limit is reported, whatever the top-N
ALWAYS_REPORTED_RATIO = 0.5
# at most this many refreshes between two reads of a reported socket-less
# process's comm and cgroup
REIDENTIFY_ROUNDS = 30


@dataclass(frozen=True, slots=True)
class ProcessFds:
    process: Process
    open: int
    limit: int


@dataclass(frozen=True)
class Headroom:
    processes: tuple[ProcessFds, ...]  # highest usage ratio first
    busiest: fds.FdUse | None          # of the whole host: what the syscall-hook arming looks at

    def usage(self) -> Mapping[int, float]:
        """pid -> open / limit."""
        return {p.process.pid: p.open / p.limit for p in self.processes if p.limit}


def _identify(pid: int) -> Process | None:
    comm = procinfo.comm(pid)
    ident = identity.identity(pid)
    if comm is None or ident is None:
        return None  # exited meanwhile
    return Process(pid, comm, ident.container, ident.pod_uid)


class HeadroomSource(Source):
    name = "headroom"
    needs_identities = True  # socket owners are always reported

    def __init__(self, cfg):
        super().__init__(cfg)
        self._census = fds.FdCensus()
        # who a reported socket-less process is: it can rename itself or be
        # moved to another cgroup, mostly as it starts
        self._identities: RereadCache[Process] = RereadCache(REIDENTIFY_ROUNDS)

    def read(self, ctx: ReadContext) -> Headroom:
        census = sorted(self._census.read(), key=lambda u: (-u.ratio, u.pid))
        owners = {p.pid: p for p in ctx.processes.values()}
        chosen = {u.pid for u in census[: self.cfg.fd_headroom_processes]}
        chosen |= {u.pid for u in census if u.ratio > ALWAYS_REPORTED_RATIO}
        self._identities.start_round()
        rows = []
        for use in census:
            if use.pid not in chosen and use.pid not in owners:
                continue
            process = owners.get(use.pid) or self._identities.get(
                (use.pid, use.incarnation), lambda pid=use.pid: _identify(pid))
            if process is not None:  # None: exited meanwhile
                rows.append(ProcessFds(process, use.open, use.limit))
        return Headroom(tuple(rows), census[0] if census else None)

    def families(self, piece: Headroom, scrape: Scrape) -> Iterator:
        # several processes can share labels (the `other` fold): their fds and
        # limits add up, so the folded ratio is an average that hides the worst
        yield summed(metrics.PROCESS_OPEN_FDS.family(), ((scrape.series.of(p.process), p.open) for p in piece.processes))
        yield summed(metrics.PROCESS_MAX_FDS.family(), ((scrape.series.of(p.process), p.limit) for p in piece.processes))
