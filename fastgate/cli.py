"""The `fastgate` command: run, proxy, check, version.

Configuration problems are the user's to fix, not bugs: they are printed one per line as
`error: key.path: reason` on stderr with exit status 2, never as a traceback. The server is
imported only by the commands that serve, so `check` works on a machine without the compiled
core.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from fastgate import __version__
from fastgate.errors import ConfigError

EXIT_CONFIG = 2


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = CPU count), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgate",
        description="An API gateway and reverse proxy.",
        epilog="Settings: defaults < config file < FASTGATE_* variables < command line. "
        "See docs/configuration.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = "YAML or TOML config file (default: $FASTGATE_CONFIG, else the embedded default)"

    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", metavar="FILE", help=config_help)
    run.add_argument("--workers", type=_workers, metavar="N", help="worker processes; 0 = CPUs")
    run.add_argument("--listen", metavar="ADDR", help="address of the (single) entrypoint")

    proxy = sub.add_parser("proxy", help="proxy one address to upstream URLs, no config file")
    proxy.add_argument("--listen", required=True, metavar="ADDR", help="host:port or a port")
    proxy.add_argument(
        "--to", required=True, action="append", metavar="URL", help="upstream (repeatable)"
    )
    proxy.add_argument("--workers", type=_workers, metavar="N", help="worker processes")

    check = sub.add_parser("check", help="validate a config file and summarize it")
    check.add_argument("-c", "--config", metavar="FILE", help=config_help)

    sub.add_parser("version", help="print the version")
    return parser


def _config_path(args: argparse.Namespace) -> str | None:
    return args.config or os.environ.get("FASTGATE_CONFIG") or None


def _load(build: Callable[[], object]) -> object:
    """Run a config-building call, printing its warnings as `warning: ...` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return build()
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


def _print_errors(exc: ConfigError) -> int:
    for line in exc.lines():
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_check(args: argparse.Namespace) -> int:
    from fastgate.config import load_config
    from fastgate.config.explain import summarize

    path = _config_path(args)
    config = _load(lambda: load_config(path))
    # Compile it too, as each worker would: middleware options, router rules, upstreams.
    try:
        from fastgate.config.compile import check_runtime
    except ImportError as exc:  # the compiled core is not built: schema checks only
        print(f"warning: runtime checks skipped ({exc})", file=sys.stderr)
    else:
        _load(lambda: check_runtime(config))
    for line in summarize(config, path or "embedded default"):  # type: ignore[arg-type]
        print(line)
    print("ok")
    return 0


def _serve(config: object, path: str | None, overrides: dict[str, object]) -> int:
    from fastgate.server.supervisor import serve

    # The overrides go along so that a reload of the file re-applies them.
    return serve(config, path, overrides=overrides)  # type: ignore[arg-type]


def _cmd_run(args: argparse.Namespace) -> int:
    from fastgate.config import load_config

    path = _config_path(args)
    overrides = {"workers": args.workers, "listen": args.listen}
    config = _load(lambda: load_config(path, overrides=overrides))
    return _serve(config, path, overrides)


def _cmd_proxy(args: argparse.Namespace) -> int:
    from fastgate.config import build_config, proxy_config

    data = proxy_config(args.listen, args.to, args.workers)
    # The command-line values go in again as overrides, so FASTGATE_* variables cannot
    # replace what was typed on the command line.
    overrides = {"workers": args.workers, "listen": data["entrypoints"]["web"]["address"]}
    config = _load(lambda: build_config(data, overrides=overrides, interpolate=False))
    return _serve(config, None, overrides)


_COMMANDS = {"run": _cmd_run, "proxy": _cmd_proxy, "check": _cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastgate` command and `python -m fastgate`; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    if args.command == "version":
        print(f"fastgate {__version__}")
        return 0
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        return _print_errors(exc)
