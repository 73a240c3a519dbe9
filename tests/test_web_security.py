"""TLS and basic auth on /metrics (exporter-toolkit web config), with real clients.

Certificates are made with openssl in the test, password hashes with bcrypt.
The agent runs with TLS and basic auth; client-certificate mode is tested on
the same server code (web.MetricsServer) run in-process, to start one agent
instead of two.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
import requests
from prometheus_client import Gauge
from prometheus_client.registry import CollectorRegistry

from conftest import make_ca, make_cert, stop_process
from connwatch import web, webconfig

ROOT = Path(__file__).resolve().parent.parent
CONNWATCH = str(ROOT / ".venv" / "bin" / "connwatch")
USER, PASSWORD = "prometheus", "correct horse battery staple"
OTHER_USER, OTHER_PASSWORD = "grafana", "s3cret:with:colons"

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl(1) not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    make_cert(d, "client", "ca", usage="clientAuth")
    make_cert(d, "rogue-client", "rogue-ca", usage="clientAuth")
    return d


def _hash(password: str, prefix: str = "$2b$", rounds: int = 4) -> str:
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    return prefix + h[4:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def tls_agent(pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls_agent")
    web_yml = d / "web.yml"
    web_yml.write_text(
        "tls_server_config:\n"
        f"  cert_file: {pki / 'server.crt'}\n"
        f"  key_file: {pki / 'server.key'}\n"
        "basic_auth_users:\n"
        f"  {USER}: '{_hash(PASSWORD, rounds=10)}'\n"  # exporter-toolkit's recommended cost
        f"  {OTHER_USER}: '{_hash(OTHER_PASSWORD, '$2y$')}'\n"  # htpasswd's prefix
        "http_server_config:\n"
        "  headers:\n"
        "    X-Content-Type-Options: nosniff\n")
    cfg = d / "c.yml"
    cfg.write_text("refresh_interval_seconds: 0.2\n")
    port = _free_port()
    log_path = d / "agent.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([CONNWATCH, "run", f"--web.listen-address=127.0.0.1:{port}",
                             f"--config.file={cfg}", f"--web.config.file={web_yml}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}/metrics"

    def ready():
        assert proc.poll() is None, log_path.read_text()
        try:
            r = requests.get(url, auth=(USER, PASSWORD), verify=str(pki / "ca.crt"), timeout=5)
        except requests.RequestException:
            return False
        return r.status_code == 200 and "\nconnwatch_ready 1" in r.text

    _wait_for(ready, 90, "TLS agent ready")
    yield port, url
    stop_process(proc, 10)
    log.close()
    assert "Traceback" not in log_path.read_text()


# ---- TLS + basic auth on the agent ---------------------------------------------


def test_good_password_gets_metrics(tls_agent, pki):
    _, url = tls_agent
    r = requests.get(url, auth=(USER, PASSWORD), verify=str(pki / "ca.crt"), timeout=5)
    assert r.status_code == 200 and "connwatch_build_info" in r.text
    assert r.headers["X-Content-Type-Options"] == "nosniff"  # http_server_config.headers
    # the $2y$ (htpasswd) hash and a password with colons in it
    r = requests.get(url, auth=(OTHER_USER, OTHER_PASSWORD), verify=str(pki / "ca.crt"), timeout=5)
    assert r.status_code == 200


@pytest.mark.parametrize("auth", [
    (USER, "wrong"), (USER, ""), ("nobody", PASSWORD), (USER, PASSWORD + " "), (OTHER_USER, "s3cret"),
], ids=["wrong-password", "empty-password", "unknown-user", "trailing-space", "prefix-of-password"])
def test_wrong_credentials_get_401(tls_agent, pki, auth):
    _, url = tls_agent
    r = requests.get(url, auth=auth, verify=str(pki / "ca.crt"), timeout=5)
    assert r.status_code == 401
    assert "connwatch_" not in r.text
    assert r.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("header", [
    None, "Bearer abc", "Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "Basic " + "A" * 10000,
])
def test_missing_or_malformed_auth_gets_401(tls_agent, pki, header):
    _, url = tls_agent
    headers = {"Authorization": header} if header is not None else {}
    for method in (requests.get, requests.head):
        r = method(url, headers=headers, verify=str(pki / "ca.crt"), timeout=5)
        assert r.status_code == 401
        assert "connwatch_" not in r.text


def test_plain_http_to_tls_port_is_rejected(tls_agent):
    port, _ = tls_agent
    r = requests.get(f"http://127.0.0.1:{port}/metrics", auth=(USER, PASSWORD), timeout=5)
    assert r.status_code == 400
    assert "HTTPS" in r.text and "connwatch_" not in r.text
    # and a raw plain-HTTP request sees nothing but that
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.0 400") and b"connwatch_" not in data


def test_untrusted_client_sees_unknown_ca(tls_agent):
    """A client that checks certificates (the default) refuses a server cert from an unknown CA."""
    _, url = tls_agent
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, auth=(USER, PASSWORD), timeout=5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_versions_below_1_2_are_refused(tls_agent):
    port, _ = tls_agent
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                tls.recv(1)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl(tls_agent, pki):
    _, url = tls_agent
    base = ["curl", "-sS", "--cacert", str(pki / "ca.crt"), "-o", "/dev/null", "-w", "%{http_code}"]
    ok = subprocess.run([*base, "-u", f"{USER}:{PASSWORD}", url], capture_output=True, text=True, timeout=10)
    assert ok.stdout == "200", ok.stderr
    bad = subprocess.run([*base, "-u", f"{USER}:nope", url], capture_output=True, text=True, timeout=10)
    assert bad.stdout == "401"
    body = subprocess.run(["curl", "-sS", "--cacert", str(pki / "ca.crt"), "-u", f"{USER}:{PASSWORD}", url],
                          capture_output=True, text=True, timeout=10)
    assert "connwatch_ready 1" in body.stdout
    insecure_plain = subprocess.run(["curl", "-sS", url.replace("https", "http")], capture_output=True,
                                    text=True, timeout=10)
    assert "connwatch_" not in insecure_plain.stdout


def test_wrong_password_flood_does_not_starve_scrapes(tls_agent, pki):
    """bcrypt is slow on purpose; wrong passwords must not keep a good scraper out."""
    _, url = tls_agent
    ca = str(pki / "ca.crt")
    stop = threading.Event()

    rejected = threading.Semaphore(0)

    def flood():
        n = 0
        while not stop.is_set():
            assert requests.get(url, auth=(USER, f"guess{n}"), verify=ca, timeout=10).status_code == 401
            rejected.release()
            n += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(8):
            pool.submit(flood)
        try:
            for _ in range(8):  # the flood is on: wrong passwords are being bcrypt-checked
                assert rejected.acquire(timeout=10)
            for _ in range(5):
                t0 = time.monotonic()
                r = requests.get(url, auth=(USER, PASSWORD), verify=ca, timeout=10)
                assert r.status_code == 200
                assert time.monotonic() - t0 < 2.0
        finally:
            stop.set()


# ---- client certificates (RequireAndVerifyClientCert) on the same server code --------------


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("mtls")
    yml = d / "web.yml"
    yml.write_text(
        "tls_server_config:\n"
        f"  cert_file: {pki / 'server.crt'}\n"
        f"  key_file: {pki / 'server.key'}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {pki / 'ca.crt'}\n"
        "  min_version: TLS13\n")
    registry = CollectorRegistry()
    Gauge("mtls_test_up", "test gauge", registry=registry).set(1)
    server = web.MetricsServer("127.0.0.1:0", "/metrics", registry, webconfig.load(str(yml)))
    server.start()
    yield f"https://127.0.0.1:{server.address[1]}/metrics", server.address[1]
    server.stop()


def test_client_cert_accepted(mtls_server, pki):
    url, _ = mtls_server
    r = requests.get(url, cert=(str(pki / "client.crt"), str(pki / "client.key")),
                     verify=str(pki / "ca.crt"), timeout=5)
    assert r.status_code == 200 and "mtls_test_up 1.0" in r.text


@pytest.mark.parametrize("cert", [None, "rogue-client"])
def test_missing_or_untrusted_client_cert_refused(mtls_server, pki, cert):
    url, _ = mtls_server
    kwargs = {"cert": (str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))} if cert else {}
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        requests.get(url, verify=str(pki / "ca.crt"), timeout=5, **kwargs)


def test_min_version_tls13_refuses_tls12(mtls_server, pki):
    _, port = mtls_server
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                tls.recv(1)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_client_cert(mtls_server, pki):
    url, _ = mtls_server
    base = ["curl", "-sS", "--cacert", str(pki / "ca.crt"), url]
    ok = subprocess.run([*base, "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")],
                        capture_output=True, text=True, timeout=10)
    assert "mtls_test_up 1.0" in ok.stdout, ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=10)
    assert refused.returncode != 0 and "mtls_test_up" not in refused.stdout


def _serial(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()["serialNumber"]


def test_rotated_certificate_is_picked_up_without_restart(pki, tmp_path, caplog):
    """cert-manager and friends replace the files; new connections get the new certificate,
    and a half-written pair keeps the previous one in service."""
    from conftest import wait_for

    make_cert(pki, "server2", "ca", san="IP:127.0.0.1")
    for src, dst in (("server.crt", "tls.crt"), ("server.key", "tls.key")):
        shutil.copy(pki / src, tmp_path / dst)
    (tmp_path / "web.yml").write_text("tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n")
    registry = CollectorRegistry()
    server = web.MetricsServer("127.0.0.1:0", "/metrics", registry, webconfig.load(str(tmp_path / "web.yml")))
    server.start()
    port = server.address[1]
    try:
        first = _serial(port, pki / "ca.crt")
        for src, dst in (("server2.key", "tls.key"), ("server2.crt", "tls.crt")):
            shutil.copy(pki / src, tmp_path / (dst + ".new"))
            os.replace(tmp_path / (dst + ".new"), tmp_path / dst)
        second = wait_for(lambda: (s := _serial(port, pki / "ca.crt")) != first and s, timeout=10,
                          what="the rotated certificate to be served")
        caplog.set_level("WARNING", logger="connwatch.webconfig")
        (tmp_path / "tls.crt").write_text("half-written\n")
        wait_for(lambda: _serial(port, pki / "ca.crt") and "do not load" in caplog.text, timeout=10,
                 what="the broken files to be tried")
        assert _serial(port, pki / "ca.crt") == second  # still serving the last good pair
    finally:
        server.stop()
