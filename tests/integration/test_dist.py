"""The single-file distribution (`tools/build_dist.py`, `make dist`) runs with nothing installed.

The artifact is built once for this module (with --reuse-build: the checkout's compiled
extensions where up to date, so the smoke build takes seconds of compiling, not minutes), then
run by a fresh virtualenv's interpreter that has no packages at all, in an empty environment
(`PATH=/usr/bin:/bin`, a temporary HOME, no PYTHONPATH, a working directory outside the
checkout): whatever it imports must come from the file itself, unpacked under $HOME/.shiv or
$SHIV_ROOT. `run` serves the built-in demo origin through the gateway and stops on SIGTERM.

The build needs shiv in this interpreter's environment (a test dependency): without it the
tests skip, except under CI=true, where that is a failure. It also needs the package index
(or pip's cache) to resolve the runtime dependencies.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, get

import fastgate

BUILD_TIMEOUT = 600  # a clean build compiles every extension: minutes on a loaded 2-core box
RUN_TIMEOUT = 60
READY_TIMEOUT = 30
CLEAN_PATH = "/usr/bin:/bin"


def require_shiv() -> None:
    """pytest.skip (or pytest.fail under CI=true) when shiv is not installed here."""
    if importlib.util.find_spec("shiv") is None:
        message = (
            f"shiv is not installed for {sys.executable}: the single-file build needs it "
            "(pip install shiv; it is in the `test` extra)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Dist:
    """The built artifact and a bare interpreter to run it with."""

    artifact: Path
    python: Path  # a venv made --without-pip: the standard library and nothing else
    home: Path
    work: Path  # the working directory for runs (not the checkout)
    build_output: str

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": CLEAN_PATH, "HOME": str(self.home), **extra}

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), str(self.artifact), *args],
            env=self.env(**extra_env),
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    require_shiv()
    base = tmp_path_factory.mktemp("dist")
    artifact = base / "out" / "fastgate"
    tool = REPO / "tools" / "build_dist.py"
    started = time.monotonic()
    build = subprocess.run(
        [sys.executable, str(tool), "--out", str(artifact), "--reuse-build"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=REPO,
    )
    output = f"{build.stdout}{build.stderr}\n(build took {time.monotonic() - started:.0f} s)"
    assert build.returncode == 0, f"build failed:\n{output}"
    print(output)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    home = base / "home"
    work = base / "work"
    home.mkdir()
    work.mkdir()
    return Dist(artifact, venv / "bin" / "python", home, work, output)


def test_artifact_is_one_executable_zipapp(dist: Dist) -> None:
    assert dist.artifact.is_file()
    assert os.access(dist.artifact, os.X_OK), "the artifact is not executable"
    with dist.artifact.open("rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"
    assert "built " in dist.build_output and " MB " in dist.build_output, dist.build_output


@pytest.mark.parametrize(
    "module",
    [
        pytest.param("fastgate", id="fastgate"),
        pytest.param("uvloop", id="uvloop"),
        pytest.param("pydantic", id="pydantic"),
        pytest.param("yaml", id="pyyaml"),
    ],
)
def test_bare_interpreter_has_no_packages(dist: Dist, module: str) -> None:
    """The interpreter the artifact runs on really lacks them: the file brings its own."""
    proc = subprocess.run(
        [str(dist.python), "-c", f"import {module}"],
        env=dist.env(),
        cwd=dist.work,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize(
    "direct",
    [
        pytest.param(False, id="python-file"),
        pytest.param(True, id="shebang"),
    ],
)
def test_version(dist: Dist, direct: bool) -> None:
    if direct:
        # `#!/usr/bin/env python3` finds the bare venv's python3 first on PATH.
        proc = subprocess.run(
            [str(dist.artifact), "version"],
            env={**dist.env(), "PATH": f"{dist.python.parent}:{CLEAN_PATH}"},
            cwd=dist.work,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    else:
        proc = dist.run("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastgate {fastgate.__version__}"
    assert proc.stderr == ""


def test_unpacks_compiled_core_under_home_and_shiv_root(dist: Dist, tmp_path: Path) -> None:
    assert dist.run("version").returncode == 0
    unpacked = list((dist.home / ".shiv").glob("fastgate_*/site-packages/fastgate/_core"))
    assert len(unpacked) == 1, unpacked
    assert sorted(p.name.split(".")[0] for p in unpacked[0].glob("*.so")) == sorted(
        p.stem for p in (REPO / "fastgate" / "_core").glob("*.pyx")
    )
    root = tmp_path / "shiv-root"
    proc = dist.run("version", SHIV_ROOT=str(root))
    assert proc.returncode == 0, proc.stderr
    assert list(root.glob("fastgate_*/site-packages/uvloop"))


@pytest.mark.parametrize(
    ("config", "status", "expected"),
    [
        pytest.param(
            (REPO / "fastgate" / "config" / "default.yaml").read_text(),
            0,
            "demo origin: 127.0.0.1:8081",
            id="embedded-default",
        ),
        pytest.param(
            "entrypoints: {web: {address: '127.0.0.1:8080'}}\n"
            "routes: [{name: app, match: {path: /}, service: app}]\n"
            "services: {app: {servers: [{url: 'http://127.0.0.1:3000'}]}}\n",
            0,
            "app: http://127.0.0.1:3000",
            id="minimal",
        ),
        pytest.param(
            "routes: [{name: app, match: {path: /}, service: nowhere}]\n",
            2,
            "error: routes[0].service",
            id="unknown-service",
        ),
    ],
)
def test_check(dist: Dist, tmp_path: Path, config: str, status: int, expected: str) -> None:
    path = tmp_path / "fastgate.yaml"
    path.write_text(config)
    proc = dist.run("check", "-c", str(path))
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_consumers_and_keys(dist: Dist, tmp_path: Path) -> None:
    """The store commands: sqlite and the password/key hashing libraries from the file."""
    store = str(tmp_path / "consumers.db")
    add = dist.run("consumers", "add", "alice", "--store", store, "--scopes", "read")
    assert add.returncode == 0, add.stderr
    key = dist.run("keys", "add", "alice", "--store", store, "--label", "ci")
    assert key.returncode == 0, key.stderr
    secret = key.stdout.strip()
    assert len(secret) >= 20
    listing = dist.run("keys", "list", "alice", "--store", store, "--json")
    assert listing.returncode == 0, listing.stderr
    assert secret not in listing.stdout  # keys list shows ids only
    assert [k["consumer"] for k in json.loads(listing.stdout)] == ["alice"]


def other_python() -> str | None:
    """A working CPython >= 3.10 of another minor version (on PATH or from pyenv), if any."""
    names = [f"python3.{minor}" for minor in range(10, 16) if minor != sys.version_info[1]]
    candidates = [path for name in names if (path := shutil.which(name))]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=10)
        candidates += sorted(
            str(p) for p in Path(root.stdout.strip()).glob("versions/3.*/bin/python3")
        )
    for path in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [path, "-c", "import sys; print(sys.version_info[1])"],
                env={"PATH": CLEAN_PATH},
                capture_output=True,
                text=True,
                timeout=10,
            )
            minor = int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0
            if minor >= 10 and minor != sys.version_info[1]:  # fastgate needs Python >= 3.10
                return path
    return None


def test_another_python_minor_is_refused_clearly(dist: Dist) -> None:
    """The compiled extensions fit one CPython ABI: another one gets one error line, exit 1."""
    python = other_python()
    if python is None:
        pytest.skip("no CPython of another minor version here to try")
    proc = subprocess.run(
        [python, str(dist.artifact), "check"],
        env=dist.env(),
        cwd=dist.work,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: this fastgate file was built for CPython 3.")
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def _readyz(admin: tuple[str, int]) -> dict | None:
    try:
        conn = http.client.HTTPConnection(*admin, timeout=2)
        conn.request("GET", "/readyz")
        doc = json.loads(conn.getresponse().read())
        conn.close()
        return doc
    except (OSError, http.client.HTTPException, ValueError):
        return None


@pytest.fixture
def served(dist: Dist, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, dict, Path]]:
    """`fastgate run` from the artifact: one worker, the demo origin behind the gateway."""
    demo = f"127.0.0.1:{free_port()}"
    config = {
        "workers": 1,
        "log_level": "warning",
        "drain_timeout": 3,
        "entrypoints": {"web": {"address": f"127.0.0.1:{free_port()}"}},
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "demo_origin": {"enabled": True, "address": demo},
        "services": {"demo": {"servers": [{"url": f"http://{demo}"}]}},
        "routes": [{"name": "demo", "match": {"path": "/"}, "service": "demo"}],
    }
    path = tmp_path / "fastgate.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "fastgate.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(dist.python), str(dist.artifact), "run", "-c", str(path)],
            env=dist.env(),
            cwd=dist.work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, config, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_serves_and_stops_on_sigterm(served: tuple[subprocess.Popen, dict, Path]) -> None:
    proc, config, log = served
    host, port = config["admin"]["address"].rsplit(":", 1)
    admin = (host, int(port))
    deadline = time.monotonic() + READY_TIMEOUT
    status = None
    while time.monotonic() < deadline and proc.poll() is None:
        status = _readyz(admin)
        if status and status.get("ready"):
            break
        time.sleep(0.1)
    assert status and status.get("ready"), f"not ready: {status}\n{log.read_text()}"
    (worker,) = status["pids"]
    # The worker imports the unpacked copy, not the checkout.
    cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "/.shiv/fastgate_" in cmdline, cmdline
    assert str(REPO) not in cmdline

    host, port = config["entrypoints"]["web"]["address"].rsplit(":", 1)
    resp = get((host, int(port)), "/through/the/gateway", host="demo.test")
    assert resp.status == 200, resp.raw_head
    doc = resp.json()
    assert doc["message"] == "Hello from the fastgate demo origin"
    assert doc["path"] == "/through/the/gateway"
    assert doc["request_id"]  # added by the gateway

    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(15)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log.read_text()}"
    assert "Traceback" not in log.read_text()
    assert not _alive(worker), f"worker {worker} outlived the supervisor"


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
