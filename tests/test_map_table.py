"""One table of bounded BPF maps: the C enum cw_map_id (bpf/connwatch.h), the
Python MapId and the configuration's maps.* keys name the same maps in the
same order, and each is a map of the BPF object. Needs no root and no
kernel (the object is only opened, not loaded)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from connwatch import bpf_types
from connwatch.config import MapConfig
from connwatch.libbpf import BpfObject
from connwatch.probes import find_object

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "connwatch.h"


def c_map_ids() -> list[str]:
    body = re.search(r"enum cw_map_id \{(.*?)\};", HEADER.read_text(), re.S).group(1)
    names = [m.group(1) for m in re.finditer(r"^\s*CW_MAP_(\w+)", body, re.M)]
    assert names[-1] == "COUNT" and "= 0" in body.split(",")[0]
    return names[:-1]


def test_enum_python_ids_and_config_keys_agree():
    config_keys = [f.name for f in dataclasses.fields(MapConfig)]
    assert c_map_ids() == [m.name for m in bpf_types.MapId] == [k.upper() for k in config_keys]
    assert [m.value for m in bpf_types.MapId] == list(range(len(config_keys)))


def test_every_id_names_a_map_of_the_object():
    with BpfObject(find_object()) as obj:
        assert {m.name.lower() for m in bpf_types.MapId} <= set(obj.maps)
