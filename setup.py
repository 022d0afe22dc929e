"""Build the Cython hot path: one Extension per `fastgate/_core/*.pyx` module.

FASTGATE_DEBUG=1 compiles with line tracing (for coverage and profilers) and assertions on.
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTGATE_DEBUG") == "1"

macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O0", "-g"] if DEBUG else ["-O2"]

extensions = [
    Extension(
        "fastgate._core." + os.path.splitext(os.path.basename(path))[0],
        [path],
        define_macros=macros,
        extra_compile_args=cflags,
    )
    for path in sorted(glob.glob("fastgate/_core/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
            "embedsignature": True,
        },
    ),
)
