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
    assert "6 sequences labelled" in capsys.readouterr().out
    assert cli.main(args) == 0  # everything stored already: nothing to do
    assert "0 sequences labelled" in capsys.readouterr().out
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
