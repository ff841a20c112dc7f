"""The shell jobs on a tiny local teacher with SmolLM2's tokenizer: `fastdistill label`
fills a store (resumable, mixtures), `fastdistill kd` trains, checkpoints and
resumes, from an online teacher or from the store; bad specs are clear errors."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("gguf")

from fastdistill import cli  # noqa: E402
from fastdistill import softlabels as sl  # noqa: E402
from fastdistill.hf import defaults, jobs  # noqa: E402

V = 49152
TINY = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    try:
        tok = defaults.load_tokenizer()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("jobs")
    for i in range(2):
        torch.manual_seed(i)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
        m.save_pretrained(root / f"teacher{i}")
        tok.save_pretrained(root / f"teacher{i}")
    (root / "student.json").write_text(json.dumps(dict(TINY, model_type="llama")))
    return root


def test_label_is_resumable_and_stores_the_mixture(folders, capsys):
    out = folders / "store"
    args = ["label", "--teacher", f"{folders}/teacher0,{folders}/teacher1", "--teacher-weights",
            "1,3", "--sequences", "6", "--seq-len", "16", "--k", "8", "--batch", "4",
            "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    assert "0 already stored, 6 labelled now" in capsys.readouterr().out
    assert cli.main(args) == 0  # everything stored already: nothing to do
    assert "6 already stored, 0 labelled now: 6 of 6 sequences" in capsys.readouterr().out
    store = sl.SoftLabelStore(out)
    assert store.keys() == [str(i) for i in range(6)]
    # entry 0 is the top-8 of the 1:3 mixture of the two teachers
    teachers, tok = jobs.load_teachers(f"{folders}/teacher0,{folders}/teacher1")
    ids, _ = jobs.windows(tok, "kjv", 6, 16)
    with torch.no_grad():
        p = sum(w * torch.softmax(t(input_ids=ids[:1]).logits[0], -1)
                for w, t in zip((0.25, 0.75), teachers))
    got_ids, got_lp = store["0"].labels.decode()
    want_lp, want_ids = p.log().topk(8, -1)
    assert torch.equal(got_ids.sort(-1).values, want_ids.sort(-1).values)
    torch.testing.assert_close(got_lp.sort(-1).values, want_lp.sort(-1).values, atol=0.05, rtol=0)


def test_kd_trains_checkpoints_and_resumes(folders, capsys):
    out = folders / "kd"
    base = ["kd", "--teacher", f"{folders}/teacher0", "--student", str(folders / "student.json"),
            "--sequences", "12", "--seq-len", "16", "--batch", "4", "--held-out", "4",
            "--save-steps", "2", "--out", str(out), "--quiet"]
    assert cli.main(base + ["--max-steps", "2"]) == 0
    assert "held-out CE" in capsys.readouterr().out
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").exists()
    assert cli.main(base + ["--max-steps", "4", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "checkpoint-2" in printed
    assert (out / "checkpoint-4").is_dir()


def test_kd_from_a_store(folders, capsys):
    store = folders / "store1"
    common = ["--teacher", f"{folders}/teacher0", "--sequences", "8", "--seq-len", "16",
              "--batch", "4", "--quiet"]
    assert cli.main(["label", *common, "--k", "8", "--out", str(store)]) == 0
    assert cli.main(["kd", *common, "--student", str(folders / "student.json"), "--held-out", "4",
                     "--max-steps", "2", "--soft-labels", str(store),
                     "--out", str(folders / "kd_store")]) == 0
    assert "held-out CE" in capsys.readouterr().out


def test_bad_specs_are_clear_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="not 'smollm2' and not a local model folder"):
        jobs.load_causal_lm(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not 'kjv' and not a text file"):
        jobs.text_passages(str(tmp_path / "none.txt"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        jobs.build_student(str(tmp_path / "bad.json"), V)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: no text"):
        jobs.text_passages(str(tmp_path / "empty.txt"))


def _kd_args(folders, out, **kw):
    return dict(dict(teacher=f"{folders}/teacher0", student=str(folders / "student.json"),
                     sequences=12, seq_len=16, batch=4, held_out=4, save_steps=2, out=str(out),
                     quiet=True), **kw)


def test_resume_at_max_steps_trains_nothing_and_before_is_the_checkpoints(folders, capfd):
    out = folders / "kd_resume"
    first = jobs.kd(**_kd_args(folders, out, max_steps=2))
    assert first["global_step"] == 2 and not first["already_done"]
    capfd.readouterr()
    again = jobs.kd(**_kd_args(folders, out, max_steps=2, resume=True))
    assert again["already_done"] and again["global_step"] == 2
    assert not (out / "checkpoint-3").exists()
    assert cli.main(["kd", "--teacher", f"{folders}/teacher0", "--student",
                     str(folders / "student.json"), "--sequences", "12", "--seq-len", "16",
                     "--batch", "4", "--held-out", "4", "--max-steps", "2", "--resume",
                     "--out", str(out), "--quiet"]) == 0
    assert "already at max-steps" in capfd.readouterr().out
    assert not (out / "checkpoint-3").exists()
    # on to step 4: "before" is the model of checkpoint-2, i.e. the first run's "after"
    more = jobs.kd(**_kd_args(folders, out, max_steps=4, resume=True))
    err = capfd.readouterr().err
    assert more["resumed_from"].endswith("checkpoint-2") and more["global_step"] == 4
    for key in ("ce", "kl"):
        assert more["before"][key] == pytest.approx(first["after"][key], rel=1e-6)
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-5").exists()
    assert "missing keys" not in err, err  # the tied head is declared: HF re-ties it
    assert "PAD/BOS/EOS" not in err, err  # the student's configs carry the tokenizer's ids
    assert "Loading weights" not in err and "Writing model shards" not in err, err  # quiet


def test_resume_without_a_checkpoint_is_an_error(folders, tmp_path):
    with pytest.raises(jobs.SettingsError, match="no checkpoint .* in .*: nothing to resume"):
        jobs.kd(**_kd_args(folders, tmp_path / "none", max_steps=2, resume=True))
    assert not (tmp_path / "none").exists()


def test_kd_refuses_a_store_of_other_settings(folders, tmp_path):
    store = tmp_path / "small_store"
    common = dict(teacher=f"{folders}/teacher0", data="kjv", seq_len=16, progress=False)
    assert jobs.label(out=str(store), sequences=6, k=8, batch=4, **common) == {
        "stored_before": 0, "labelled": 6}
    kw = _kd_args(folders, tmp_path / "kd", max_steps=2, soft_labels=str(store))
    with pytest.raises(jobs.SettingsError, match="sequences: the store has 6, this run 12"):
        jobs.kd(**kw)
    with pytest.raises(jobs.SettingsError, match="seq_len: the store has 16, this run 32"):
        jobs.kd(**dict(kw, sequences=6, seq_len=32))
    with pytest.raises(jobs.SettingsError, match="temperature: the store has 1.0, this run 2.0"):
        jobs.kd(**dict(kw, sequences=6, temperature=2.0))
    with pytest.raises(jobs.SettingsError, match="teacher: the store has .*teacher0, this run "
                                                 ".*teacher1"):
        jobs.kd(**dict(kw, sequences=6, teacher=f"{folders}/teacher1"))
    assert not (tmp_path / "kd").exists()
    # a rerun of label with other settings is refused, naming the difference
    with pytest.raises(jobs.SettingsError, match="k: the store has 8, this run 4"):
        jobs.label(out=str(store), sequences=6, k=4, batch=4, **common)
    with pytest.raises(jobs.SettingsError, match="sequences: the store has 6, this run 7"):
        jobs.label(out=str(store), sequences=7, k=8, batch=4, **common)
    assert jobs.label(out=str(store), sequences=6, k=8, batch=2, **common) == {
        "stored_before": 6, "labelled": 0}
    # a store that is not label's own (no label_settings.json) is refused too
    (store / jobs.LABEL_SETTINGS).unlink()
    with pytest.raises(jobs.SettingsError, match="no label_settings.json"):
        jobs.kd(**dict(kw, sequences=6))
    with pytest.raises(jobs.SettingsError, match="without label_settings.json"):
        jobs.label(out=str(store), sequences=6, k=8, batch=4, **common)


def test_label_checks_k_before_making_the_folder(folders, tmp_path):
    with pytest.raises(ValueError, match="k"):
        jobs.label(teacher=f"{folders}/teacher0", data="kjv", out=str(tmp_path / "s"),
                   sequences=2, seq_len=16, k=V + 1, progress=False)
    assert not (tmp_path / "s").exists()


def test_the_teacher_and_student_carry_the_tokenizers_special_tokens(folders):
    (model,), tok = jobs.load_teachers(f"{folders}/teacher0")
    assert tok.pad_token_id is not None
    for cfg in (model.config, model.generation_config):
        assert cfg.pad_token_id == tok.pad_token_id
    student = jobs.build_student(str(folders / "student.json"), V)
    assert student._keys_to_ignore_on_save == {"lm_head.weight"}
    assert defaults.small_student(V, hidden=16, layers=1, heads=2)._keys_to_ignore_on_save == {
        "lm_head.weight"}
