"""Packaging: a pure-Python wheel that ships the C++ sources (csrc/ as
fastdistill/_csrc) and the Triton kernels (kernels/ as fastdistill.kernels), so
the JIT build works after a non-editable install. FASTDISTILL_BUILD_EXT=1
builds the extension ahead of time instead."""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package so the installed loader finds it."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "fastdistill" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("__pycache__", "*.o"))


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FASTDISTILL_BUILD_EXT") == "1":
    import sys

    sys.path.insert(0, str(ROOT / "fastdistill"))
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    import _backend  # noqa: E402  (the same flags and sources as the JIT build)

    ext_modules.append(
        CppExtension(
            name="fastdistill.fastdistill_C",
            sources=[f"csrc/{s}" for s in _backend.CPU_SOURCES],
            extra_compile_args=_backend.compile_flags(),
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=True)

setup(
    packages=["fastdistill", "fastdistill.reference", "fastdistill.kernels"],
    package_dir={"fastdistill.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
