"""The supervisor starts workers on the fastgate it runs itself, never on a copy that happens
to sit in the current directory (a source checkout after `pip install .` has one, without the
compiled extensions)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import fastgate
from fastgate.server.supervisor import PACKAGE_ROOT, Supervisor


def test_package_root_is_the_running_fastgate() -> None:
    assert Path(PACKAGE_ROOT) == Path(fastgate.__file__).resolve().parent.parent
    assert PACKAGE_ROOT in Supervisor.worker_argv[-1]


def test_a_copy_in_the_current_directory_does_not_shadow_it(tmp_path: Path) -> None:
    shadow = tmp_path / "fastgate" / "server"
    shadow.mkdir(parents=True)
    (tmp_path / "fastgate" / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text("")
    (shadow / "worker.py").write_text("def main():\n    print('SHADOW')\n    return 0\n")
    done = subprocess.run(
        list(Supervisor.worker_argv),
        cwd=tmp_path,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "SHADOW" not in done.stdout + done.stderr
    assert done.returncode != 0  # the real worker: no config on stdin is an error
