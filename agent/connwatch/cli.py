"""Command line: `connwatch run` (the agent), `connwatch doctor` (a diagnosis).

Flags follow node_exporter's style. Every error a user can cause ends with
one line on stderr that says what to do, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"connwatch: error: {message} (see connwatch --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="connwatch", description="eBPF connection-capacity agent for Prometheus.")
    p.add_argument("--version", action="version", version=f"connwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{run,doctor}", parser_class=_Parser)

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
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level={"warn": "WARNING"}.get(level, level.upper()),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
                        stream=sys.stderr)


def _fail(message: str) -> int:
    print(f"connwatch: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run(args) -> int:
    from . import config, webconfig
    from .agent import Agent, StartupError, preflight
    from .probes import ProbeError

    _setup_logging(args.log_level)
    try:
        cfg = config.load(args.config_file)
        web_cfg = webconfig.load(args.web_config_file)
        preflight()
        agent = Agent(cfg, args.listen_address, args.telemetry_path, web_cfg)
    except (config.ConfigError, StartupError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot listen on {args.listen_address}: {e.strerror}")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    if args.command == "doctor":
        return _doctor(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
