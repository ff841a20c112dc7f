"""Packaging: a pure-Python wheel that ships every subpackage of fastdistill,
the C++ sources (csrc/ as fastdistill/_csrc) and the Triton kernels (the
top-level kernels/ as fastdistill.kernels), so the JIT build works after a
non-editable install. ``FASTDISTILL_BUILD_EXT=1 pip install --no-build-isolation .``
builds the extension ahead of time instead, with the JIT build's sources and
flags (torch must already be installed: build isolation would hide it)."""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package so the installed loader finds it."""

    def run(self):
        super().run()
        if not self.distribution.ext_modules:
            # an earlier FASTDISTILL_BUILD_EXT=1 build left its library in
            # build/lib: a plain wheel must not ship it (it would be loaded
            # instead of building the sources it ships)
            for stale in (Path(self.build_lib) / "fastdistill").glob("fastdistill_C*.so"):
                stale.unlink()
        dst = Path(self.build_lib) / "fastdistill" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("__pycache__", "*.o"))


def aot_extension():
    """The one extension as ``_backend`` JIT-builds it: same sources, flags, include dir
    (-g0 undoes the -g that setuptools takes from Python's own CFLAGS; the JIT has none)."""
    sys.path.insert(0, str(ROOT / "fastdistill"))
    try:
        import _backend  # noqa: E402  (imports torch only, not the package)
    finally:
        sys.path.pop(0)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [f"csrc/{s}" for s in _backend.build_sources()]
    common = dict(
        name="fastdistill.fastdistill_C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if any(s.endswith(".cu") for s in sources):
        ext = CUDAExtension(**common, extra_compile_args={
            "cxx": _backend.compile_flags() + ["-g0"], "nvcc": _backend.cuda_compile_flags()})
    else:
        ext = CppExtension(**common, extra_compile_args=_backend.compile_flags() + ["-g0"])
    return ext, BuildExtension.with_options(no_python_abi_suffix=True)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("FASTDISTILL_BUILD_EXT") == "1":
    ext, build_ext = aot_extension()
    ext_modules.append(ext)
    cmdclass["build_ext"] = build_ext

setup(
    # every subpackage of fastdistill (dd, softlabels, reference, ...), and
    # kernels/ installed as fastdistill.kernels
    packages=find_packages(include=["fastdistill", "fastdistill.*"]) + ["fastdistill.kernels"],
    package_dir={"fastdistill.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
