"""Command line: `connwatch run` (the agent), `connwatch doctor` (a diagnosis),
`connwatch top` (a live view of a running agent).

Flags follow node_exporter's style. Every error a user can cause ends with
one line on stderr that says what to do, and exit code 2. Output into a pipe
whose reader has gone (`connwatch doctor --json | head`) ends quietly, as it
does for any Unix tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__

EXIT_USAGE = 2
# What a shell reports for a process killed by SIGPIPE (`yes | head`), so
# `set -o pipefail` scripts see connwatch end like any other tool.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

COMMANDS = ("run", "doctor", "top")
DEFAULT_TOP_AGENT = "http://localhost:9476/metrics"
# where `connwatch top` takes the basic-auth password from (never a flag:
# every user on the host can read a command line)
BASIC_AUTH_PASSWORD_ENV = "CONNWATCH_BASIC_AUTH_PASSWORD"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --web.listen is a typo, not a prefix
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"connwatch: error: {_one_line(message)} (see connwatch --help)\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="connwatch", description="eBPF connection-capacity agent for Prometheus.")
    p.add_argument("--version", action="version", version=f"connwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{run,doctor,top}", parser_class=_Parser)

    run = sub.add_parser("run", help="attach the probes and serve Prometheus metrics (default)")
    run.add_argument("--web.listen-address", dest="listen_address", default=":9476",
                     help="address to serve metrics on (default :9476)")
    run.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                     help="path under which to expose metrics (default /metrics)")
    run.add_argument("--web.config.file", dest="web_config_file", default=None,
                     help="exporter-toolkit web config: TLS and basic auth")
    run.add_argument("--config.file", dest="config_file", default=None,
                     help="YAML configuration file (see docs/configuration.md)")
    run.add_argument("--log.level", dest="log_level", default="info",
                     choices=["debug", "info", "warn", "error"], help="log level (default info)")

    doctor = sub.add_parser("doctor", help="diagnose the limits between this host and N connections")
    doctor.add_argument("--target-connections", type=int, default=100000, metavar="N",
                        help="connections the host should hold (default 100000)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")

    top = sub.add_parser("top", help="live view of a running agent: who is nearest a limit (no privileges needed)")
    top.add_argument("--agent", default=DEFAULT_TOP_AGENT, metavar="URL",
                     help=f"the agent's metrics URL; host:port will do (default {DEFAULT_TOP_AGENT})")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--web.tls-ca", dest="tls_ca", metavar="FILE",
                     help="CA certificates to verify the agent's certificate with (default: the system's)")
    top.add_argument("--web.tls-cert", dest="tls_cert", metavar="FILE",
                     help="client certificate, for an agent whose web config verifies them")
    top.add_argument("--web.tls-key", dest="tls_key", metavar="FILE",
                     help="the client certificate's key (default: in the --web.tls-cert file)")
    top.add_argument("--web.tls-insecure-skip-verify", dest="tls_insecure_skip_verify", action="store_true",
                     help="do not verify the agent's certificate")
    top.add_argument("--web.basic-auth-user", dest="basic_auth_user", metavar="USER",
                     help=f"basic auth user; the password is read from ${BASIC_AUTH_PASSWORD_ENV} or "
                          "--web.basic-auth-password-file")
    top.add_argument("--web.basic-auth-password-file", dest="basic_auth_password_file", metavar="FILE",
                     help="file holding the basic auth password (trimmed, like Prometheus' password_file)")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level={"warn": "WARNING"}.get(level, level.upper()),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
                        stream=sys.stderr)


def _fail(message: str) -> int:
    print(f"connwatch: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


GRANT_HINT = ("run it as root, or grant them: systemd AmbientCapabilities=CAP_BPF CAP_PERFMON "
              "CAP_DAC_READ_SEARCH, docker run --cap-add BPF --cap-add PERFMON, "
              "Kubernetes securityContext.capabilities.add [BPF, PERFMON]")


def check_privileges() -> None:
    """Loading tracing programs needs CAP_BPF and CAP_PERFMON (CAP_SYS_ADMIN implies both)."""
    from . import caps
    from .agent import StartupError

    try:
        eff = caps.current()["effective"]
    except OSError:
        return  # cannot tell: let the load itself report
    if "CAP_SYS_ADMIN" in eff:
        return
    missing = sorted({"CAP_BPF", "CAP_PERFMON"} - eff)
    if missing:
        raise StartupError(f"missing capabilit{'ies' if len(missing) > 1 else 'y'} "
                           f"{' and '.join(missing)} to load the BPF programs: {GRANT_HINT}")


def _listen_error(address: str, e: OSError) -> str:
    reason = e.strerror or str(e)
    if isinstance(e, PermissionError):
        reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return f"--web.listen-address {address}: cannot listen: {reason}"


def _run(args) -> int:
    from . import config, webconfig

    _setup_logging(args.log_level)
    if not args.telemetry_path.startswith("/") or any(c.isspace() for c in args.telemetry_path):
        return _fail(f"--web.telemetry-path {args.telemetry_path!r}: must be a path starting with /")
    try:
        cfg = config.load(args.config_file)
        web_cfg = webconfig.load(args.web_config_file)
    except config.ConfigError as e:
        return _fail(str(e))
    # the heavy imports (libbpf, prometheus_client) only once the files are fine
    from .agent import Agent, StartupError, preflight
    from .probes import ProbeError
    from .web import parse_listen_address

    try:
        parse_listen_address(args.listen_address)
        preflight()
        check_privileges()
    except (config.ConfigError, StartupError, ValueError) as e:
        return _fail(str(e))
    try:
        agent = Agent(cfg, args.listen_address, args.telemetry_path, web_cfg)
    except (config.ConfigError, StartupError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(_listen_error(args.listen_address, e))
    try:
        agent.run_forever()
    except ProbeError as e:
        return _fail(str(e))
    return 0


def _doctor(args) -> int:
    from . import doctor

    if args.target_connections < 1:
        return _fail("--target-connections must be at least 1")
    return doctor.main(args.target_connections, as_json=args.json)


def _top(args) -> int:
    from . import top  # rich only for this command: the agent does not carry it

    try:
        url = top.agent_url(args.agent)
        agent = top.Agent(
            url, top.tls_context(url, args.tls_ca, args.tls_cert, args.tls_key, args.tls_insecure_skip_verify),
            client_cert=bool(args.tls_cert),
            authorization=top.basic_auth(args.basic_auth_user, args.basic_auth_password_file))
        return top.run(agent, once=args.once)
    except top.TopError as e:
        return _fail(str(e))


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # what is still buffered must fail here, where it is handled, not
            # in the interpreter's own flush at exit
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of stdout or stderr went away: stop without a word.

    Python ignores SIGPIPE and raises BrokenPipeError instead of dying
    quietly. Both streams now point at /dev/null, so that nothing written or
    flushed on the way out can fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `connwatch --web.listen-address=...` means `connwatch run --web.listen-address=...`
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "top":
        return _top(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
