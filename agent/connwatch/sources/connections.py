"""Accepted connections per owning process, port and kind: open and
CLOSE_WAIT gauges, accept and close counters, lifetimes, WebSocket
handshakes and the busiest peers (BPF maps conn_counts, durations, upgrades
and peers)."""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .. import bpf_types, metrics
from ..config import peer_network
from .base import Owner, ReadContext, Scrape, Source, owned_rows, summed

KIND_NAMES = {k.value: k.name.lower() for k in bpf_types.Kind}


@dataclass(frozen=True, slots=True)
class ConnKey:
    owner: Owner
    port: int
    kind: str


@dataclass(frozen=True, slots=True)
class ConnCounts:
    open: int        # owned now
    close_wait: int  # of those, closed by the peer and not yet by the owner
    accepted: int    # accepted by this process
    closed: int      # accepted by this process and since closed


@dataclass(frozen=True, slots=True)
class UpgradeKey:
    owner: Owner
    port: int
    status: int


class Bucket(NamedTuple):
    le_seconds: float
    cumulative: int


@dataclass(frozen=True, slots=True)
class Histogram:
    buckets: tuple[Bucket, ...]
    sum_seconds: float
    count: int


@dataclass(frozen=True, slots=True)
class PortKey:
    """A listening port of one process."""
    owner: Owner
    port: int


@dataclass(frozen=True, slots=True)
class PeerCount:
    peer: str  # address, aggregated prefix or keyed hash (peers.*)
    connections: int


@dataclass(frozen=True, slots=True)
class PeerStats:
    distinct: int
    busiest: int
    top: tuple[PeerCount, ...]  # largest first


@dataclass(frozen=True)
class Connections:
    counts: Mapping[ConnKey, ConnCounts]
    upgrades: Mapping[UpgradeKey, int]
    durations: Mapping[ConnKey, Histogram]
    peers: Mapping[PortKey, PeerStats]

    def weights(self, live: Mapping[Owner, object]) -> dict[int, int]:
        """pid -> how it ranks for its own series: open connections, then accepts."""
        weight: dict[int, int] = defaultdict(int)
        for key, c in self.counts.items():
            if key.owner in live:
                weight[key.owner.tgid] += max(c.open, 0) * 1_000_000 + c.accepted
        return weight


def histogram(h: bpf_types.DurationHist) -> Histogram:
    """Kernel log2 buckets (bucket i: [2^(i-1), 2^i) ms) as cumulative le buckets."""
    cumulative, running = [], 0
    # the last kernel bucket also holds everything longer: it becomes +Inf
    for i in range(bpf_types.HIST_BUCKETS - 1):
        running += h.buckets[i]
        cumulative.append(Bucket((2 ** i) / 1000.0, running))
    return Histogram(tuple(cumulative), h.sum_ns / 1e9, h.count)


class ConnectionsSource(Source):
    name = "connections"

    def read(self, ctx: ReadContext) -> Connections:
        counts = {ConnKey(owner, k.lport, KIND_NAMES.get(k.kind, "tcp")): ConnCounts(
                      v.open, v.close_wait, v.accepted, v.closed)
                  for owner, k, v in ctx.owned_items("conn_counts", bpf_types.ConnKey, bpf_types.ConnCounts)}
        upgrades = {UpgradeKey(owner, k.lport, k.status): v
                    for owner, k, v in ctx.owned_items("upgrades", bpf_types.UpgradeKey, bpf_types.u64)}
        durations = {ConnKey(owner, k.lport, KIND_NAMES.get(k.kind, "tcp")): histogram(h)
                     for owner, k, h in ctx.owned_items("durations", bpf_types.DurationKey, bpf_types.DurationHist)}
        return Connections(counts, upgrades, durations, self._read_peers(ctx))

    def _read_peers(self, ctx: ReadContext) -> dict[PortKey, PeerStats]:
        per_port: dict[PortKey, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for owner, k, n in ctx.owned_items("peers", bpf_types.PeerKey, bpf_types.s64):
            if n <= 0:
                ctx.empty_keys["peers"].append(k)
                continue
            per_port[PortKey(owner, k.lport)][self._peer_label(k.peer)] += n
        out = {}
        for port, counts in per_port.items():
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            out[port] = PeerStats(len(counts), ranked[0][1],
                                  tuple(PeerCount(p, n) for p, n in ranked[: self.cfg.peers.top_k]))
        return out

    def _peer_label(self, raw) -> str:
        peers = self.cfg.peers
        addr = bpf_types.peer_address(raw)
        net = peer_network(addr, peers)
        label = str(addr) if net.prefixlen == net.max_prefixlen else str(net)
        if peers.hash:
            return hmac.new(peers.hash_key.encode(), label.encode(), hashlib.sha256).hexdigest()[:16]
        return label

    def families(self, piece: Connections, scrape: Scrape) -> Iterator:
        rows = [(key.owner, (str(key.port), key.kind), c) for key, c in piece.counts.items()]
        yield summed(metrics.CONNECTIONS.family(), owned_rows(rows, scrape, lambda c: max(c.open, 0)))
        yield summed(metrics.CONNECTIONS_CLOSE_WAIT.family(),
                     owned_rows(rows, scrape, lambda c: max(c.close_wait, 0)))
        per_port = [(owner, labels[:1], c) for owner, labels, c in rows]
        yield summed(metrics.ACCEPTED.family(), owned_rows(per_port, scrape, lambda c: c.accepted))
        yield summed(metrics.CLOSED.family(), owned_rows(per_port, scrape, lambda c: c.closed))
        yield summed(metrics.WEBSOCKET_UPGRADES.family(), owned_rows(
            ((key.owner, (str(key.port), str(key.status)), n) for key, n in piece.upgrades.items()),
            scrape, lambda n: n))
        yield self._durations(piece, scrape)
        yield from self._peers(piece, scrape)

    @staticmethod
    def _durations(piece: Connections, scrape: Scrape):
        family = metrics.CONNECTION_DURATION.family()
        merged: dict[tuple[str, ...], _HistogramFold] = {}
        for key, h in piece.durations.items():
            labels = scrape.series.of_owner(key.owner)
            if labels is not None:
                merged.setdefault((*labels, str(key.port), key.kind), _HistogramFold(h)).add(h)
        for labels, fold in sorted(merged.items()):
            family.add_metric(list(labels), fold.buckets(), sum_value=fold.sum_seconds)
        return family

    def _peers(self, piece: Connections, scrape: Scrape) -> Iterator:
        top = metrics.PEER_CONNECTIONS.family()
        distinct = metrics.PEERS.family()
        busiest = metrics.PEER_CONNECTIONS_MAX.family()
        merged: dict[tuple[str, ...], _PeerFold] = {}
        for key, st in piece.peers.items():
            labels = scrape.series.of_owner(key.owner)
            if labels is None:
                continue
            fold = merged.setdefault((*labels, str(key.port)), _PeerFold())
            fold.distinct += st.distinct  # processes folded into "other": distinct per process, summed
            fold.busiest = max(fold.busiest, st.busiest)
            for p in st.top:
                fold.connections[p.peer] += p.connections
        for labels, fold in sorted(merged.items()):
            distinct.add_metric(list(labels), fold.distinct)
            busiest.add_metric(list(labels), fold.busiest)
            ranked = sorted(fold.connections.items(), key=lambda kv: (-kv[1], kv[0]))[: self.cfg.peers.top_k]
            for peer, n in ranked:
                top.add_metric([*labels, peer], n)
        yield top
        yield distinct
        yield busiest


class _PeerFold:
    """The peers of every process that shares one series, added up."""

    def __init__(self):
        self.distinct = 0
        self.busiest = 0
        self.connections: dict[str, int] = defaultdict(int)


class _HistogramFold:
    """The histograms of every process that shares one series, added up."""

    def __init__(self, like: Histogram):
        self._bounds = [f"{b.le_seconds:g}" for b in like.buckets]
        self._counts = [0] * len(like.buckets)
        self.sum_seconds = 0.0
        self._count = 0

    def add(self, h: Histogram) -> None:
        self._counts = [n + b.cumulative for n, b in zip(self._counts, h.buckets)]
        self.sum_seconds += h.sum_seconds
        self._count += h.count

    def buckets(self) -> list[tuple[str, int]]:
        return list(zip(self._bounds, self._counts)) + [("+Inf", self._count)]
