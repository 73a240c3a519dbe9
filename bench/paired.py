"""Paired rounds: every comparison is made within a round.

A round measures every condition once, back to back; ratios and slowdowns
are taken against the same round's baseline. The order is forward in even
rounds and reversed in odd ones (A B C | C B A | A B C ...), so a linear
drift of the machine cancels, and the condition that ends a round starts
the next: whatever it attached (an agent, some programs) is kept for both
phases instead of being set up twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import common as C
from . import noise


@dataclass(frozen=True)
class Condition:
    """What is attached while a phase runs: nothing, a connwatch agent with
    some configuration, or some of the bench's own programs."""

    name: str
    label: str
    agent_config: dict | None = None
    programs: frozenset[str] = frozenset()  # of the bench's empty object (bench/bpf/empty.bpf.c)

    @property
    def is_baseline(self) -> bool:
        """The condition every ratio is taken against (Rounds.ratios)."""
        return self.name == BASELINE


BASELINE = "none"
NOTHING = Condition(BASELINE, "nothing attached (baseline)")
# nothing attached once more, measured like any other condition: its ratio to
# the baseline is what this machine's own drift does to a ratio (an A/A test)
NOTHING_AGAIN = Condition("none_again", "nothing attached, measured again (A/A: the machine's own spread)")
# the agent as installed: syscall_tracing on_demand, so on this host no
# syscall hook while no process is near a limit
DEFAULT_AGENT = Condition("agent", "connwatch agent, default configuration (syscall hook on demand)", {})
# what the old default cost: the syscall hook attached for good
ALWAYS_AGENT = Condition("agent_always", "connwatch agent, syscall_tracing: always", {"syscall_tracing": "always"})


@dataclass
class Attached:
    """The live side of a condition during its phases."""

    condition: Condition
    agent: C.Agent | None = None
    bpf: C.Bpf | None = None
    startup_seconds: float = 0.0

    @classmethod
    def attach(cls, cond: Condition, agent_base_config: dict) -> Attached:
        a = cls(cond)
        if cond.agent_config is not None:
            a.agent = C.Agent({**agent_base_config, **cond.agent_config}, tag=cond.name)
            a.startup_seconds = a.agent.startup_seconds
            a.agent.settle()
        elif cond.programs:
            a.bpf = C.Bpf(C.EMPTY_OBJ, only=set(cond.programs))
        return a

    @property
    def pids(self) -> list[int]:
        return [self.agent.pid] if self.agent else []

    def close(self) -> None:
        if self.bpf:
            self.bpf.close()
        if self.agent:
            self.agent.stop()


@dataclass
class Phase:
    """One measured phase: the measurement's own numbers plus the context."""

    condition: str
    round: int
    result: dict
    seconds: float = 0.0                 # wall time of the measurement, warm-up included
    foreign: int = 0                     # foreign attachments on measured hooks before the phase
    hook_armed: bool | None = None       # the agent's syscall hook, read after the phase
    arm_reason: str | None = None        # why it was armed (the agent's log)
    agent_alive: bool | None = None
    agent_cpu_s: float | None = None     # the agent's own CPU during the phase

    @property
    def agent_cpu_cores(self) -> float | None:
        return None if self.agent_cpu_s is None else self.agent_cpu_s / self.seconds


@dataclass
class Rounds:
    conditions: list[Condition]
    phases: list[Phase] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)

    def of(self, cond: str) -> list[Phase]:
        return [p for p in self.phases if p.condition == cond]

    def values(self, cond: str, *path: str) -> list[float]:
        """cond's result at `path` (keys into the result dict), one per round."""
        return [_at(p.result, path) for p in self.of(cond)]

    def ratios(self, cond: str, *path: str, base: str = BASELINE) -> list[float]:
        """Per round: cond's value at `path` / the baseline's value."""
        b = {p.round: _at(p.result, path) for p in self.of(base)}
        return [_at(p.result, path) / b[p.round] for p in self.of(cond) if b.get(p.round)]

    def to_json(self) -> dict:
        return {"conditions": {c.name: c.label for c in self.conditions},
                "agent_startup_seconds": self.startups,
                "phases": [{**p.__dict__, "agent_cpu_cores": p.agent_cpu_cores} for p in self.phases]}


def _at(result: dict, path: tuple[str, ...]):
    for key in path:
        result = result[key]
    return result


def run(profile, conditions: list[Condition], rounds: int, measure: Callable[[Attached], dict],
        what: str, agent_base_config: dict | None = None) -> Rounds:
    """`rounds` paired rounds of measure() under each condition."""
    out = Rounds(conditions)
    held: Attached | None = None
    try:
        for r in range(rounds):
            order = conditions if r % 2 == 0 else conditions[::-1]
            for cond in order:
                if held is not None and held.condition != cond:
                    held.close()
                    held = None
                if held is None:
                    held = Attached.attach(cond, agent_base_config or {})
                    if held.agent:
                        out.startups.append(held.startup_seconds)
                quiet = noise.wait_quiet(profile.quiet_wait, held.pids)
                a0 = held.agent.cpu_ns() if held.agent else 0
                t0 = time.monotonic()
                result = measure(held)
                phase = Phase(cond.name, r, result, time.monotonic() - t0, len(quiet.attachments))
                if held.agent:
                    phase.agent_cpu_s = (held.agent.cpu_ns() - a0) / 1e9
                    phase.agent_alive = held.agent.proc.poll() is None
                    phase.hook_armed = held.agent.hook_armed() if phase.agent_alive else None
                    if phase.hook_armed:
                        phase.arm_reason = (held.agent.arm_reasons() or ["?"])[-1]
                out.phases.append(phase)
            C.log(f"{what} round {r + 1}/{rounds}: " + ", ".join(
                f"{p.condition} {_headline(p.result)}" for p in out.phases if p.round == r))
    finally:
        if held is not None:
            held.close()
    return out


def _headline(result: dict) -> str:
    """What a log line shows for a phase."""
    for key, unit in (("rate", "/s"), ("getppid_cpu_ns", " ns/getppid"), ("conns", " conns")):
        if key in result:
            return f"{result[key]:.0f}{unit}"
    nested = [f"{k} {_headline(v)}" for k, v in result.items() if isinstance(v, dict) and "rate" in v]
    return " ".join(nested) or "done"
