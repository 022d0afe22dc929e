"""The hot path's Python-call budget (DESIGN.md §2), counted with sys.setprofile.

A count, not a timing: a plain route must run no Python per request, and a route with one
middleware only the dispatch, the context and the middleware itself; a route whose only
middleware is jwt_auth answers a repeated token from the C credential cache: no Python.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_python_calls_per_request_stay_within_budget() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/pycalls.py",
            "--requests",
            "300",
            "--budget",
            "0.2",
            "3.2",
            "7.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plain route" in result.stdout and "jwt_auth (cached)" in result.stdout
