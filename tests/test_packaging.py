"""The built wheel, installed into a fresh venv and imported from outside the
source tree, ships every subpackage and runs kd_loss on every backend that
builds here (cpp from the installed sources, triton through the interpreter);
the console script works; a bare checkout on sys.path finds the kernels."""
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_SITE = Path(torch.__file__).resolve().parents[1]  # the dev env's site-packages


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", **extra)
    return env


def _build_wheel(out_dir: Path, **env) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out_dir), str(ROOT)],
                   check=True, capture_output=True, text=True, env=_clean_env(**env), timeout=1800)
    (wheel,) = out_dir.glob("fastdistill-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv with only the wheel installed; torch and friends come from the dev
    env through a .pth written after the install (so pip never sees the dev
    env's own fastdistill)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, text=True, env=_clean_env())
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_dev_env.pth").write_text(f"{TORCH_SITE}\n")
    return venv


CHECK = r"""
import os, sys, torch
import fastdistill as fd, fastdistill._backend as b
from fastdistill import dd, softlabels, reference
from fastdistill.kernels import kd as triton_kd  # kernels/ has no __init__.py (a namespace package)
venv = sys.argv[1]
for mod in (fd, dd, softlabels, reference, triton_kd):
    assert mod.__file__.startswith(venv), (mod.__name__, mod.__file__)
assert str(b.csrc_dir()).startswith(venv), b.csrc_dir()
assert hasattr(dd, "DatasetDistiller")
status = b.backend_status()
s, t = torch.randn(3, 50), torch.randn(3, 50)
ref = fd.kd_loss(s, t, backend="torch")
ran = []
for name in ("cpp", "triton"):
    if status[name][0]:
        torch.testing.assert_close(fd.kd_loss(s, t, backend=name), ref)
        ran.append(name)
print("ran", *ran)
print("cpp-from", b._state.get("cpp_reason"))
"""


def _check_installed(venv: Path, cwd: Path, backends: tuple[str, ...]) -> str:
    cwd.mkdir(exist_ok=True)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK, str(venv)], cwd=cwd,
                         env=_clean_env(TRITON_INTERPRET="1"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ran = next(line for line in out.stdout.splitlines() if line.startswith("ran")).split()[1:]
    assert set(backends) <= set(ran), out.stdout
    return out.stdout


def test_wheel_in_fresh_venv_runs_every_backend(tmp_path):
    t0 = time.perf_counter()
    wheel = _build_wheel(tmp_path / "dist")
    venv = _fresh_venv(tmp_path, wheel)
    # the cpp build uses the sources installed in the venv (same hash as the
    # checkout's, so the cache the suite already built serves it)
    expected = ("cpp", "triton") if _has_triton() else ("cpp",)
    out = _check_installed(venv, tmp_path / "elsewhere", expected)
    assert "cpp-from loaded" in out, out
    doctor = subprocess.run([str(venv / "bin" / "fastdistill"), "doctor"], cwd=tmp_path,
                            env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert f"sources     {venv}" in doctor.stdout, doctor.stdout
    print(f"wheel build + venv + checks: {time.perf_counter() - t0:.1f} s")


def test_aot_wheel_loads_its_own_library(tmp_path):
    """FASTDISTILL_BUILD_EXT=1 compiles the extension into the wheel (the JIT's
    sources and flags, -I csrc); the installed package loads that library and
    never JIT-builds (its cache stays empty). A fresh compile: about 3-4 min
    on 2 cores (the build/ folder of the checkout makes a rerun incremental)."""
    wheel = _build_wheel(tmp_path / "dist", FASTDISTILL_BUILD_EXT="1", MAX_JOBS="2")
    venv = _fresh_venv(tmp_path, wheel)
    cache = tmp_path / "jit-cache"
    code = ("import os, sys, torch, fastdistill as fd, fastdistill._backend as b\n"
            "assert b.load_extension(), b._state\n"
            "print(b._state['cpp_reason'])\n"
            "s, t = torch.randn(3, 50), torch.randn(3, 50)\n"
            "torch.testing.assert_close(fd.kd_loss(s, t, backend='cpp'), fd.kd_loss(s, t, backend='torch'))\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                         env=_clean_env(FASTDISTILL_CACHE=str(cache)), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded " + str(venv) in out.stdout and "fastdistill_C" in out.stdout, out.stdout
    assert not any(cache.rglob("*.so")), "the AOT-built package JIT-built anyway"
    # a plain wheel built after it (same build/ folder) ships sources, not that library
    import zipfile

    plain = zipfile.ZipFile(_build_wheel(tmp_path / "plain")).namelist()
    assert not [n for n in plain if n.endswith(".so")], plain


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_wheel_ships_every_subpackage_and_sources(tmp_path):
    import zipfile

    names = set(zipfile.ZipFile(_build_wheel(tmp_path / "dist")).namelist())
    for pkg in ROOT.joinpath("fastdistill").rglob("__init__.py"):
        rel = pkg.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel"
    for src in ROOT.joinpath("kernels").glob("*.py"):
        assert f"fastdistill/kernels/{src.name}" in names
    for src in ROOT.joinpath("csrc").rglob("*"):
        if src.suffix in (".cpp", ".h", ".cu"):
            assert f"fastdistill/_csrc/{src.relative_to(ROOT / 'csrc').as_posix()}" in names


def test_bare_checkout_on_sys_path_finds_kernels(tmp_path):
    """No install at all (no editable finder, site disabled): the kernels/
    folder next to the package still imports as fastdistill.kernels."""
    code = ("import fastdistill, fastdistill.kernels.kd as k; "
            "assert k.__file__.startswith(%r), k.__file__; print('ok')") % str(ROOT / "kernels")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=_clean_env(PYTHONPATH=f"{ROOT}{os.pathsep}{TORCH_SITE}"),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_checkout_root_on_sys_path_does_not_shadow_a_top_level_kernels(tmp_path):
    """``python -m ...`` from the checkout puts its root first on sys.path:
    the kernels/ folder (no ``__init__.py``) must not hide another
    distribution's top-level ``kernels`` package (transformers ≥ 5.25 imports
    Hugging Face's), and fastdistill.kernels still resolves to the folder."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'the other distribution'\n")
    code = ("import kernels, fastdistill.kernels.kd as k; "
            "assert getattr(kernels, 'WHO', None) == 'the other distribution', kernels; "
            "assert k.__file__.startswith(%r), k.__file__; print('ok')") % str(ROOT / "kernels")
    env = _clean_env(PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, ''); " + code],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("command", ["doctor", "build"])
def test_console_script(command):
    out = subprocess.run([sys.executable, "-m", "fastdistill.cli", command],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpp" in out.stdout
