"""Build the Cython fast path: every csrc/NAME.pyx becomes shadowblk._native.NAME."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent

extensions = [
    Extension(
        f"shadowblk._native.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        include_dirs=["csrc/lib"],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted((HERE / "csrc").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        quiet=True,
    ),
)
