"""The ``fastdistill`` command line: every bad flag is a one-line argparse error
(exit 2, no traceback) within seconds, before any model or data set is loaded
and before any output folder is made; ``--help`` names every flag's meaning,
default and valid values; the jobs' default output folders are git-ignored."""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdistill import cli

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 5.0


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


@pytest.fixture(scope="module")
def limit_s():
    """5 s, or the bare ``import fastdistill`` (torch) plus 2 s where a loaded
    machine makes that alone take longer: the CLI must add nothing heavy to it."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fastdistill"], check=True, env=_env(),
                   capture_output=True, timeout=120)
    return max(LIMIT_S, time.perf_counter() - t0 + 2.0)


def _run(args, cwd, timeout=120):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fastdistill.cli", *args], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    return out, time.perf_counter() - t0


def _tiny_model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


# (arguments, what the error line says); each runs in an empty temporary folder
BAD = [
    (["kd", "--divergence", "foo"], "argument --divergence: invalid choice: 'foo'"),
    (["kd", "--temperature", "0"], "argument --temperature: expected a number in [0.1, 20]"),
    (["kd", "--temperature", "nan"], "argument --temperature"),
    (["kd", "--max-steps", "0"], "argument --max-steps: expected an integer >= 1, got 0"),
    (["kd", "--sequences", "0"], "argument --sequences: expected an integer >= 1"),
    (["kd", "--seq-len", "1"], "argument --seq-len: expected an integer >= 2, got 1"),
    (["kd", "--batch", "x"], "argument --batch: expected an integer >= 1, got 'x'"),
    (["kd", "--learning-rate", "0"], "argument --learning-rate: expected a number in (0, inf)"),
    (["kd", "--held-out", "0"], "argument --held-out"),
    (["kd", "--save-steps", "0"], "argument --save-steps"),
    (["kd", "--teacher", "nowhere"], "argument --teacher: 'nowhere' is not 'smollm2' and no such folder"),
    (["kd", "--teacher", "smollm2,"], "argument --teacher: an empty name"),
    (["kd", "--student", "nowhere.json"], "argument --student: student config 'nowhere.json': no such file"),
    (["kd", "--student", "nowhere"], "argument --student: 'nowhere' is not 'small' and no such folder"),
    (["kd", "--data", "missing.txt"], "argument --data: 'missing.txt' is not 'kjv' and no such file"),
    (["kd", "--soft-labels", "missing"], "argument --soft-labels: 'missing': no such folder"),
    (["kd", "--resume"], "argument --resume: no checkpoint (checkpoint-N folder) in kd_out"),
    (["kd", "--teacher-weights", "1"], "argument --teacher-weights: weights a mixture of several"),
    (["kd", "--teacher-weights", "-1"], "argument --teacher-weights: expected non-negative numbers"),
    (["label", "--k", "0", "--out", "labels"], "argument --k: expected an integer >= 1, got 0"),
    (["label", "--value-bits", "4", "--out", "labels"], "argument --value-bits: invalid choice"),
    (["label", "--out", "afile"], "argument --out: 'afile' exists and is not a folder"),
    (["dd", "--ipc", "0"], "argument --ipc: expected an integer >= 1, got 0"),
    (["dd", "--iterations", "-1"], "argument --iterations: expected an integer >= 0"),
    (["dd", "--n-models", "0"], "argument --n-models"),
    (["dd", "--eval-epochs", "0"], "argument --eval-epochs"),
    (["dd", "--batch-real", "0"], "argument --batch-real"),
    (["dd", "--width", "0"], "argument --width"),
    (["dd", "--seed", "-1"], "argument --seed"),
    (["diffusion", "--iterations", "0"], "argument --iterations: expected an integer >= 1, got 0"),
    (["diffusion", "--per-class", "0"], "argument --per-class"),
    (["diffusion", "--guidance-scale", "-1"], "argument --guidance-scale: expected a number in [0, inf)"),
    (["diffusion", "--teacher-steps", "1001"], "argument --teacher-steps: expected an integer in [1, 1000]"),
    (["diffusion", "--steps", "3"], "argument --steps: invalid choice"),
    (["bench", "--quick", "--divergence", "foo"], "argument --divergence: invalid choice: 'foo'"),
    (["bench", "--quick", "--divergence", "jsd"], "argument --divergence: --quick runs fixed kd rows"),
    (["bench", "--case", "kd", "--divergence", "foo"], "argument --divergence: invalid choice"),
    (["bench", "--case", "ot", "--divergence", "jsd"], "argument --divergence: it limits the kd case"),
    (["bench", "--out", "afile"], "argument --out: 'afile' exists and is not a folder"),
    (["bench", "--device", "cpu", "--interpret", "--divergence", "tvd"],
     "argument --divergence: the device report's kd rows are forward_kl, jsd; got tvd"),
]


@pytest.mark.parametrize("args, says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_flag_is_a_one_line_error_before_anything_loads(args, says, tmp_path, limit_s):
    (tmp_path / "afile").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    out, seconds = _run(args, tmp_path)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fastdistill {args[0]}: error: "), out.stderr
    assert says in last, last
    assert out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder made
    assert seconds < limit_s, f"{seconds:.1f} s"


def test_a_teacher_folder_must_be_a_model_folder(tmp_path, limit_s):
    (tmp_path / "empty").mkdir()
    out, seconds = _run(["kd", "--teacher", "smollm2,empty"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument --teacher: 'empty' is not a Hugging Face model folder (no config.json" in out.stderr
    assert seconds < limit_s
    _tiny_model_folder(tmp_path / "t1")
    out, _ = _run(["label", "--teacher", "smollm2,t1", "--teacher-weights", "1,2,3", "--out", "s"],
                  tmp_path)
    assert out.returncode == 2
    assert "argument --teacher-weights: 3 weights for 2 teachers" in out.stderr.splitlines()[-1]
    assert not (tmp_path / "s").exists()


def test_help_is_quick_and_shows_every_flag(tmp_path, limit_s):
    out, seconds = _run(["--help"], tmp_path)
    assert out.returncode == 0 and seconds < limit_s, (seconds, out.stderr)
    for command in ("bench", "dd", "kd", "label", "diffusion"):
        assert command in out.stdout
    out, seconds = _run(["kd", "--help"], tmp_path)
    assert out.returncode == 0 and seconds < limit_s
    text = " ".join(out.stdout.split())
    assert "(default: kd_out)" in text and "(default: forward_kl)" in text
    assert "(a number in [0.1, 20])" in text and "(an integer >= 1)" in text
    assert "an error if there is none" in text  # --resume into a folder without a checkpoint
    out, _ = _run(["dd", "--help"], tmp_path)
    assert "random seed (an integer >= 0) (default: 0)" in " ".join(out.stdout.split())


def test_every_flag_has_help_and_a_type_that_checks_it(monkeypatch):
    seen = {}

    def grab(self, *a, **kw):  # the parser main() built, instead of running a command
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        cli.main(["doctor"])
    sub = next(a for a in seen["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        if name == "kd-demo":
            continue  # another change owns it
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            if action.nargs != 0 and action.choices is None:  # a value, not a flag
                assert action.type is not None, f"{name} {action.option_strings}: no type"


def test_the_jobs_outputs_are_git_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["kd_out/", "dd_out/", "diffusion_out/", "labels/", "kd_demo_out/", "bench/out/"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT,
                         capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(names), out.stdout + out.stderr
    # but nothing of the package's own folders of those names
    out = subprocess.run(["git", "check-ignore", "--no-index", "fastdistill/softlabels/",
                          "csrc/softlabels/"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout == ""
