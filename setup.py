"""The native CPU step (sejd/engines/native/step.c), compiled when the package is installed.

pyproject.toml holds the project's metadata; this file only adds the compiled step. It is built once
per instruction-set level the platform has (on x86-64: the baseline, x86-64-v3 = AVX2 + FMA, and
x86-64-v4 = AVX-512), so a wheel built on one machine runs on another: at run time sejd loads the
highest level the processor supports (sejd/engines/native_lib.py). Each library carries the sha256 of
the source it was built from; a library built from another step.c is not loaded.

The extensions are optional: without a C compiler the install still succeeds and ort-cpu runs single
tokens in ONNX step graphs (it says so once). After editing step.c, rebuild with `pip install -e .`
(`make test` does it when step.c changed).
"""

import hashlib
import os
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "sejd/engines/native/step.c"
BUILD_ID = hashlib.sha256(Path(SOURCE).read_bytes()).hexdigest()[:16]
FLAGS = ["-O3", "-pthread", "-fno-math-errno",
         "-fno-trapping-math",  # no FP exceptions are used: lets float selects (clamps, signs) vectorize
         "-fno-wrapv"]  # setuptools passes Python's own CFLAGS, -fwrapv among them: with signed overflow
                        # defined, gcc keeps the kernels' int-indexed loops scalar (2x slower at batch 16)
X86_LEVELS = {"x86-64": [], "x86-64-v3": [], "x86-64-v4": ["-mprefer-vector-width=512"]}  # see native_lib.py


def levels() -> dict[str, list[str]]:
    """Instruction-set level -> its flags, for this platform (one generic build elsewhere)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return {name: [f"-march={name}", *extra] for name, extra in X86_LEVELS.items()}
    return {"generic": []}


class BuildEach(build_ext):
    """One object folder per extension: the three builds of step.c would otherwise share step.o."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    ext_modules=[
        Extension(f"sejd.engines.native.step_{name.replace('-', '_')}", [SOURCE],
                  define_macros=[("SEJD_BUILD_ID", f'"{BUILD_ID}"')],
                  extra_compile_args=FLAGS + flags, extra_link_args=["-pthread", "-lm"], optional=True)
        for name, flags in levels().items()
    ],
    cmdclass={"build_ext": BuildEach},
)
