"""Every error a user can cause: one line on stderr that names the culprit, exit code 2.

Each case runs the real `connwatch` command in a subprocess (as root, or as
`nobody` through setpriv where privileges matter, or in a mount namespace
without /sys/kernel/btf, or under the UNAME26 personality). The cases run concurrently once per module; each
test then checks its own result.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
UNPRIVILEGED = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all"]
GOOD_HASH = "$2b$04$gYqXKHNKFTaW5E6W7Z/vH.UJjhfk77bq2FRLk8BNLLqg.9qw7MHc."


# name -> (files to write {name: text|bytes}, argv after `connwatch` ({d} = the case's dir),
#          wrapper, substrings the one line must contain)
CASES: dict[str, tuple[dict, list[str], str, list[str]]] = {
    # flags
    "unknown flag": ({}, ["--no-such-flag"], "", ["unrecognized arguments", "--no-such-flag"]),
    "unknown flag after run": ({}, ["run", "--web.listen", "1"], "", ["--web.listen"]),
    "unknown subcommand flag": ({}, ["doctor", "--bogus"], "", ["--bogus"]),
    "bad log level": ({}, ["--log.level", "loud"], "", ["--log.level", "loud"]),
    "flag without value": ({}, ["--config.file"], "", ["--config.file", "expected one argument"]),
    "bad telemetry path": ({}, ["--web.telemetry-path", "metrics"], "", ["--web.telemetry-path"]),
    "bad listen address": ({}, ["--web.listen-address", "localhost"], "", ["--web.listen-address", "localhost"]),
    "listen port out of range": ({}, ["--web.listen-address", "127.0.0.1:70000"], "", ["--web.listen-address", "70000"]),
    "listen brackets": ({}, ["--web.listen-address", "[::1:9476"], "", ["--web.listen-address", "brackets"]),
    "listen unknown host": ({}, ["--web.listen-address", "no-such-host.invalid:9476"], "",
                            ["--web.listen-address", "no-such-host.invalid"]),
    # the config file itself
    "missing config file": ({}, ["--config.file", "{d}/nope.yml"], "", ["nope.yml", "No such file"]),
    "config is a directory": ({}, ["--config.file", "{d}"], "", ["Is a directory"]),
    "unreadable config file": ({"c.yml": "refresh_interval_seconds: 1\n"}, ["--config.file", "{d}/c.yml"],
                               "unreadable", ["c.yml", "Permission denied"]),
    "config not utf-8": ({"c.yml": b"peers:\n  hash_key: \xff\xfe\n"}, ["--config.file", "{d}/c.yml"], "",
                         ["c.yml", "UTF-8"]),
    # YAML
    "malformed yaml": ({"c.yml": "refresh_interval_seconds: [1\n"}, ["--config.file", "{d}/c.yml"], "",
                       ["c.yml", "malformed YAML", "line"]),
    "yaml tab indent": ({"c.yml": "peers:\n\ttop_k: 1\n"}, ["--config.file", "{d}/c.yml"], "",
                        ["c.yml", "malformed YAML"]),
    "duplicate key": ({"c.yml": "max_process_series: 5\nmax_process_series: 6\n"}, ["--config.file", "{d}/c.yml"],
                      "", ["duplicate key", "max_process_series"]),
    "config not a mapping": ({"c.yml": "- 1\n- 2\n"}, ["--config.file", "{d}/c.yml"], "", ["expected a mapping"]),
    # keys
    "unknown top-level key": ({"c.yml": "refresh_intervall_seconds: 1\n"}, ["--config.file", "{d}/c.yml"], "",
                              ["unknown key refresh_intervall_seconds"]),
    "unknown nested key": ({"c.yml": "peers:\n  topk: 3\n"}, ["--config.file", "{d}/c.yml"], "",
                           ["unknown key peers.topk"]),
    "unknown map": ({"c.yml": "maps:\n  sockz: 3\n"}, ["--config.file", "{d}/c.yml"], "", ["unknown key maps.sockz"]),
    "non-string key": ({"c.yml": "1: 2\n"}, ["--config.file", "{d}/c.yml"], "", ["unknown key 1"]),
    # types
    "string for float": ({"c.yml": "refresh_interval_seconds: fast\n"}, ["--config.file", "{d}/c.yml"], "",
                         ["refresh_interval_seconds", "expected float"]),
    "float for int": ({"c.yml": "max_process_series: 1.5\n"}, ["--config.file", "{d}/c.yml"], "",
                      ["max_process_series", "expected int"]),
    "bool for int": ({"c.yml": "peers:\n  top_k: true\n"}, ["--config.file", "{d}/c.yml"], "",
                     ["peers.top_k", "expected int"]),
    "string for bool": ({"c.yml": "peers:\n  hash: 'on'\n"}, ["--config.file", "{d}/c.yml"], "",
                        ["peers.hash", "expected bool"]),
    "scalar for section": ({"c.yml": "peers: 5\n"}, ["--config.file", "{d}/c.yml"], "", ["peers", "expected a mapping"]),
    "scalar for port list": ({"c.yml": "websocket_ports: 8080\n"}, ["--config.file", "{d}/c.yml"], "",
                             ["websocket_ports", "list"]),
    "hash without key": ({"c.yml": "peers:\n  hash: true\n"}, ["--config.file", "{d}/c.yml"], "",
                         ["peers.hash_key", "required"]),
    # ranges
    "refresh too fast": ({"c.yml": "refresh_interval_seconds: 0.001\n"}, ["--config.file", "{d}/c.yml"], "",
                         ["refresh_interval_seconds", "out of range"]),
    "refresh nan": ({"c.yml": "refresh_interval_seconds: .nan\n"}, ["--config.file", "{d}/c.yml"], "",
                    ["refresh_interval_seconds", "out of range"]),
    "top_k too big": ({"c.yml": "peers:\n  top_k: 5000\n"}, ["--config.file", "{d}/c.yml"], "",
                      ["peers.top_k", "out of range"]),
    "ipv4 prefix 33": ({"c.yml": "peers:\n  ipv4_prefix: 33\n"}, ["--config.file", "{d}/c.yml"], "",
                       ["peers.ipv4_prefix", "out of range"]),
    "map capacity 0": ({"c.yml": "maps:\n  socks: 0\n"}, ["--config.file", "{d}/c.yml"], "",
                       ["maps.socks", "out of range"]),
    "port 70000": ({"c.yml": "websocket_ports: [80, 70000]\n"}, ["--config.file", "{d}/c.yml"], "",
                   ["websocket_ports", "70000"]),
    "too many ports": ({"c.yml": f"websocket_ports: {list(range(1, 40))}\n"}, ["--config.file", "{d}/c.yml"], "",
                       ["websocket_ports", "at most"]),
    # web config
    "missing web config": ({}, ["--web.config.file", "{d}/web.yml"], "", ["web config file", "web.yml"]),
    "web config malformed": ({"web.yml": "basic_auth_users: {a\n"}, ["--web.config.file", "{d}/web.yml"], "",
                             ["web.yml", "malformed YAML"]),
    "web config unknown key": ({"web.yml": "tls_config: {}\n"}, ["--web.config.file", "{d}/web.yml"], "",
                               ["unknown key tls_config"]),
    "bad bcrypt hash": ({"web.yml": "basic_auth_users:\n  prometheus: secret\n"}, ["--web.config.file", "{d}/web.yml"],
                        "", ["basic_auth_users.prometheus", "bcrypt"]),
    "truncated bcrypt hash": ({"web.yml": f"basic_auth_users:\n  prometheus: '{GOOD_HASH[:-3]}'\n"},
                              ["--web.config.file", "{d}/web.yml"], "", ["basic_auth_users.prometheus", "bcrypt"]),
    "missing cert": ({"web.yml": "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n"},
                     ["--web.config.file", "{d}/web.yml"], "", ["tls_server_config", "nope.crt"]),
    "cert without key": ({"web.yml": "tls_server_config:\n  cert_file: a.crt\n"},
                         ["--web.config.file", "{d}/web.yml"], "", ["tls_server_config.key_file", "required"]),
    "garbage cert": ({"web.yml": "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n",
                      "a.crt": "not a cert\n", "a.key": "not a key\n"},
                     ["--web.config.file", "{d}/web.yml"], "", ["tls_server_config", "a.crt"]),
    "verify without ca": ({"web.yml": "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n"
                                      "  client_auth_type: RequireAndVerifyClientCert\n"},
                          ["--web.config.file", "{d}/web.yml"], "", ["client_ca_file", "required"]),
    "bad client auth": ({"web.yml": "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n"
                                    "  client_auth_type: Maybe\n"},
                        ["--web.config.file", "{d}/web.yml"], "", ["client_auth_type", "Maybe"]),
    "bad tls version": ({"web.yml": "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n"
                                    "  min_version: SSL3\n"},
                        ["--web.config.file", "{d}/web.yml"], "", ["min_version", "SSL3"]),
    "header injection": ({"web.yml": "http_server_config:\n  headers:\n    X-A: \"a\\r\\nSet-Cookie: x\"\n"},
                         ["--web.config.file", "{d}/web.yml"], "", ["http_server_config.headers.X-A"]),
    # the machine
    "port in use": ({}, ["--web.listen-address", "127.0.0.1:{busy_port}"], "",
                    ["--web.listen-address", "Address already in use"]),
    "missing BTF": ({}, ["--web.listen-address", "127.0.0.1:0"], "no_btf",
                    ["kernel " + os.uname().release, "BTF", "/sys/kernel/btf/vmlinux", "CONFIG_DEBUG_INFO_BTF"]),
    # the kernel's UNAME26 personality makes uname() report 2.6.x, as an old kernel would
    "kernel below the floor": ({}, ["--web.listen-address", "127.0.0.1:0"], "uname26",
                               ["kernel 2.6.", "older than 5.10"]),
    "missing CAP_BPF and CAP_PERFMON": ({}, ["--web.listen-address", "127.0.0.1:0"], "unprivileged",
                                        ["CAP_BPF", "CAP_PERFMON", "grant"]),
}


def _run_case(name: str, base: Path, busy_port: int) -> subprocess.CompletedProcess:
    files, argv, wrapper, _ = CASES[name]
    d = base / name.replace(" ", "_")
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = [a.format(d=d, busy_port=busy_port) for a in argv]
    cmd = [CONNWATCH, *argv]
    if wrapper == "unreadable":
        os.chmod(d / "c.yml", 0)
        os.chmod(d, 0o755)
        cmd = UNPRIVILEGED + cmd
    elif wrapper == "unprivileged":
        cmd = UNPRIVILEGED + cmd
    elif wrapper == "no_btf":
        # the real condition: a kernel without BTF has no /sys/kernel/btf/vmlinux
        script = 'mount -t tmpfs none /sys/kernel/btf && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    elif wrapper == "uname26":
        cmd = ["setarch", os.uname().machine, "--uname-2.6", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def results():
    # not pytest's tmp_path: its parents are 0700, and `nobody` must reach the
    # unreadable file to be refused by the file itself
    with tempfile.TemporaryDirectory(prefix="connwatch-bad-input-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = {n: pool.submit(_run_case, n, base, busy.getsockname()[1]) for n in CASES}
                yield {n: f.result() for n, f in futures.items()}
        finally:
            busy.close()


@pytest.mark.parametrize("name", list(CASES))
def test_one_clear_line_and_exit_2(results, name):
    if CASES[name][2] == "no_btf" and not shutil.which("unshare"):
        pytest.skip("unshare(1) not installed")
    r = results[name]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}, stderr:\n{r.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert r.stdout == ""
    line = lines[0]
    assert line.startswith("connwatch: error: "), line
    for needle in CASES[name][3]:
        assert needle in line, f"{needle!r} not in {line!r}"


def test_valid_config_is_accepted(tmp_path):
    """The negative cases above are not failing for a reason the good config shares."""
    from connwatch import config, webconfig

    cfg = config.parse(textwrap.dedent("""\
        refresh_interval_seconds: 0.2
        websocket_ports: [8080, 8443]
        max_process_series: 100
        peers: {top_k: 5, ipv4_prefix: 24, ipv6_prefix: 64, hash: true, hash_key: k}
        maps: {socks: 1024}
    """))
    assert cfg.peers.ipv4_prefix == 24 and cfg.maps.socks == 1024 and cfg.websocket_ports == (8080, 8443)
    assert config.parse("").refresh_interval_seconds == config.Config().refresh_interval_seconds
    wc = webconfig.parse(f"basic_auth_users:\n  prometheus: '{GOOD_HASH}'\n", "web.yml")
    assert set(wc.users) == {"prometheus"}


def test_every_config_key_is_documented():
    """docs/configuration.md names every key the parser accepts."""
    import dataclasses

    from connwatch import config

    doc = (ROOT / "docs" / "configuration.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    missing = [k for k in keys(config.Config) if f"`{k}`" not in doc]
    assert not missing, f"not in docs/configuration.md: {missing}"
