"""A cache for what a process sets mostly as it starts (its fd limit, its
name, its cgroup), read again at a backing-off pace.

A value read for the first time is read again in the next round, then
after 2, 4, 8 ... rounds, at most `max_rounds` apart, and at once when the
caller says it is stale. A round is one census of the host's processes:
an entry not asked for during a round is forgotten at the next, so key it
with something that tells a reused pid apart.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    read_in: int  # the round it was read in
    after: int    # rounds until it is read again


class RereadCache(Generic[V]):
    def __init__(self, max_rounds: int) -> None:
        self.max_rounds = max_rounds
        self._round = 0
        self._last: dict[Hashable, _Entry[V]] = {}  # asked for in the previous round
        self._this: dict[Hashable, _Entry[V]] = {}

    def start_round(self) -> None:
        self._round += 1
        self._last, self._this = self._this, {}

    def get(self, key: Hashable, read: Callable[[], V | None],
            stale: Callable[[V], bool] = lambda value: False) -> V | None:
        """The value of `key`, from the cache or `read()` (None: nothing to
        cache, e.g. the process is gone)."""
        entry = self._this.get(key) or self._last.get(key)
        if entry is None or self._round - entry.read_in >= entry.after or stale(entry.value):
            value = read()
            if value is None:
                return None
            entry = _Entry(value, self._round, 1 if entry is None else min(2 * entry.after, self.max_rounds))
        self._this[key] = entry
        return entry.value
