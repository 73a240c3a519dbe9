"""Who owns the keys a refresh read: the live owners and their identities.

BPF keys name a process as (tgid, start_boottime); the `procs` map holds
every such process the kernel still knows as alive, with its comm (its
entry goes at exit). It is read after every counter map, so a process that
starts in between is already in it and its fresh counters are never taken
for a dead process's. Container and pod come from /proc/<pid>/cgroup once
per process (connwatch/identity.py), cached while it lives.
"""

from __future__ import annotations

import ctypes

from . import bpf_types, identity
from .sources.base import Owner, Process, ReadContext


class Identities:
    def __init__(self) -> None:
        self._known: dict[Owner, Process] = {}

    def resolve(self, ctx: ReadContext) -> dict[Owner, Process]:
        """Every owner the reads named that is alive, as a Process."""
        live = {tgid: proc for tgid, proc in ctx.items("procs", ctypes.c_uint32, bpf_types.Proc)}
        out: dict[Owner, Process] = {}
        for owner in ctx.owners:
            proc = live.get(owner.tgid)
            if proc is None or proc.pstart != owner.pstart:
                continue  # exited (or its pid now belongs to another)
            process = self._known.get(owner) or self._identify(owner, proc)
            if process is not None:
                out[owner] = process
        self._known = out  # forget the processes that are gone
        return out

    @staticmethod
    def _identify(owner: Owner, proc: bpf_types.Proc) -> Process | None:
        ident = identity.identity(owner.tgid)
        if ident is None:
            return None  # exited between the map read and now
        return Process(owner.tgid, proc.comm.decode(errors="replace"), ident.container, ident.pod_uid)
