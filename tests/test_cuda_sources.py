"""The CUDA sources compile (nvcc, compile only): they cannot run without a
GPU, but they must build wherever the extension may be built with CUDA. They
share their unpack code (csrc/softlabels/packed_row.h) with the CPU op that
the other tests check against the readable decoder."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdistill import _backend


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only build of torch has no CUDA headers")
@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("source", _backend.CUDA_SOURCES)
def test_cuda_source_compiles(source, tmp_path):
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    src = _backend.csrc_dir()
    includes = [str(src)] + include_paths(device_type="cuda")
    if CUDA_HOME:
        includes.append(str(Path(CUDA_HOME) / "include"))
    cmd = [_nvcc(), "-c", str(src / source), "-o", str(tmp_path / "out.o"),
           *(f"-I{p}" for p in includes), *_backend.cuda_compile_flags(),
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=fastdistill_C",
           "--compiler-options", "-fPIC"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed on {source}:\n{res.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
    print(res.stderr[-2000:], file=sys.stderr)
