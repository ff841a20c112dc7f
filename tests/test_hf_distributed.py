"""KDTrainer across processes: 2 gloo ranks under torchrun (DDP, as the HF
Trainer sets it up on CPU) against one process on the same global batch. The
logged losses, evaluate()'s own metrics (eval_ce, eval_kl_to_teacher: summed
over the ranks, the last batch's padding copies dropped) and the final weights
agree to float32 reduction order (loss and metrics 1e-5 relative, weights
2e-5 relative after three plain-SGD steps, where a wrong gradient scale shows
at once)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("_kd_ranks_worker.py")
ROOT = Path(__file__).resolve().parents[1]


CASES = {  # test id: FUSED_HEAD:ACCUM:MODE of the worker
    "fused": "1:1:teacher", "unfused": "0:1:teacher", "fused-accum2": "1:2:teacher",
    "two-teachers": "1:1:teachers", "store": "1:1:store", "store-unfused": "0:1:store",
    "taid": "1:2:taid", "taid-resume": "1:1:taid-resume", "on-policy": "1:1:on-policy",
    "on-policy-unfused-accum2": "0:2:on-policy"}


def _launch(folder: Path, nproc: int, store: Path) -> None:
    """Every case in one launch (one process, or 2 ranks under torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
               f"--nproc_per_node={nproc}", str(WORKER)]
    cmd += [str(folder), "8", str(store), *CASES.values()]
    res = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{test id: (one process's results, rank 0's of 2 ranks)}: the store labelled
    once, then every case in one single-process and one 2-rank launch."""
    folder = tmp_path_factory.mktemp("ranks")
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _kd_ranks_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    _kd_ranks_worker.label_store(str(folder / "store"))
    for nproc in (1, 2):
        _launch(folder, nproc, folder / "store")
    return {name: tuple(torch.load(_kd_ranks_worker.case_file(str(folder), case, world),
                                   weights_only=True) for world in (1, 2))
            for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(runs, name):
    """Each rank reads its own batches' entries of one store (opened read-only by
    both at once); a mixture of two teachers is formed on each rank; TAID's t
    is the same on every rank and equals one process's."""
    mode = CASES[name].split(":")[2]
    one, two = runs[name]
    assert two["world"] == 2 and one["world"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5), (one["losses"], two["losses"])
    for key in ("eval_ce", "eval_ppl", "eval_kl_to_teacher"):  # token means over the whole set
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5,
                                                    nan_ok=True), key
    if mode == "taid-resume":  # resumed from checkpoint-2 (written by rank 0): every rank's
        # t is the uninterrupted run's, which is one process's
        assert two["uninterrupted_t"] == pytest.approx(one["uninterrupted_t"], rel=1e-9)
        for t in one["taid_t"] + two["taid_t"]:
            assert t == pytest.approx(one["uninterrupted_t"], rel=1e-9, abs=0)
    if mode in ("taid", "taid-resume"):  # every rank steps t on the global loss: one t
        (t_one,) = one["taid_t"]
        assert t_one != 0.4 and len(two["taid_t"]) == 2  # t moved past its start
        for t_rank in two["taid_t"]:
            assert t_rank == pytest.approx(t_one, rel=1e-9, abs=0), (one["taid_t"], two["taid_t"])
    if mode == "store":  # labelled at T=2: no KL at T=1 to report, the CE is there
        assert two["metrics"]["eval_kl_to_teacher"] != two["metrics"]["eval_kl_to_teacher"]
        assert 0 < two["metrics"]["eval_ce"] < 10
    # HF's eval_loss is the example-weighted mean of each batch's token mean: the batches of
    # 2 ranks hold other examples than one process's (and the padded last batch), so it is
    # close, not equal
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=3e-3)
    assert one["weights"].keys() == two["weights"].keys()
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=2e-5, atol=1e-6, msg=k)
    moved = [k for k in one["weights"] if "lm_head" in k or "embed" in k]
    assert moved  # the weights compared include the (tied) head that the loss trains


def _tiny_teacher_folder(path: Path, lines: list[str]) -> int:
    """A local HF model folder `fastdistill kd --teacher` takes: a byte-level BPE
    tokenizer trained on ``lines`` and a random 2-layer Llama of its vocabulary."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    vocab = len(fast)
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return vocab


def test_kd_cli_under_torchrun_equals_one_process(tmp_path):
    """README's launch line: `torchrun --nproc_per_node 2 -m fastdistill.cli kd ...`
    (per-device batch 2) trains what one process does with batch 4 (the same
    global batches), prints its summary once, saves one model and tokenizer, and
    exits 0 (the CLI closes the process group: a gloo process left with it open
    can abort at exit)."""
    import json

    import transformers

    from fastdistill.hf.defaults import kjv_verses

    lines = kjv_verses()[:400]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    teacher = tmp_path / "teacher"
    vocab = _tiny_teacher_folder(teacher, lines)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "hidden_size": 16,
                                   "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "max_position_embeddings": 64, "tie_word_embeddings": True}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"kd{nproc}"
        launch = ([sys.executable] if nproc == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}"])
        cmd = launch + ["-m", "fastdistill.cli", "kd", "--teacher", str(teacher),
                        "--student", str(student), "--data", str(text), "--max-steps", "3",
                        "--batch", str(batch), "--seq-len", "16", "--sequences", "16",
                        "--held-out", "4", "--save-steps", "2", "--quiet", "--out", str(out)]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        assert res.stdout.count("held-out CE") == 1, res.stdout  # rank 0 alone prints
        assert (out / "tokenizer.json").is_file() and (out / "checkpoint-2").is_dir()
        runs[nproc] = transformers.AutoModelForCausalLM.from_pretrained(
            out, local_files_only=True).state_dict()
    assert runs[1].keys() == runs[2].keys()
    for k, w in runs[1].items():
        torch.testing.assert_close(runs[2][k], w, rtol=1e-4, atol=1e-6, msg=k)
    start = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path / "kd1", local_files_only=True))
    assert not torch.equal(start.state_dict()["model.embed_tokens.weight"],
                           runs[1]["model.embed_tokens.weight"])  # it trained
