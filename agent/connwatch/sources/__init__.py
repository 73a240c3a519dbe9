"""The sources of the agent's metrics, one per concern, in the order a
refresh reads them (connwatch/snapshot.py) and a scrape emits them
(connwatch/collector.py)."""

from __future__ import annotations

from ..config import Config
from .agent import AgentSource
from .base import Source
from .bpf import BpfSource
from .connections import ConnectionsSource
from .failures import FailuresSource
from .headroom import HeadroomSource
from .listeners import ListenersSource
from .namespaces import NamespacesSource
from .system import SystemSource


def default_sources(cfg: Config, **agent_info) -> list[Source]:
    return [AgentSource(cfg, **agent_info), ConnectionsSource(cfg), FailuresSource(cfg), ListenersSource(cfg),
            HeadroomSource(cfg), SystemSource(cfg), NamespacesSource(cfg), BpfSource(cfg)]
