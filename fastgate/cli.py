"""The `fastgate` command: run, proxy, check, audit, version, consumers, keys.

Configuration problems are the user's to fix, not bugs: they are printed one per line as
`error: key.path: reason` on stderr with exit status 2, never as a traceback. The server is
imported only by the commands that serve, so `check` works on a machine without the compiled
core.

`consumers` and `keys` edit the consumer store (fastgate.auth.consumers); a running gateway
sees each change within a second. Their errors are one `error: ...` line with exit status 1.
A new API key is printed once, alone on stdout, and never again: `keys list` shows ids only.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fastgate import __version__
from fastgate.errors import ConfigError

if TYPE_CHECKING:
    from fastgate.auth.consumers import ConsumerStore, KeyInfo

EXIT_ERROR = 1
EXIT_CONFIG = 2
_DURATION = re.compile(r"([1-9][0-9]*)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = CPU count), got {text!r}")
    return value


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30d, 12h, 15m or 3600s: {text!r}"
        )
    return int(match[1]) * _UNITS[match[2]]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _store_commands(sub: argparse._SubParsersAction) -> None:
    """`consumers` and `keys`: each action takes `--store` (default: default_store_path())."""
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        metavar="PATH",
        help="consumer store file (default: $FASTGATE_DATA_DIR/consumers.db, else "
        "/var/lib/fastgate/consumers.db for root, else ~/.local/share/fastgate/consumers.db)",
    )

    consumers = sub.add_parser("consumers", help="manage the consumers of API keys and passwords")
    actions = consumers.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[store], help="add a consumer (creates the store)")
    add.add_argument("name", metavar="NAME")
    for option in ("groups", "roles", "scopes"):
        add.add_argument(
            f"--{option}", type=_names, default=[], metavar="A,B", help=f"comma-separated {option}"
        )
    listing = actions.add_parser("list", parents=[store], help="list the consumers")
    listing.add_argument("--json", action="store_true", help="print JSON")
    remove = actions.add_parser("remove", parents=[store], help="remove a consumer and its keys")
    remove.add_argument("name", metavar="NAME")
    passwd = actions.add_parser("passwd", parents=[store], help="set a consumer's password")
    passwd.add_argument("name", metavar="NAME")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )

    keys = sub.add_parser("keys", help="manage API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[store], help="make a key (printed once)")
    add.add_argument("consumer", metavar="CONSUMER")
    add.add_argument("--label", metavar="L", help="a note to tell keys apart")
    add.add_argument("--expires", type=_duration, metavar="AGE", help="e.g. 30d, 12h, 3600s")
    listing = actions.add_parser("list", parents=[store], help="list keys (never their secrets)")
    listing.add_argument("consumer", nargs="?", metavar="CONSUMER")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", parents=[store], help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")


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

    audit = sub.add_parser("audit", help="report the security posture of a config file")
    audit.add_argument("-c", "--config", metavar="FILE", help=config_help)
    audit.add_argument(
        "--format", choices=("text", "json"), default="text", help="text (default) or json"
    )
    audit.add_argument(
        "--fail-on",
        choices=("none", "info", "low", "medium", "high", "critical"),
        default="none",
        metavar="SEVERITY",
        help="none (default: exit 0), info, low, medium, high or critical: exit 1 when a "
        "finding is at SEVERITY or above",
    )

    sub.add_parser("version", help="print the version")
    _store_commands(sub)
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


def _cmd_audit(args: argparse.Namespace) -> int:
    """The posture report (fastgate/audit.py); the file is read raw as well, to tell a secret
    written in it from one taken from `${VAR}`. Only key paths are printed, never values."""
    from fastgate.audit import audit, format_text
    from fastgate.config.loader import build_config, read_config_file

    path = _config_path(args)
    raw = read_config_file(path)
    config = _load(lambda: build_config(raw))
    report = audit(config, raw, path or "embedded default")  # type: ignore[arg-type]
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(format_text(report)))
    return 1 if report.fails(args.fail_on) else 0


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


def _open_store(args: argparse.Namespace, create: bool = False) -> ConsumerStore:
    from fastgate.auth.consumers import ConsumerStore, default_store_path

    return ConsumerStore(args.store or default_store_path(), create=create)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _joined(names: frozenset[str]) -> str:
    return ",".join(sorted(names)) or "-"


def _consumers(args: argparse.Namespace) -> int:
    action = args.action
    with _open_store(args, create=action == "add") as store:
        if action == "add":
            store.add_consumer(args.name, args.groups, args.roles, args.scopes)
            print(f"added consumer {args.name} to {store.path}")
        elif action == "remove":
            if not store.remove_consumer(args.name):
                raise ValueError(f"no consumer {args.name!r}")
            print(f"removed consumer {args.name} and its keys")
        elif action == "passwd":
            if store.get_consumer(args.name) is None:
                raise ValueError(f"no consumer {args.name!r}")
            store.set_password(args.name, _read_password(args))
            print(f"password set for {args.name}")
        else:
            _list_consumers(store, args.json)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass(f"Password for {args.name}: ")
            if getpass.getpass("Again: ") != password:
                raise ValueError("the passwords do not match")
        except EOFError:
            raise ValueError("no password given (use --password-stdin to pipe one)") from None
    if not password:
        raise ValueError("the password is empty")
    return password


def _list_consumers(store: ConsumerStore, as_json: bool) -> None:
    now = time.time()
    active: dict[str, int] = {}
    for key in store.list_keys():
        if key.status(now) == "active":
            active[key.consumer] = active.get(key.consumer, 0) + 1
    consumers = store.list_consumers()
    if as_json:
        doc = [
            {
                "name": c.name,
                "groups": sorted(c.groups),
                "roles": sorted(c.roles),
                "scopes": sorted(c.scopes),
                "password": store.has_password(c.name),
                "active_keys": active.get(c.name, 0),
            }
            for c in consumers
        ]
        print(json.dumps(doc, indent=2))
        return
    rows = [["NAME", "GROUPS", "ROLES", "SCOPES", "PASSWORD", "KEYS"]]
    for c in consumers:
        password = "yes" if store.has_password(c.name) else "no"
        rows.append(
            [
                c.name,
                _joined(c.groups),
                _joined(c.roles),
                _joined(c.scopes),
                password,
                str(active.get(c.name, 0)),
            ]
        )
    _table(rows)


def _keys(args: argparse.Namespace) -> int:
    action = args.action
    with _open_store(args, create=action == "add") as store:
        if action == "add":
            expires = None if args.expires is None else time.time() + args.expires
            key_id, key = store.add_key(args.consumer, args.label, expires)
            print(key, flush=True)
            print(
                f"key {key_id} for {args.consumer}: store it now, it will not be shown again",
                file=sys.stderr,
            )
        elif action == "revoke":
            if not store.revoke_key(args.key_id):
                raise ValueError(f"no active key {args.key_id!r}")
            print(f"revoked key {args.key_id}")
        else:
            if args.consumer is not None and store.get_consumer(args.consumer) is None:
                raise ValueError(f"no consumer {args.consumer!r}")
            _list_keys(store.list_keys(args.consumer), args.json)
    return 0


def _list_keys(keys: list[KeyInfo], as_json: bool) -> None:
    now = time.time()
    if as_json:
        doc = [
            {
                "key_id": k.key_id,
                "consumer": k.consumer,
                "label": k.label,
                "created": k.created,
                "expires": k.expires,
                "revoked": k.revoked,
                "status": k.status(now),
            }
            for k in keys
        ]
        print(json.dumps(doc, indent=2))
        return
    rows = [["KEY_ID", "CONSUMER", "LABEL", "CREATED", "EXPIRES", "STATUS"]]
    for k in keys:
        rows.append(
            [
                k.key_id,
                k.consumer,
                k.label or "-",
                _when(k.created),
                _when(k.expires),
                k.status(now),
            ]
        )
    _table(rows)


def _store_command(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A store command's errors (a missing store, an unknown name, a broken file) are one
    `error:` line and exit status 1, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, OSError, sqlite3.Error) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_ERROR

    return run


_COMMANDS = {
    "run": _cmd_run,
    "proxy": _cmd_proxy,
    "check": _cmd_check,
    "audit": _cmd_audit,
    "consumers": _store_command(_consumers),
    "keys": _store_command(_keys),
}


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
