"""What the sources share: who owns a key, the process labels, the read
context of one refresh, and the fold of processes past the series cap.

A source reads its part of the kernel's and /proc's state into a frozen
piece in the background refresher (:meth:`Source.read`, all the I/O), and
turns a piece into metric families at scrape time (:meth:`Source.families`,
no I/O).
"""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client.metrics_core import Metric as Family

from ..config import Config

if TYPE_CHECKING:
    from ..probes import Probes
    from ..snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class Owner:
    """A process as BPF keys name it: (tgid, start_boottime), so a reused pid
    is another owner."""

    tgid: int
    pstart: int


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    comm: str
    container: str = ""
    pod_uid: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        """Values of metrics.PROCESS, in its order."""
        return ("" if self is OTHER else str(self.pid), self.comm, self.container, self.pod_uid)


# every process past max_process_series, summed into one series per metric
OTHER = Process(0, "other")


class ReadContext:
    """What the sources of one refresh share: the loaded probes, the entries
    each map had when read (the BPF source reports them instead of walking
    every map again), and the keys the clean-up step may delete."""

    def __init__(self, probes: Probes, cfg: Config):
        self.probes = probes
        self.cfg = cfg
        self.entries: dict[str, int] = {}
        # map -> (owner, key) of counters to delete once their owner is gone
        self.owned_keys: dict[str, list[tuple[Owner, Any]]] = defaultdict(list)
        # every owner a key read so far names
        self.owners: set[Owner] = set()
        # map -> keys whose value is 0 (peers of connections all closed)
        self.empty_keys: dict[str, list[Any]] = defaultdict(list)
        # live owners -> Process: set by the identity step, before the sources that need it
        self.processes: Mapping[Owner, Process] = {}
        self.pieces: dict[str, Any] = {}

    def items(self, map_name: str, key_type, value_type) -> list[tuple[Any, Any]]:
        items = list(self.probes.maps[map_name].items(key_type, value_type))
        self.entries[map_name] = len(items)
        return items

    def owned_items(self, map_name: str, key_type, value_type,
                    forget_with_owner: bool = True, owner_in_value: bool = False) -> list[tuple[Owner, Any, Any]]:
        """(owner, key, value) of a map whose keys (or values) carry tgid and
        pstart. forget_with_owner: the clean-up step deletes the entries of
        owners that are gone (counters; listeners are deleted by the kernel at
        close)."""
        out = []
        for k, v in self.items(map_name, key_type, value_type):
            holder = v if owner_in_value else k
            owner = Owner(holder.tgid, holder.pstart)
            self.owners.add(owner)
            if forget_with_owner:
                self.owned_keys[map_name].append((owner, k))
            out.append((owner, k, v))
        return out


class Scrape:
    """What families() may look at besides its own piece: the snapshot and the
    labels each process's series carry."""

    def __init__(self, snapshot: Snapshot, series: ProcessSeries, last_collect_seconds: float = 0.0):
        self.snapshot = snapshot
        self.series = series
        self.last_collect_seconds = last_collect_seconds


class Source(abc.ABC):
    name: ClassVar[str]
    # reads after the identity step (ReadContext.processes is filled)
    needs_identities: ClassVar[bool] = False
    # its families are served before the first snapshot too (with piece None)
    reports_before_ready: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abc.abstractmethod
    def read(self, ctx: ReadContext) -> Any:
        """This source's part of the snapshot, frozen."""

    @abc.abstractmethod
    def families(self, piece: Any, scrape: Scrape) -> Iterator[Family]:
        """Metric families from a piece this source read; no I/O."""


class ProcessSeries:
    """The label values of each process's series: its own, or OTHER's for the
    processes past `cap`, ranked by connections, then by fd usage."""

    def __init__(self, owners: Mapping[Owner, Process], others: Iterable[Process] = (),
                 connections: Mapping[int, int] | None = None, fd_usage: Mapping[int, float] | None = None,
                 cap: int = 500):
        self._owners = owners
        connections = connections or {}
        fd_usage = fd_usage or {}
        pids = {p.pid for p in owners.values()} | {p.pid for p in others}
        ranked = sorted(pids, key=lambda pid: (-connections.get(pid, 0), -fd_usage.get(pid, 0.0), pid))
        self._kept = frozenset(ranked[:cap])

    def of(self, process: Process) -> tuple[str, ...]:
        return process.labels if process.pid in self._kept else OTHER.labels

    def of_owner(self, owner: Owner) -> tuple[str, ...] | None:
        """None for an owner that is gone: its rows are not reported."""
        process = self._owners.get(owner)
        return None if process is None else self.of(process)


def summed(family: Family, rows: Iterable[tuple[tuple[str, ...], float]]) -> Family:
    """Rows that share labels (processes folded into OTHER, IPv4 and IPv6
    listeners on one port) add up."""
    total: dict[tuple[str, ...], float] = defaultdict(int)
    for labels, value in rows:
        total[labels] += value
    for labels, value in sorted(total.items()):
        family.add_metric(list(labels), value)
    return family


def maxed(family: Family, rows: Iterable[tuple[tuple[str, ...], float]]) -> Family:
    """Rows that share labels report the largest value (a limit, not a count)."""
    top: dict[tuple[str, ...], float] = {}
    for labels, value in rows:
        top[labels] = max(top.get(labels, value), value)
    for labels, value in sorted(top.items()):
        family.add_metric(list(labels), value)
    return family


def owned_rows(rows: Iterable[tuple[Owner, tuple[str, ...], Any]], scrape: Scrape,
               value: Callable[[Any], float]) -> Iterator[tuple[tuple[str, ...], float]]:
    """(labels, value) for rows keyed by a live owner: the owner's series
    labels followed by the row's own."""
    for owner, own_labels, row in rows:
        labels = scrape.series.of_owner(owner)
        if labels is not None:
            yield (*labels, *own_labels), value(row)
