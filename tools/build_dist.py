"""Build the single-file distribution: `python tools/build_dist.py --out dist/fastgate`.

The result is a shiv zipapp (PEP 441): one executable file holding fastgate with its compiled
`fastgate._core` extensions and every runtime dependency, which runs on any machine with a
compatible CPython (the same minor version and platform as the build) and nothing else
installed. On its first run it unpacks itself to `$SHIV_ROOT` (default `~/.shiv`); see
docs/distribution.md.

Steps: copy the sources a wheel needs into a scratch directory, `pip wheel --no-deps` that
copy (so the build never writes into the checkout: no build/, egg-info or .c files there),
then `shiv -c fastgate` with the wheel, which installs the wheel's dependencies from the
package index into the archive. Needs `shiv` in this interpreter's environment
(`pip install shiv`) and a C compiler for the extensions.

Rules this file obeys:
- The checkout is read, never written (everything happens in a temporary directory, removed
  at the end unless --keep-work is given); only --out is written, atomically (a rename).
- Sources come from a fixed allow-list (pyproject.toml, setup.py, README.md, the fastgate
  package) minus generated and cached files, so stray build output cannot slip into a release.
- A clean build compiles every extension. --reuse-build (for quick local and CI smoke builds)
  also copies the checkout's in-place extensions (`make build`) that are up to date with
  their .pyx/.pxd sources; stale ones are compiled as usual.
- Failures print the failing command's log tail and exit 1; no traceback for expected ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "fastgate"
# Top-level files the wheel build reads (pyproject's `readme` is README.md).
TOP_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")
# Never copied: caches and build products (the extensions are rebuilt from the .pyx files).
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".html", ".c", ".o")
DEFAULT_PYTHON = "/usr/bin/env python3"
LOG_TAIL = 60


class BuildError(Exception):
    """A step failed; the message says which and why."""


def _skipped(path: Path) -> bool:
    return path.name.endswith(SKIP_SUFFIXES) or path.name.endswith(".egg-info")


def copy_sources(repo: Path, dest: Path) -> int:
    """Copy the allow-listed sources into `dest`, keeping file times; returns the file count."""
    count = 0
    for name in TOP_FILES:
        if (repo / name).is_file():
            shutil.copy2(repo / name, dest / name)
            count += 1
    for root, dirs, files in os.walk(repo / PACKAGE):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        target = dest / Path(root).relative_to(repo)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if not _skipped(Path(name)):
                shutil.copy2(Path(root) / name, target / name)
                count += 1
    return count


def build_lib_dir(src: Path) -> Path:
    """Where setuptools' build_ext puts extensions when not building in place."""
    return src / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


_CIMPORT = re.compile(
    rb"^\s*(?:from\s+(?:fastgate\._core\.|\.)(\w+)\s+cimport|cimport\s+fastgate\._core\.(\w+))"
    rb"|^\s*include\s+[\"']([^\"']+)[\"']",
    re.MULTILINE,
)


def cython_sources(core: Path, pyx: Path) -> set[Path]:
    """The .pyx, its .pxd and every package .pxd/.pxi it cimports or includes, transitively."""
    seen: set[Path] = set()
    todo = [pyx, pyx.with_suffix(".pxd")]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for module, module2, include in _CIMPORT.findall(path.read_bytes()):
            if include:
                todo.append(core / include.decode())
            else:
                todo.append(core / f"{(module or module2).decode()}.pxd")
    return seen


def copy_inplace_build(repo: Path, src: Path) -> int:
    """--reuse-build: seed the scratch tree with the checkout's up-to-date compiled extensions.

    An extension is reused when its .so is newer than its generated .c, and that .c is newer
    than its .pyx and every package .pxd/.pxi it depends on (`cython_sources`). Their copies
    get a time in the future: Cython would otherwise regenerate every .c (the fresh build
    environment's own Cython includes look newer) and so recompile everything. Stale modules
    are not seeded and compile as usual. Returns how many extensions were seeded.
    """
    core = repo / PACKAGE / "_core"
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    lib_core = build_lib_dir(src) / PACKAGE / "_core"
    lib_core.mkdir(parents=True, exist_ok=True)
    future = time.time() + 86400
    seeded = 0
    for pyx in sorted(core.glob("*.pyx")):
        c_file = pyx.with_suffix(".c")
        ext = core / f"{pyx.stem}{ext_suffix}"
        if not (c_file.is_file() and ext.is_file()):
            continue
        c_time = c_file.stat().st_mtime
        newest_source = max(p.stat().st_mtime for p in cython_sources(core, pyx))
        if ext.stat().st_mtime < c_time or c_time < newest_source:
            continue
        c_copy = src / PACKAGE / "_core" / c_file.name
        ext_copy = lib_core / ext.name
        shutil.copy2(c_file, c_copy)
        shutil.copy2(ext, ext_copy)
        os.utime(c_copy, (future, future))
        os.utime(ext_copy, (future + 1, future + 1))
        seeded += 1
    return seeded


def run_logged(step: str, argv: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run a build command with its output in `log`; BuildError with the log tail on failure."""
    with log.open("wb") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
        raise BuildError(f"{step} failed (exit {code}); --keep-work DIR keeps its log:\n{tail}")


def build_wheel(src: Path, wheels: Path, log: Path) -> Path:
    """`pip wheel --no-deps` the scratch tree; returns the fastgate wheel."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels)]
    run_logged("pip wheel", [*pip, str(src)], log, cwd=src)
    found = sorted(wheels.glob(f"{PACKAGE}-*.whl"))
    if len(found) != 1:
        raise BuildError(f"expected one {PACKAGE} wheel in {wheels}, found {found}")
    return found[0]


PREAMBLE = '''"""Run by shiv before fastgate: refuse a Python it was not built for."""
import sys
import sysconfig

WANTED = %(suffix)r
if sysconfig.get_config_var("EXT_SUFFIX") != WANTED:
    sys.stderr.write(
        "error: this fastgate file was built for CPython %(version)s on %(platform)s "
        "(extensions *" + WANTED + "); " + sys.executable + " is Python "
        + sys.version.split()[0] + " (*" + str(sysconfig.get_config_var("EXT_SUFFIX")) + "). "
        "Run it with a matching interpreter: python%(version)s FILE ...\\n"
    )
    sys.exit(1)
'''


def write_preamble(path: Path) -> Path:
    """The version check shiv runs first: a clear error instead of an ImportError traceback
    when the file is started by another Python minor version, implementation or platform."""
    path.write_text(
        PREAMBLE
        % {
            "suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "platform": sysconfig.get_platform(),
        }
    )
    return path


def build_zipapp(wheel: Path, out: Path, python: str, work: Path) -> None:
    """shiv the wheel and its dependencies (resolved by pip) into `out`, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    preamble = write_preamble(work / "fastgate_preamble.py")
    shiv = [sys.executable, "-m", "shiv", "--console-script", PACKAGE, "--python", python]
    shiv += ["--preamble", str(preamble)]
    log = work / "shiv.log"
    try:
        run_logged("shiv", [*shiv, "--output-file", str(partial), str(wheel)], log)
        partial.chmod(0o755)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


def build(out: Path, python: str, reuse_build: bool, work: Path) -> None:
    """The whole build in `work`; prints what it did, the artifact's size and the time taken."""
    if importlib.util.find_spec("shiv") is None:  # checked before minutes of compiling
        raise BuildError(f"shiv is not installed for {sys.executable}: pip install shiv")
    started = time.monotonic()
    src = work / "src"
    src.mkdir(parents=True)
    files = copy_sources(REPO, src)
    seeded = copy_inplace_build(REPO, src) if reuse_build else 0
    print(
        f"sources: {files} files"
        + (f", {seeded} compiled extensions reused where up to date" if reuse_build else ""),
        flush=True,
    )
    wheel = build_wheel(src, work / "wheels", work / "pip-wheel.log")
    print(f"wheel: {wheel.name} ({time.monotonic() - started:.0f} s)", flush=True)
    build_zipapp(wheel, out, python, work)
    for line in (work / "shiv.log").read_text(errors="replace").splitlines():
        if line.startswith("Successfully installed "):
            print(f"packages: {line.removeprefix('Successfully installed ')}", flush=True)
    size = out.stat().st_size
    print(
        f"built {out}: {size / 1e6:.1f} MB ({size} bytes) in {time.monotonic() - started:.0f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / PACKAGE, metavar="FILE")
    parser.add_argument(
        "--python",
        default=DEFAULT_PYTHON,
        metavar="SHEBANG",
        help=f"interpreter for the #! line (default: {DEFAULT_PYTHON!r})",
    )
    parser.add_argument(
        "--reuse-build",
        action="store_true",
        help="reuse the checkout's compiled extensions where up to date (quick, not a release)",
    )
    parser.add_argument(
        "--keep-work", type=Path, metavar="DIR", help="build in DIR and keep it (logs, wheel)"
    )
    args = parser.parse_args(argv)
    try:
        if args.keep_work is not None:
            args.keep_work.mkdir(parents=True, exist_ok=False)
            build(args.out.resolve(), args.python, args.reuse_build, args.keep_work.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="fastgate-dist-") as work:
                build(args.out.resolve(), args.python, args.reuse_build, Path(work))
    except (BuildError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
