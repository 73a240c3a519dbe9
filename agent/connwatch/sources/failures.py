"""Syscalls that failed at a limit, per process: EMFILE/ENFILE (BPF map
fd_failures) and no free local port (port_exhaustion)."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import bpf_types, metrics
from .base import Owner, ReadContext, Scrape, Source, owned_rows, summed

ERRNO_NAMES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.EADDRNOTAVAIL: "EADDRNOTAVAIL",
               errno.EADDRINUSE: "EADDRINUSE"}
SYSCALL_NAMES = {s.value: s.name.lower() for s in bpf_types.Syscall}


@dataclass(frozen=True, slots=True)
class FdFailureKey:
    owner: Owner
    syscall: str
    errno: str


@dataclass(frozen=True, slots=True)
class PortExhaustionKey:
    owner: Owner
    syscall: str


@dataclass(frozen=True)
class Failures:
    fd_alloc: Mapping[FdFailureKey, int]
    port_exhaustion: Mapping[PortExhaustionKey, int]


class FailuresSource(Source):
    name = "failures"

    def read(self, ctx: ReadContext) -> Failures:
        fd_alloc: dict[FdFailureKey, int] = {}
        for owner, k, n in ctx.owned_items("fd_failures", bpf_types.FailKey, bpf_types.u64):
            key = FdFailureKey(owner, SYSCALL_NAMES.get(k.syscall, "other"), ERRNO_NAMES.get(k.err, str(k.err)))
            fd_alloc[key] = fd_alloc.get(key, 0) + n
        port_exhaustion: dict[PortExhaustionKey, int] = {}
        for owner, k, n in ctx.owned_items("port_exhaustion", bpf_types.FailKey, bpf_types.u64):
            key = PortExhaustionKey(owner, SYSCALL_NAMES.get(k.syscall, "other"))
            port_exhaustion[key] = port_exhaustion.get(key, 0) + n
        return Failures(fd_alloc, port_exhaustion)

    def families(self, piece: Failures, scrape: Scrape) -> Iterator:
        yield summed(metrics.FD_ALLOC_FAILURES.family(), owned_rows(
            ((k.owner, (k.syscall, k.errno), n) for k, n in piece.fd_alloc.items()), scrape, int))
        yield summed(metrics.PORT_EXHAUSTION_FAILURES.family(), owned_rows(
            ((k.owner, (k.syscall,), n) for k, n in piece.port_exhaustion.items()), scrape, int))
