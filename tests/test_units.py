"""Unit tests of the pure parts: struct mirrors against the object's BTF,
peer and histogram decoding, configuration parsing."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from connwatch import bpf_types
from connwatch.config import Config, ConfigError, parse, peer_network, PeerConfig
from connwatch.libbpf import BpfObject
from connwatch.probes import find_object
from connwatch.sources.connections import histogram


@pytest.fixture(scope="module")
def btf_object():
    with BpfObject(find_object()) as obj:
        yield obj


def test_mirrors_match_the_built_object(btf_object):
    bpf_types.check_layout(btf_object.btf)  # raises on any drift


def test_layout_drift_is_caught(btf_object, monkeypatch):
    class Drifted(ctypes.Structure):  # cw_conn_key with two members swapped
        _fields_ = [("tgid", bpf_types.u32), ("lport", bpf_types.u16), ("kind", bpf_types.u8), ("_pad", bpf_types.u8), ("pstart", bpf_types.u64)]
    monkeypatch.setitem(bpf_types.MIRRORS, "cw_conn_key", Drifted)
    with pytest.raises(bpf_types.LayoutMismatch, match="cw_conn_key"):
        bpf_types.check_layout(btf_object.btf)


def test_enum_drift_is_caught(btf_object, monkeypatch):
    import enum

    class Kind(enum.IntEnum):
        TCP = 0
        WEBSOCKET = 2
        TLS = 1
    monkeypatch.setitem(bpf_types.ENUMS, "cw_kind", (Kind, "CW_KIND_"))
    with pytest.raises(bpf_types.LayoutMismatch, match="cw_kind"):
        bpf_types.check_layout(btf_object.btf)


def test_peer_decoding():
    v4 = bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert bpf_types.peer_address(v4) == ipaddress.IPv4Address("10.1.2.3")
    v6 = ipaddress.IPv6Address("2001:db8::7").packed
    assert bpf_types.peer_address(v6) == ipaddress.IPv6Address("2001:db8::7")
    peers = PeerConfig(ipv4_prefix=24, ipv6_prefix=64)
    assert str(peer_network(bpf_types.peer_address(v4), peers)) == "10.1.2.0/24"
    assert str(peer_network(bpf_types.peer_address(v6), peers)) == "2001:db8::/64"


def test_histogram_is_cumulative_with_le_in_seconds():
    h = bpf_types.DurationHist()
    h.buckets[0] = 2   # < 1 ms
    h.buckets[3] = 1   # [4, 8) ms
    h.buckets[31] = 1  # the open-ended last bucket: only in +Inf
    h.count, h.sum_ns = 4, 5_000_000
    hist = histogram(h)
    buckets = hist.buckets
    assert buckets[0] == (0.001, 2) and buckets[3] == (0.008, 3) and buckets[-1] == (2 ** 30 / 1000, 3)
    assert len(buckets) == bpf_types.HIST_BUCKETS - 1 and hist.count == 4 and hist.sum_seconds == 0.005


def test_config_defaults_and_values():
    assert parse("", "t") == Config()
    cfg = parse("refresh_interval_seconds: 1\nwebsocket_ports: [443, 8443]\npeers:\n  top_k: 3\n", "t")
    assert cfg.refresh_interval_seconds == 1.0 and cfg.websocket_ports == (443, 8443) and cfg.peers.top_k == 3


@pytest.mark.parametrize("text, names", [
    ("nope: 1", "nope"),
    ("peers:\n  top_kk: 1", "peers.top_kk"),
    ("maps:\n  socks: 0", "maps.socks"),
    ("websocket_ports: [70000]", "websocket_ports"),
    ("max_process_series: true", "max_process_series"),
    ("refresh_interval_seconds: [1]", "refresh_interval_seconds"),
    ("peers: 3", "peers"),
    ("a: [", "YAML"),
])
def test_config_errors_name_the_key(text, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.").replace("[", r"\[")):
        parse(text, "t")


def test_reread_cache_backs_off_and_forgets():
    """A value is read on first use, again the next round, then after 2, 4,
    8 ... rounds up to max_rounds; at once when stale; forgotten after a
    round it was not asked for."""
    from connwatch.reread import RereadCache

    cache, reads = RereadCache(max_rounds=8), []
    for rnd in range(1, 40):
        cache.start_round()
        cache.get("k", lambda rnd=rnd: reads.append(rnd) or rnd)
    assert reads == [1, 2, 4, 8, 16, 24, 32]
    cache.start_round()
    assert cache.get("k", lambda: 99, stale=lambda v: v == 32) == 99
    cache.start_round()  # "k" not asked for in this round
    cache.start_round()
    assert cache.get("k", lambda: 7) == 7
    assert cache.get("gone", lambda: None) is None
