"""The `fastgate` command line: exit codes, output, and what `run`/`proxy` hand to the server."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import types

import pytest

import fastgate
from fastgate.cli import main
from fastgate.config.schema import Config

ROOT = pathlib.Path(__file__).resolve().parents[2]

GOOD = """\
entrypoints:
  web: {address: "127.0.0.1:18080"}
routes:
  - name: api
    match: {hosts: [api.example.com, "*.example.org"], path: /v1, methods: [get, post]}
    priority: 3
    service: api
  - match: {path: '^/static/', path_type: regex}
    service: static
services:
  api:
    servers:
      - url: http://127.0.0.1:19000
        weight: 2
      - url: http://127.0.0.1:19001
    timeouts: {upstream_response: 5}
    pool: {max_idle: 8}
  static:
    servers: [{url: "http://127.0.0.1:19002"}]
admin: {enabled: false}
"""

BAD = """\
entrypoints:
  web: {address: "127.0.0.1:18080"}
routes:
  - service: x
  - match: {path_type: glob}
    service: api
services:
  api: {servers: [{url: "http://127.0.0.1:19000"}]}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FASTGATE_"):
            monkeypatch.delenv(name)


overrides_seen: list[dict[str, object] | None] = []


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, str | None]]:
    """Stands in for fastgate.server.supervisor; records what `serve` was given."""
    calls: list[tuple[Config, str | None]] = []
    overrides_seen.clear()

    def serve(
        config: Config, config_path: str | None, overrides: dict[str, object] | None = None
    ) -> int:
        calls.append((config, config_path))
        overrides_seen.append(overrides)
        return 0

    module = types.ModuleType("fastgate.server.supervisor")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastgate.server.supervisor", module)
    return calls


def write(tmp_path: pathlib.Path, text: str, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"fastgate {fastgate.__version__}\n"


def test_version_matches_the_package_metadata() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert fastgate.__version__ == project["version"]


def test_check_summarizes_a_valid_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"config: {path}"
    assert "  web: 127.0.0.1:18080" in lines
    assert (
        "  api: api.example.com,*.example.org /v1 (prefix) GET,POST -> api  [priority 3]"
    ) in lines
    assert "  route-1: * ^/static/ (regex) ANY -> static" in lines
    assert "  api: http://127.0.0.1:19000 (weight 2), http://127.0.0.1:19001" in lines
    assert (
        "    timeouts: connect 5s, response 5s, idle 60s; pool: 8 idle, closed after 60s" in lines
    )
    assert "admin: disabled" in lines
    assert lines[-1] == "ok"


def test_check_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "config: embedded default\n" in out
    assert "  demo: * / (prefix) ANY -> demo\n" in out
    assert "demo origin: 127.0.0.1:8081\n" in out


def test_check_compiles_the_runtime_too(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Valid for the schema, refused when compiled: the middleware type does not exist.
    text = GOOD.replace("    service: api\n", "    middlewares: [m]\n    service: api\n", 1)
    text += "middlewares:\n  m: {type: no_such_type}\n"
    assert main(["check", "-c", write(tmp_path, text)]) == 2
    _, err = capsys.readouterr()
    assert "error: middlewares.m.type: unknown type 'no_such_type'" in err


def test_check_reports_every_error_and_exits_2(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-c", write(tmp_path, BAD)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: routes[0].service: unknown service 'x'",
        "error: routes[1].match.path_type: Input should be 'exact', 'prefix' or 'regex' "
        "(got 'glob')",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["-c", "/nonexistent/gw.yaml"],
            "error: /nonexistent/gw.yaml: cannot read:",
            id="missing file",
        ),
        pytest.param(["-c", "gw.ini"], "error: gw.ini: unknown file type", id="wrong type"),
    ],
)
def test_check_file_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", *args]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_check_uses_fastgate_config(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("FASTGATE_CONFIG", path)
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith(f"config: {path}\n")


def test_check_applies_and_names_environment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTGATE_WORKERS", "many")
    monkeypatch.setenv("FASTGATE_WROKERS", "2")
    assert main(["check", "-c", write(tmp_path, GOOD)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "warning: unknown environment variable FASTGATE_WROKERS ignored; "
        "did you mean FASTGATE_WORKERS?",
        "error: FASTGATE_WORKERS: expected an integer, got 'many'",
    ]


def test_run_hands_the_config_to_serve(
    tmp_path: pathlib.Path, served: list[tuple[Config, str | None]]
) -> None:
    path = write(tmp_path, GOOD)
    assert main(["run", "-c", path]) == 0
    ((config, config_path),) = served
    assert config_path == path
    assert config.routes[0].name == "api"


def test_run_command_line_beats_environment(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    served: list[tuple[Config, str | None]],
) -> None:
    monkeypatch.setenv("FASTGATE_WORKERS", "3")
    monkeypatch.setenv("FASTGATE_LISTEN", "127.0.0.1:18081")
    monkeypatch.setenv("FASTGATE_MAX_BODY_BYTES", "1000")
    path = write(tmp_path, GOOD)
    assert main(["run", "-c", path, "--workers", "2", "--listen", "127.0.0.1:18082"]) == 0
    ((config, _),) = served
    assert config.workers == 2
    assert config.entrypoints["web"].address == "127.0.0.1:18082"
    assert config.limits.max_body_bytes == 1000
    # handed on, so that a reload of the file keeps them
    assert overrides_seen == [{"workers": 2, "listen": "127.0.0.1:18082"}]


def test_run_embedded_default(served: list[tuple[Config, str | None]]) -> None:
    assert main(["run"]) == 0
    ((config, config_path),) = served
    assert config_path is None
    assert config.demo_origin.enabled


def test_run_config_error_exits_2_without_serving(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[Config, str | None]],
) -> None:
    assert main(["run", "-c", write(tmp_path, BAD)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: routes[0].service: unknown service 'x'\n")
    assert "Traceback" not in err
    assert served == []


def test_run_listen_refused_with_several_entrypoints(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[Config, str | None]],
) -> None:
    text = GOOD.replace(
        '  web: {address: "127.0.0.1:18080"}',
        '  web: {address: "127.0.0.1:18080"}\n  other: {address: "127.0.0.1:18090"}',
    )
    assert main(["run", "-c", write(tmp_path, text), "--listen", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: override 'listen': the config has several entrypoints (web, other)"
    )
    assert served == []


def test_proxy_builds_a_one_route_config(
    monkeypatch: pytest.MonkeyPatch, served: list[tuple[Config, str | None]]
) -> None:
    monkeypatch.setenv("FASTGATE_LISTEN", "127.0.0.1:1")
    monkeypatch.setenv("FASTGATE_WORKERS", "5")
    monkeypatch.setenv("FASTGATE_UPSTREAM_CONNECT_TIMEOUT", "0.5")
    argv = ["proxy", "--listen", "18000", "--to", "127.0.0.1:19000"]
    assert main([*argv, "--to", "http://127.0.0.1:19001", "--workers", "2"]) == 0
    ((config, config_path),) = served
    assert config_path is None
    assert config.entrypoints["web"].address == "127.0.0.1:18000"  # command line over env
    assert config.workers == 2
    assert config.timeouts.upstream_connect == 0.5  # env still applies to the rest
    assert [s.url for s in config.services["upstream"].servers] == [
        "http://127.0.0.1:19000",
        "http://127.0.0.1:19001",
    ]
    assert [(r.name, r.match.path, r.service) for r in config.routes] == [
        ("proxy", "/", "upstream")
    ]


def test_proxy_workers_from_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch, served: list[tuple[Config, str | None]]
) -> None:
    monkeypatch.setenv("FASTGATE_WORKERS", "5")
    assert main(["proxy", "--listen", "127.0.0.1:18000", "--to", "http://127.0.0.1:1"]) == 0
    assert served[0][0].workers == 5


def test_proxy_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--listen", "127.0.0.1:18000", "--to", "ftp://x"]) == 2
    assert capsys.readouterr().err == (
        "error: services.upstream.servers[0].url: scheme must be http:// (or https://), "
        "got 'ftp://x'\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no command"),
        pytest.param(["serve"], id="unknown command"),
        pytest.param(["run", "--workers", "-1"], id="negative workers"),
        pytest.param(["proxy", "--listen", "1"], id="proxy without --to"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: fastgate" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_python_dash_m_check(tmp_path: pathlib.Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    good = subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", write(tmp_path, GOOD)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (good.returncode, good.stderr) == (0, "")
    assert good.stdout.endswith("ok\n")
    bad = subprocess.run(
        [sys.executable, "-m", "fastgate", "check", "-c", write(tmp_path, BAD, "bad.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0] == "error: routes[0].service: unknown service 'x'"
    assert "Traceback" not in bad.stderr
