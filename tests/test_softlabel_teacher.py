"""label_tokens: a tiny random Llama teacher (no download) labelling into a real store."""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="label_tokens tests need the 'hf' extra")

from fastdistill.softlabels import encode, label_tokens  # noqa: E402
from fastdistill.softlabels.store import SoftLabelStore, SoftLabelWriter  # noqa: E402
from fastdistill.softlabels.teacher import _sequence_seed  # noqa: E402

V = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.5)  # wide init: peaked, distinct logits rather than near-uniform
    return transformers.LlamaForCausalLM(cfg).eval()


class Counting(torch.nn.Module):
    """The model, recording the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.shape[0])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def right_padded(seed, lengths, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches3():
    return [right_padded(1, [12, 7, 3]), right_padded(2, [5, 12]), right_padded(3, [9, 1, 12])]


def read(path):
    store = SoftLabelStore(path)
    return store, {key: store[key].labels for key in store}


OPTIONS = [dict(method="topk", k=8), dict(method="topk", k=16, value_bits=8),
           dict(method="sampled", n_samples=24, seed=5)]


@pytest.mark.parametrize("opts", OPTIONS, ids=["top8-16bit", "top16-8bit", "sampled24"])
def test_entries_are_encode_of_the_models_own_logits(model, tmp_path, opts):
    batches = batches3()
    with SoftLabelWriter(tmp_path, vocab_size=V) as w:
        n = label_tokens(model, batches, w, progress=False, **opts)
    assert n == 8
    store, entries = read(tmp_path)
    assert store.keys() == [str(i) for i in range(8)]
    key = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch).logits
            for b in range(logits.shape[0]):
                kept = logits[b][batch["attention_mask"][b].bool()]
                enc_opts = dict(opts)
                if opts["method"] == "sampled":
                    enc_opts["seed"] = _sequence_seed(opts["seed"], key)
                want = encode(kept, **enc_opts)
                got = entries[str(key)]
                assert got.codec == want.codec
                assert tuple(got.shape) == (int(batch["attention_mask"][b].sum()),)
                assert torch.equal(got.data, want.data)
                for a, e in zip(got.decode(), want.decode()):
                    assert torch.equal(a, e)
                key += 1


def test_mask_trimming_keeps_exactly_the_unpadded_sequence(model, tmp_path):
    """Padded positions are dropped, and what is kept is the sequence's own
    distribution: the same as running it alone without padding (k = V so
    every token is stored and near-ties cannot reorder the kept set)."""
    lengths = [12, 7, 3, 0]
    batch = right_padded(4, lengths)
    batch["input_ids"][batch["attention_mask"] == 0] = 299  # pad ids must not matter
    with SoftLabelWriter(tmp_path, vocab_size=V) as w:
        assert label_tokens(model, [batch], w, k=V, progress=False) == 4
    _, entries = read(tmp_path)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            got = entries[str(b)]
            assert tuple(got.shape) == (n,)
            if n == 0:
                continue
            alone = model(input_ids=batch["input_ids"][b:b + 1, :n]).logits[0]
            want = torch.log_softmax(alone.double(), -1).float()
            torch.testing.assert_close(got.to_dense(), want, atol=2e-3, rtol=2e-3)


def test_plain_tensor_batches_and_given_keys(model, tmp_path):
    ids = [torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    with SoftLabelWriter(tmp_path, vocab_size=V) as w:
        n = label_tokens(model, iter(ids), w, k=4, keys=("a", "b", "c", "d"), progress=False)
    assert n == 4
    store, entries = read(tmp_path)
    assert store.keys() == ["a", "b", "c", "d"]
    with torch.no_grad():
        logits = model(input_ids=ids[1]).logits
    assert tuple(entries["c"].shape) == (6,)
    assert torch.equal(entries["d"].data, encode(logits[1], k=4).data)


def test_resume_skips_stored_sequences_without_running_the_model(model, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    opts = dict(method="sampled", n_samples=16, seed=11, progress=False)
    with SoftLabelWriter(full, vocab_size=V) as w:
        assert label_tokens(model, batches3(), w, **opts) == 8
    with SoftLabelWriter(part, vocab_size=V) as w:  # interrupted after the first two batches
        assert label_tokens(model, batches3()[:2], w, **opts) == 5
    counting = Counting(model)
    with SoftLabelWriter(part, vocab_size=V) as w:
        assert len(w) == 5
        assert label_tokens(counting, batches3(), w, **opts) == 3
    assert counting.calls == [3]  # batches 0 and 1 never reached the model
    _, want = read(full)
    _, got = read(part)
    assert sorted(got) == sorted(want)
    for key in want:  # per-sequence seeds: the resumed run drew what the full run drew
        assert torch.equal(got[key].data, want[key].data)

    # a batch with one missing sequence runs the model on that sequence alone
    with SoftLabelWriter(tmp_path / "gap", vocab_size=V) as w:
        label_tokens(model, batches3()[:1], w, keys=[0, 2, 99], progress=False, k=8)
    counting.calls.clear()
    with SoftLabelWriter(tmp_path / "gap", vocab_size=V) as w:
        assert label_tokens(counting, batches3()[:1], w, progress=False, k=8) == 1
        assert "1" in w
    assert counting.calls == [1]
    _, gap = read(tmp_path / "gap")
    with torch.no_grad():
        logits = model(**batches3()[0]).logits
    torch.testing.assert_close(gap["1"].to_dense(), encode(logits[1, :7], k=8).to_dense())


def test_vocab_mismatch_is_an_error_and_writes_nothing(model, tmp_path):
    with SoftLabelWriter(tmp_path, vocab_size=V + 1) as w:
        with pytest.raises(ValueError, match=r"vocabulary .*300.* vocab_size \(301\)"):
            label_tokens(model, batches3(), w, progress=False)
        assert len(w) == 0


def test_bad_arguments(model, tmp_path):
    batch = right_padded(1, [3, 4])
    with SoftLabelWriter(tmp_path, vocab_size=V) as w:
        with pytest.raises(TypeError, match="iterable of batches"):
            label_tokens(model, batch["input_ids"], w)
        with pytest.raises(TypeError, match="batch 0 must be"):
            label_tokens(model, [[1, 2, 3]], w, progress=False)
        with pytest.raises(ValueError, match="without 'input_ids'"):
            label_tokens(model, [{"ids": batch["input_ids"]}], w, progress=False)
        with pytest.raises(TypeError, match="input_ids must be an integer"):
            label_tokens(model, [batch["input_ids"].float()], w, progress=False)
        with pytest.raises(ValueError, match=r"shape \(B, T\)"):
            label_tokens(model, [batch["input_ids"][0]], w, progress=False)
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            label_tokens(model, [{**batch, "attention_mask": batch["attention_mask"][:, :5]}], w,
                         progress=False)
        with pytest.raises(ValueError, match="only 0 and 1"):
            label_tokens(model, [{**batch, "attention_mask": batch["attention_mask"] * 2}], w,
                         progress=False)
        with pytest.raises(ValueError, match="k applies to method='topk'"):
            label_tokens(model, [batch], w, method="sampled", k=4, n_samples=8)
        with pytest.raises(ValueError, match="k must be in"):
            label_tokens(model, [batch], w, k=V + 1)
        with pytest.raises(ValueError, match="value_bits"):
            label_tokens(model, [batch], w, value_bits=4)
        with pytest.raises(ValueError, match="method must be one of"):
            label_tokens(model, [batch], w, method="dense")
        with pytest.raises(TypeError, match="progress must be a bool"):
            label_tokens(model, [batch], w, progress=1)
        with pytest.raises(TypeError, match="writer must be a SoftLabelWriter"):
            label_tokens(model, [batch], {}, progress=False)
        with pytest.raises(TypeError, match="not a single string"):
            label_tokens(model, [batch], w, keys="ab", progress=False)
        with pytest.raises(ValueError, match="keys ran out at sequence 1"):
            label_tokens(model, [batch], w, keys=["x"], progress=False)
        with pytest.raises(ValueError, match="given to two sequences"):
            label_tokens(model, [batch], w, keys=[5, "5"], progress=False)
        with pytest.raises(TypeError, match="no .logits tensor"):
            label_tokens(lambda input_ids, attention_mask: (input_ids,), [batch], w,
                         progress=False)
        assert len(w) == 0  # every failure above came before anything was added
        label_tokens(model, [batch], w, k=8, progress=False)
        with pytest.raises(ValueError, match="already holds codec"):  # before the model runs
            label_tokens(model, [batch], w, k=4, keys=["y", "z"], progress=False)


def test_model_is_put_in_eval_mode_and_restored(model, tmp_path):
    model.train()
    seen = []

    def hook(module, args):
        seen.append(module.training)

    handle = model.register_forward_pre_hook(hook)
    try:
        with SoftLabelWriter(tmp_path, vocab_size=V) as w:
            label_tokens(model, batches3()[:1], w, k=4, progress=False)
    finally:
        handle.remove()
        assert model.training
        model.eval()
    assert seen == [False]


def test_progress_goes_to_stderr_and_is_silenced(model, tmp_path, capfd, monkeypatch):
    with SoftLabelWriter(tmp_path / "a", vocab_size=V) as w:
        label_tokens(model, batches3()[:1], w, k=4, progress=False)
    assert capfd.readouterr() == ("", "")
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the plain fallback
    with SoftLabelWriter(tmp_path / "b", vocab_size=V) as w:
        label_tokens(model, batches3()[:2], w, k=4)
    out, err = capfd.readouterr()
    assert out == ""
    assert "2/2 batches, 5 sequences written, 0 already stored (done)" in err
