"""The ``fastdistill diffusion`` job's output: a short run (--teacher-iterations),
what is cached and where, the table's legend, the labelled PNG grid. The
teacher is real (a few steps); the classifier, the metrics and the students
are stubbed, so the test takes seconds."""
import json
import struct

import pytest
import torch

from fastdistill import cli
from fastdistill.diffusion import jobs
from fastdistill.diffusion import metrics as metrics_mod


class _FakeStudent:
    def __init__(self, method, teacher, *, steps, **kw):
        self.steps = steps

    def fit(self, images):
        return self

    def sample(self, labels, generator=None):
        return torch.randn(len(labels), 1, 8, 8, generator=generator)


class _FakeClassifier:
    from_cache = False


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("FASTDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics_mod, "train_classifier", lambda data, progress=True: _FakeClassifier())
    monkeypatch.setattr(jobs, "_metrics", lambda *a: {"accuracy": 0.5, "fd": 1.0, "kid": -0.0003,
                                                      "kid_std": 0.001, "precision": 0.5,
                                                      "recall": 0.5})
    monkeypatch.setattr(jobs, "DiffusionDistiller", _FakeStudent)
    seen = []
    real = jobs.train_teacher

    def teacher(data, **kw):
        seen.append(kw["iterations"])
        return real(data, batch_size=8, width=8, **kw)  # tiny: seconds

    monkeypatch.setattr(jobs, "train_teacher", teacher)
    return seen


ARGS = ["diffusion", "--method", "dmd2", "--steps", "1", "--per-class", "2", "--teacher-steps", "2",
        "--quiet"]


def test_teacher_iterations_makes_a_short_run_and_says_what_is_cached(stubbed, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(ARGS + ["--teacher-iterations", "3", "--out", str(out)]) == 0
    assert stubbed == [3]
    text = capsys.readouterr().out
    cache = tmp_path / "cache" / "diffusion"
    assert f"kept under {cache}" in text and "$FASTDISTILL_CACHE" in text
    assert f"teacher: trained now, cached at {cache}/teacher-digits-" in text
    assert f"digit classifier: trained now, cached at {cache / 'classifier-digits-0.pt'}" in text
    assert str(out / "digits-<method>-<steps>step-teacher3.ckpt") in text
    # the legend under the table
    assert "FD: the Fréchet distance" in text and "lower is better" in text
    assert "KID:" in text and "slightly negative" in text and "unbiased" in text
    assert "P / R: k-NN precision" in text and "higher is better" in text
    assert "acc: " in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["teacher_iterations"] == 3 and len(saved["legend"]) == 4
    # the grid: labelled and upscaled (it was 102×32 pixels), one row per table row
    raw = (out / "digits-samples.png").read_bytes()
    w, h = struct.unpack(">II", raw[16:24])
    assert len(saved["rows"]) == 3 and w > 10 * 64 and h > 3 * 64
    # the second run loads the teacher
    assert cli.main(ARGS + ["--teacher-iterations", "3", "--out", str(out)]) == 0
    assert f"teacher: loaded from {cache}/teacher-digits-" in capsys.readouterr().out


def test_two_step_counts_of_a_method_are_two_grid_rows(stubbed, tmp_path):
    rows = jobs.run("digits", ["dmd2"], [1, 2], out=tmp_path / "o", per_class=2, teacher_steps=2,
                    teacher_iterations=2, progress=False, log=lambda *_: None)["rows"]
    assert [(r["model"], r["steps"]) for r in rows][-2:] == [("dmd2 student", 1), ("dmd2 student", 2)]
    assert [jobs._row_label(r) for r in rows] == [
        "teacher, DDIM 2 steps", "teacher, DDIM 1 step", "teacher, DDIM 2 steps",
        "dmd2 student, 1 step", "dmd2 student, 2 steps"]


@pytest.mark.parametrize("bad", ["0", "-3", "2.5", "many"])
def test_teacher_iterations_must_be_a_positive_int(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["diffusion", "--teacher-iterations", bad])
    assert exc.value.code == 2
    assert "--teacher-iterations" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher_iterations"):
        jobs.run("digits", teacher_iterations=0)
