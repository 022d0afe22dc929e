"""Run the atheris harnesses for a bounded time: `python tests/fuzz/run_fuzz.py --seconds 60
[--target http|router|all]`.

Rules this file obeys:
- The repository's corpus is never written to: each target fuzzes a copy in a fresh temporary
  directory (libFuzzer adds every new interesting input to the corpus it is given).
- Each harness runs as its own subprocess under libFuzzer's `-max_total_time`, with a per-input
  `-timeout` and an RSS limit, and a wall-clock bound on top, so a hung harness cannot hang the
  runner.
- Exit status 0 only when every target ran to its time limit without a crash, a timeout or an
  out-of-memory. Otherwise the exit status is 1 and the crash file is printed: its path (the
  temporary directory is kept), its bytes as a Python literal ready to paste into
  tests/unit/test_fuzz_regressions.py, and the command that replays it.
- Exit status 2 when atheris is not installed (`pip install atheris`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TARGETS = ("http", "router")
# Inputs up to 20 000 bytes reach the 16 KiB head limit and the 8 KiB target limit.
MAX_LEN = {"http": 20000, "router": 4096}
INPUT_TIMEOUT = 10  # seconds for one input; well-behaved inputs take milliseconds
ARTIFACT_KINDS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


@dataclass
class Result:
    target: str
    ok: bool
    runs: int
    seconds: float
    per_second: int
    corpus_before: int
    corpus_after: int
    artifacts: list[Path]
    workdir: Path
    log: Path


def stat(log: str, name: str) -> int:
    match = re.search(rf"stat::{name}:\s*(\d+)", log)
    return int(match.group(1)) if match else 0


def run_target(target: str, seconds: int, keep: bool) -> Result:
    """Fuzz one target on a copy of its corpus; keep the work dir when it found something."""
    workdir = Path(tempfile.mkdtemp(prefix=f"fastgate-fuzz-{target}-"))
    corpus = workdir / "corpus"
    artifacts = workdir / "artifacts"
    shutil.copytree(HERE / "corpus" / target, corpus)
    artifacts.mkdir()
    before = len(list(corpus.iterdir()))
    log = workdir / "fuzz.log"
    cmd = [
        sys.executable,
        str(HERE / f"fuzz_{target}.py"),
        str(corpus),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN[target]}",
        f"-timeout={INPUT_TIMEOUT}",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.monotonic()
    with log.open("wb") as out:
        try:
            proc = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                timeout=seconds + 120,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            out.write(b"\nrun_fuzz: the harness overran its time limit and was killed\n")
            code = -1
    elapsed = time.monotonic() - started
    text = log.read_text("utf-8", "replace")
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACT_KINDS))
    ok = code == 0 and not found
    result = Result(
        target,
        ok,
        stat(text, "number_of_executed_units"),
        elapsed,
        stat(text, "average_exec_per_sec"),
        before,
        len(list(corpus.iterdir())),
        found,
        workdir,
        log,
    )
    if ok and not keep:
        shutil.rmtree(workdir)
    return result


def report(result: Result) -> None:
    """One summary line, and for a failure the crash files and the end of the log."""
    status = "ok" if result.ok else "FAILED"
    print(
        f"{result.target}: {status}: {result.runs} inputs in {result.seconds:.0f} s "
        f"({result.per_second}/s), corpus {result.corpus_before} -> {result.corpus_after}",
        flush=True,
    )
    if result.ok:
        return
    tail = result.log.read_text("utf-8", "replace").splitlines()[-60:]
    print("--- end of the libFuzzer log (" + str(result.log) + ")")
    print("\n".join(tail))
    print("---")
    for path in result.artifacts:
        data = path.read_bytes()
        shown = repr(data) if len(data) <= 4000 else repr(data[:4000]) + " ... (truncated)"
        print(f"crash file: {path}")
        print(f"  bytes: {shown}")
        print(f"  replay: PYTHONPATH=. {sys.executable} tests/fuzz/fuzz_{result.target}.py {path}")
    if not result.artifacts:
        print(f"no crash file; the harness exited abnormally: see {result.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs (grown corpus)")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if importlib.util.find_spec("atheris") is None:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    targets = TARGETS if args.target == "all" else (args.target,)
    failed = False
    for target in targets:
        result = run_target(target, args.seconds, args.keep)
        report(result)
        if args.keep and result.ok:
            print(f"  work dir kept: {result.workdir}")
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
