"""The BPF side's health: which probes are attached and how, whether the
syscall hook is armed, each bounded map's fill, capacity, refused inserts
and memory, each program's run statistics."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .. import bpf_types, metrics
from .base import ReadContext, Scrape, Source


@dataclass(frozen=True, slots=True)
class ProbeState:
    enabled: bool
    via: str = ""     # fentry, kprobe, tracepoint, syscall_hook, iterator
    attach: str = ""  # where, e.g. "fexit/inet_csk_accept"


@dataclass(frozen=True, slots=True)
class MapStats:
    entries: int
    capacity: int
    full: int
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class ProgramStats:
    run_time_ns: int
    runs: int
    recursion_misses: int


@dataclass(frozen=True)
class BpfHealth:
    probes: Mapping[str, ProbeState]
    syscall_hook_armed: bool | None  # None: no probe needs the syscall hook here
    maps: Mapping[str, MapStats]
    programs: Mapping[str, ProgramStats]


_RAW: dict[int, type] = {}


def _raw(size: int) -> type:
    """An opaque ctypes type of `size` bytes, for counting entries."""
    if size not in _RAW:
        _RAW[size] = ctypes.c_char * size
    return _RAW[size]


class BpfSource(Source):
    name = "bpf"
    # map fill after the clean-up step's deletes
    needs_identities = True

    def read(self, ctx: ReadContext) -> BpfHealth:
        probes = ctx.probes
        states = {}
        for name, on in probes.enabled.items():
            strategy = probes.via(name)
            states[name] = ProbeState(on, strategy.via, strategy.attach) if strategy else ProbeState(on)
        hook = probes.syscall_hook
        return BpfHealth(states, hook.armed if hook else None, self._maps(ctx), {
            name.removeprefix("cw_"): ProgramStats(*prog.run_stats())
            for name, prog in probes.obj.programs.items() if prog.fd >= 0})

    @staticmethod
    def _maps(ctx: ReadContext) -> dict[str, MapStats]:
        maps = ctx.probes.maps
        full = maps["map_full"]
        out = {}
        for mid in bpf_types.MapId:
            name = mid.name.lower()
            mp = maps[name]
            refused = sum(full.lookup_percpu(ctypes.c_uint32(mid), ctypes.c_uint64))
            if name == "socks":  # preallocated: counted by the programs instead of walked
                entries = sum(maps["socks_live"].lookup_percpu(ctypes.c_uint32(0), ctypes.c_int64))
            elif name in ctx.entries:
                entries = ctx.entries[name]
            else:
                entries = sum(1 for _ in mp.items(_raw(mp.key_size), _raw(mp.value_size)))
            out[name] = MapStats(entries, mp.max_entries, refused, mp.memlock_bytes())
        return out

    def families(self, piece: BpfHealth, scrape: Scrape) -> Iterator:
        enabled = metrics.PROBE_ENABLED.family()
        info = metrics.PROBE_INFO.family()
        for name, st in sorted(piece.probes.items()):
            enabled.add_metric([name], 1 if st.enabled else 0)
            if st.enabled:
                info.add_metric([name, st.via, st.attach], 1)
        yield enabled
        yield info
        if piece.syscall_hook_armed is not None:
            yield metrics.SYSCALL_HOOK_ARMED.family(1 if piece.syscall_hook_armed else 0)
        entries = metrics.BPF_MAP_ENTRIES.family()
        capacity = metrics.BPF_MAP_CAPACITY.family()
        full = metrics.BPF_MAP_FULL.family()
        memory = metrics.BPF_MAP_MEMORY.family()
        for name, st in sorted(piece.maps.items()):
            entries.add_metric([name], st.entries)
            capacity.add_metric([name], st.capacity)
            full.add_metric([name], st.full)
            memory.add_metric([name], st.memory_bytes)
        yield from (entries, capacity, full, memory)
        run_time = metrics.BPF_PROGRAM_RUN_SECONDS.family()
        runs = metrics.BPF_PROGRAM_RUNS.family()
        misses = metrics.BPF_PROGRAM_RECURSION_MISSES.family()
        for name, st in sorted(piece.programs.items()):
            run_time.add_metric([name], st.run_time_ns / 1e9)
            runs.add_metric([name], st.runs)
            misses.add_metric([name], st.recursion_misses)
        yield from (run_time, runs, misses)
