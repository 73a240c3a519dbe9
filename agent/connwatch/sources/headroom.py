"""Per-process fd headroom: open fds beside the soft RLIMIT_NOFILE, for the
processes nearest their limit on the whole host and for every process that
owns a tracked socket (/proc, one walk per refresh: fds.FdCensus)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import fds, identity, metrics, procinfo
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
        # (pid, incarnation) -> (Process, refresh it was read in, refreshes
        # until it is read again): a process can rename itself or be moved to
        # another cgroup, mostly as it starts, so a new one is read again at
        # the next refresh, then after 2, 4, 8 ... up to REIDENTIFY_ROUNDS
        self._known: dict[tuple[int, int], tuple[Process, int, int]] = {}
        self._round = 0

    def read(self, ctx: ReadContext) -> Headroom:
        census = sorted(self._census.read(), key=lambda u: (-u.ratio, u.pid))
        owners = {p.pid: p for p in ctx.processes.values()}
        chosen = {u.pid for u in census[: self.cfg.fd_headroom_processes]}
        chosen |= {u.pid for u in census if u.ratio > ALWAYS_REPORTED_RATIO}
        self._round += 1
        rows = []
        known = {}
        for use in census:
            if use.pid not in chosen and use.pid not in owners:
                continue
            process = owners.get(use.pid)
            if process is None:
                key = (use.pid, use.incarnation)
                process, read_in, after = self._known.get(key, (None, 0, 0))
                if process is None or self._round - read_in >= after:
                    after = min(2 * after, REIDENTIFY_ROUNDS) if process else 1
                    process, read_in = _identify(use.pid), self._round
                    if process is None:
                        continue  # exited meanwhile
                known[key] = (process, read_in, after)
            rows.append(ProcessFds(process, use.open, use.limit))
        self._known = known  # forget the processes no longer reported
        return Headroom(tuple(rows), census[0] if census else None)

    def families(self, piece: Headroom, scrape: Scrape) -> Iterator:
        # several processes can share labels (the `other` fold): their fds and
        # limits add up, so the folded ratio is an average that hides the worst
        yield summed(metrics.PROCESS_OPEN_FDS.family(), ((scrape.series.of(p.process), p.open) for p in piece.processes))
        yield summed(metrics.PROCESS_MAX_FDS.family(), ((scrape.series.of(p.process), p.limit) for p in piece.processes))
