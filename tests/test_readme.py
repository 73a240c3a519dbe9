"""The README's set-up and usage commands, run as a newcomer would.

Every command in a code block of "Set up" and "Using it" must have a way to
run here (COMMANDS), so a command added to the README without one fails
`test_every_readme_command_is_covered`. How they run:

- `make install` for real, into a temporary PREFIX rather than the shared
  host's /usr/local; the `connwatch` commands then run from PATH through the
  link it made, as written;
- `make run` with the README's ARGS, for real, plus --web.listen-address
  with a free port (9476 may be taken on a shared host); `curl` and
  `connwatch top` run against it with that port in place of 9476;
- what cannot run inside the test suite (`make test` itself, `make clean`,
  which deletes the virtualenv the suite runs in, `make clean-cache`, which
  deletes caches other checkouts share): `make -n` must know it, as it must
  know every `make` target the README names anywhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RUN_ARGS = "--config.file packaging/debian/connwatch.yml --log.level debug"
DEFAULT_PORT = "9476"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def code_lines(text: str) -> list[str]:
    """Lines of the indented code blocks, without their comments."""
    return [re.sub(r"\s+#.*$", "", line[4:]).strip() for line in text.splitlines()
            if line.startswith("    ") and line.strip()]


def readme_commands() -> list[str]:
    """The commands to run; synopses (`connwatch run [--flag X]`) are checked against --help instead."""
    lines = code_lines(section("Set up") + section("Using it"))
    return [line for line in lines if "[" not in line and not line.startswith("--")]


def synopses() -> dict[str, list[str]]:
    """connwatch subcommand -> the flags its synopsis in "Using it" shows."""
    flags: dict[str, list[str]] = {}
    command = None
    for line in code_lines(section("Using it")):
        if "[" not in line:
            continue
        words = line.split()
        if words[0] == "connwatch":
            command = words[1]
        flags.setdefault(command, []).extend(re.findall(r"\[(--[\w.-]+)", line))
    return flags


def sh(command: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- set-up: make install, make run -------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The environment after `make install`: connwatch on PATH through its link."""
    prefix = tmp_path_factory.mktemp("prefix")
    result = subprocess.run(["make", "install", f"PREFIX={prefix}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(prefix / "bin" / "connwatch") == str(ROOT / ".venv" / "bin" / "connwatch")
    return {**os.environ, "PATH": f"{prefix / 'bin'}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def make_run(installed, tmp_path_factory):
    """`make run ARGS="..."` as the README shows it, on a free port; the port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("make_run") / "log"  # --log.level debug writes a lot
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "run", f"ARGS={RUN_ARGS} --web.listen-address=127.0.0.1:{port}"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def ready() -> bool:
        assert proc.poll() is None, f"make run exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return "\nconnwatch_ready 1.0\n" in r.read().decode()
        except OSError:
            return False

    try:
        wait_for(ready, timeout=120, interval=0.5, what="the agent of make run to be ready")
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the agent it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_against_agent(command: str, port: int) -> str:
    """The command for the agent of `make run`: its port in place of 9476,
    and `connwatch top` pointed at it (its default is localhost:9476)."""
    command = command.replace(f":{DEFAULT_PORT}", f":{port}")
    if command.startswith("connwatch top"):
        command += f" --agent localhost:{port}"
    return command


# ---- every command, and how it runs here ---------------------------------------------------


def check_make_n(command: str, env: dict, port: int) -> None:
    result = sh(f"make -n {command.removeprefix('make ')}", env)
    assert result.returncode == 0, result.stderr


def check_make_install(command: str, env: dict, port: int) -> None:
    # the `installed` fixture ran it: `connwatch` is now the checkout's, from PATH
    found = sh("command -v connwatch", env).stdout.strip()
    assert os.path.realpath(found) == os.path.realpath(ROOT / ".venv" / "bin" / "connwatch"), found


def check_make_run(command: str, env: dict, port: int) -> None:
    # the `make_run` fixture runs it, with the README's ARGS: still serving
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert "\nconnwatch_ready 1.0\n" in r.read().decode()


def check_curl(command: str, env: dict, port: int) -> None:
    result = sh(run_against_agent(command, port), env)
    assert result.returncode == 0, result.stderr
    assert "\nconnwatch_ready 1.0\n" in result.stdout


def check_top_live(command: str, env: dict, port: int) -> None:
    # not a terminal: frames follow each other; the first one is enough here
    # (tests/test_top.py drives the live view in a real terminal)
    result = sh(run_against_agent(command, port) + " | head -n 1", env, timeout=60)
    assert result.stdout.startswith(f"connwatch top  http://localhost:{port}/metrics  "), result.stderr
    assert result.stderr == ""


def check_top_once(command: str, env: dict, port: int) -> None:
    result = sh(run_against_agent(command, port), env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Processes by fd usage" in result.stdout and "Listeners by accept-queue fill" in result.stdout
    # the agent of make run is among the listeners it knows
    assert any(line.split()[2:3] == [str(port)] for line in result.stdout.splitlines()), result.stdout


def check_help(command: str, env: dict, port: int) -> None:
    result = sh(command, env)
    assert result.returncode == 0, result.stderr
    assert "{run,doctor,top}" in result.stdout


def check_doctor(command: str, env: dict, port: int) -> None:
    result = sh(command, env)
    assert result.returncode in (0, 1), result.stderr  # 1: a limit is short of the target
    assert result.stderr == ""
    if "--json" in command:
        assert json.loads(result.stdout)["target_connections"] == 100000
    else:
        assert "limits between this host and 100000 connections" in result.stdout


COMMANDS = {
    "make install": check_make_install,
    "make run": check_make_run,
    "make test": check_make_n,
    "make clean": check_make_n,
    "make clean-cache": check_make_n,
    "curl localhost:9476/metrics": check_curl,
    "connwatch top": check_top_live,
    "connwatch --help": check_help,
    "connwatch doctor": check_doctor,
    "connwatch doctor --json": check_doctor,
    "connwatch top --once": check_top_once,
}


def test_every_readme_command_is_covered():
    assert sorted(readme_commands()) == sorted(COMMANDS)


def test_readme_commands_run(installed, make_run):
    # concurrently: doctor walks every process's fds, which takes a while on a busy host
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {command: pool.submit(COMMANDS[command], command, installed, make_run)
                   for command in readme_commands()}
    for command, future in futures.items():
        try:
            future.result()
        except AssertionError as e:
            pytest.fail(f"README command `{command}`: {e}")


def test_the_make_run_example_is_the_readme_s():
    assert f'`make run ARGS="{RUN_ARGS}"`' in " ".join(README.split())


def test_every_make_target_the_readme_names_exists():
    targets = sorted(set(re.findall(r"\bmake ([a-z][a-z-]*)", README)))
    assert {"install", "run", "test", "clean", "clean-cache"} <= set(targets)
    for target in targets:
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"make {target}: {result.stderr}"


def test_synopses_show_real_flags():
    shown = synopses()
    assert set(shown) == {"run", "doctor", "top"}
    for command, flags in shown.items():
        help_text = subprocess.run([str(ROOT / ".venv/bin/connwatch"), command, "--help"], capture_output=True,
                                   text=True, timeout=60, check=True).stdout
        for flag in flags:
            assert flag in help_text, f"connwatch {command} has no {flag}"


def test_make_clean_and_clean_cache_remove_what_the_readme_lists():
    clean = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for path in (".venv", "agent/connwatch/bpf/", "build", "tests/node/node_modules", "agent/connwatch.egg-info",
                 ".pytest_cache", ".hypothesis", "/usr/local/bin/connwatch"):
        assert path in clean, path
    cache = subprocess.run(["make", "-n", "clean-cache"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    for path in ("/var/cache/connwatch-test", "/var/cache/connwatch/kernels", "localhost/connwatch:test",
                 "localhost/connwatch-base"):
        assert path in cache, path
