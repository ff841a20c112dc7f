"""The installed (non-editable) package builds and runs the cpp backend from
outside the source tree, and the console script works."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_builds_cpp_outside_source_tree(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "fastdistill" / "_csrc" / "ops.cpp").is_file()
    assert (target / "fastdistill" / "kernels" / "__init__.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(target), FASTDISTILL_CACHE=str(tmp_path / "cache"),
               PYTHONNOUSERSITE="1")
    code = (
        "import torch, fastdistill as fd, fastdistill._backend as b;"
        "assert b.load_extension(), b._state;"
        "assert str(b.csrc_dir()).startswith(%r), b.csrc_dir();"
        "s, t = torch.randn(3, 50), torch.randn(3, 50);"
        "torch.testing.assert_close(fd.kd_loss(s, t, backend='cpp'), fd.kd_loss(s, t, backend='torch'));"
        "print('ok', fd.__file__)"
    ) % str(target)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ok {target}" in out.stdout
    assert any((tmp_path / "cache").rglob("fastdistill_C.so"))


@pytest.mark.parametrize("command", ["doctor", "build"])
def test_console_script(command):
    out = subprocess.run([sys.executable, "-m", "fastdistill.cli", command],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpp" in out.stdout
