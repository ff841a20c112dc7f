"""The device report (``fastdistill bench --device cuda``) on this machine: the
same code path on CPU tensors through TRITON_INTERPRET=1 at tiny shapes
(conftest sets it before triton is imported), its checks and its exit code."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdistill import bench_device
from fastdistill.cli import main

# The ops of every case of the device report, as its table names them.
CASE_OPS = ("kd_loss[forward_kl]", "kd_loss[jsd]", "fused_linear_kd[jsd]", "sparse_kd[",
            "softlabel_kd[", "sinkhorn[given cost", "sinkhorn_divergence[", "sinkhorn_kd[",
            "dc_outer_step[", "per_sample_grad_norms", "dmd", "denoising_v_min_snr",
            "consistency_l2", "consistency_huber", "ddim_eps_cfg")
LIGER_MISSING = "not installed (pip install --no-deps liger-kernel)"


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The whole tiny report once, through the command line: (exit code, JSON)."""
    out = tmp_path_factory.mktemp("device_bench")
    code = main(["bench", "--device", "cpu", "--interpret", "--out", str(out)])
    return code, json.loads((out / "device_bench.json").read_text()), (out / "device_bench.md").read_text()


def test_interpreter_run_checks_every_case(full_run):
    code, data, table = full_run
    assert code == 0, data["failures"]
    assert data["failures"] == []
    rows = data["rows"]
    for op in CASE_OPS:
        assert any(r["op"].startswith(op) for r in rows), f"no rows for {op}"
    ours = [r for r in rows if r["ours"]]
    assert len(ours) >= 40
    for r in ours:
        assert r["check"].startswith("OK"), (r["op"], r["impl"], r["check"])
        assert r["seconds"] > 0 and r["max_rel_err"] is not None
        assert r["extra_peak_mb"] is None  # no device memory column on CPU
    for r in rows:  # every peer either agrees or says why it did not run
        if r["ours"]:
            continue
        if "LigerKLDIVLoss" in r["impl"] and "InterpreterError" in r["check"]:
            continue  # its kernel calls .to() on a Python float, which only the JIT accepts
        assert r["check"].startswith("OK") or "not installed" in r["notes"], (r["impl"], r["check"])
    # the table: one row each, a check column, ratios to the reference
    assert "| check" in table and "x faster than reference" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1  # + header
    # each case's reference row is its own truth in float32
    refs = [r for r in rows if r["impl"].startswith("torch eager (reference)") and r["dtype"] == "float32"]
    assert refs and all(r["max_rel_err"] == 0.0 and r["vs_eager"] == 1.0 for r in refs)


def _perturbed(real, factor):
    def wrong(*args, **kwargs):
        rows, grad = real(*args, **kwargs)
        return rows * factor, grad
    return wrong


def test_a_wrong_kernel_fails_loudly(monkeypatch, tmp_path, capsys):
    from fastdistill.kernels import kd as triton_kd

    monkeypatch.setattr(triton_kd, "kd_forward", _perturbed(triton_kd.kd_forward, 1.05))
    code = main(["bench", "--device", "cpu", "--interpret", "--case", "kd", "--divergence",
                 "forward_kl", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    data = json.loads((tmp_path / "device_bench.json").read_text())
    wrong = [r for r in data["rows"] if r["impl"].startswith("fastdistill triton")]
    assert len(wrong) == 4  # fp32 and bf16, default and in place
    for r in wrong:
        assert r["check"].startswith("WRONG value 5.0e-02"), r["check"]
    # the reference rows still agree, and the table comes before the verdict
    assert all(r["check"].startswith("OK") for r in data["rows"] if "reference" in r["impl"])
    assert out.index("| kd_loss[forward_kl]") < out.index("FAILED:")
    assert out.count("FAILED: kd_loss[forward_kl]") == 4


def test_a_crashing_kernel_is_an_error_row_and_a_failure(monkeypatch, tmp_path):
    from fastdistill.kernels import kd as triton_kd

    def boom(*args, **kwargs):
        raise RuntimeError("simulated kernel crash")

    monkeypatch.setattr(triton_kd, "kd_forward", boom)
    report, failures = bench_device.run("cpu", interpret=True, out_dir=tmp_path, cases=("kd",),
                                        divergences=("jsd",), log=_quiet)
    crashed = [r for r in report.rows if r.impl.startswith("fastdistill triton")]
    assert len(crashed) == 4 and len(failures) == 4
    for r in crashed:
        assert r.check == "ERROR: RuntimeError: simulated kernel crash" and r.seconds is None
    # the rows after a crash still ran
    assert any(r.impl == "torch eager (reference)" and r.check.startswith("OK") for r in report.rows)


def test_a_missing_peer_is_a_row(monkeypatch, tmp_path):
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.chunked_loss"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    report, failures = bench_device.run("cpu", interpret=True, out_dir=tmp_path,
                                        cases=("kd",), divergences=("jsd",), log=_quiet)
    assert failures == []
    liger = [r for r in report.rows if r.impl.startswith("Liger-Kernel")]
    assert len(liger) == 2  # fp32 and bf16
    for r in liger:
        assert r.notes == LIGER_MISSING and r.check == "-" and r.seconds is None
    table = (tmp_path / "device_bench.md").read_text()
    assert table.count(LIGER_MISSING) == 2
    # the fastdistill rows have no peer time to compare with, and say so with "-"
    assert all(r.vs_peer is None for r in report.rows)


def test_missing_ot_peers_are_rows(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)
    monkeypatch.setitem(sys.modules, "geomloss", None)
    rows = bench_device._missing_peers([bench_device.Impl("fastdistill x", None, True)],
                                       {"POT": "ot", "GeomLoss": "geomloss"})
    assert [(i.label, i.notes, i.fn) for i in rows] == [
        ("POT", "not installed (pip install --no-deps pot)", None),
        ("GeomLoss", "not installed (pip install --no-deps geomloss)", None)]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed (pip install --no-deps liger-kernel)")
def test_liger_conventions_match_at_an_asymmetric_beta(tmp_path):
    """At beta = 0.5 a swapped JSD beta would not show: at 0.3 Liger's Triton
    JSD, its fused-linear JSD and its chunked loss must still agree with the
    reference (the convention mapping the device report relies on)."""
    report, failures = bench_device.run("cpu", interpret=True, out_dir=tmp_path,
                                        cases=("kd", "fused_linear"), divergences=("jsd",),
                                        jsd_beta=0.3, log=_quiet)
    assert failures == []
    liger = [r for r in report.rows if r.impl.startswith("Liger-Kernel")]
    assert len(liger) == 6  # LigerJSD ×2 dtypes, LigerFusedLinearJSD and the chunked one ×2
    for r in liger:
        if r.dtype == "float32":
            assert r.check.startswith("OK"), (r.impl, r.check)
        else:  # bf16: precision, not convention (the chunked loss log-softmaxes in bf16)
            assert r.seconds is not None and r.max_rel_err < 5e-2, (r.impl, r.check)


def test_relative_error_and_the_check_text():
    want = (torch.tensor(2.0), torch.tensor([1.0, -4.0]))
    assert bench_device.check_outputs(want, want, (1e-4, 1e-4)) == (True, 0.0, "OK 0.0e+00")
    ok, err, text = bench_device.check_outputs((torch.tensor(2.0), torch.tensor([1.0, -3.9])), want,
                                               (1e-4, 1e-2))
    assert not ok and text == "WRONG gradient 1 2.5e-02 > 1e-02" and err == pytest.approx(0.025)
    assert bench_device.check_outputs((torch.tensor(2.0), None), want, (1e-4, 1e-2))[2] == \
        "WRONG gradient 1 missing"
    nan = (torch.tensor(float("nan")), want[1])
    assert bench_device.check_outputs(nan, want, (1e-4, 1e-2))[2] == "WRONG value inf > 1e-04"
    assert bench_device.relative_error(torch.ones(3), torch.zeros(3)) == 1.0  # absolute at zero


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available here" in err
    assert not (tmp_path / "device_bench.json").exists()


def test_bad_flag_combinations(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--interpret", "--out", str(tmp_path)]) == 2
    assert "use it with --device cpu" in capsys.readouterr().err
    assert main(["bench", "--interpret", "--quick", "--out", str(tmp_path)]) == 2
    assert "--quick sizes the CPU report" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cases must be among"):
        bench_device.run("cpu", interpret=True, out_dir=tmp_path, cases=("nope",))
    with pytest.raises(ValueError, match="pass interpret=True"):
        bench_device.run("cpu", out_dir=tmp_path)


def test_gpu_check_script_fails_loudly_without_a_gpu(tmp_path):
    """bench/gpu_check.sh (``make gpu-check``) on a machine with no CUDA device:
    every step runs (the build in the background, here only the CPU sources,
    from the cache), the log, build log and junit XML are written, and the
    script exits non-zero with a FAILED line."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GPU_PY=sys.executable, GPU_OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               GPU_WHEELS_DIR=str(tmp_path / "no-wheels"))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "gpu-check: FAILED" in text
    for step in ("tests", "bench", "build", "doctor", "cuda"):
        assert f"== gpu-check: {step} took" in text, step
    assert "torch sees no CUDA device" in text
    assert "no CUDA device is available here" in text
    assert (tmp_path / "gpu-check.log").stat().st_size > 0
    assert (tmp_path / "gpu-check-tests.xml").is_file() and (tmp_path / "build.log").is_file()
