"""fastdistill.hf.KDTrainer on tiny random Llama models: its loss equals kd_loss on
the materialized logits (values and student gradients), on-policy batches, the
TAID state across HF's resume_from_checkpoint, evaluate()'s metrics, bad input."""
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fastdistill as fd  # noqa: E402
from fastdistill import softlabels as sl  # noqa: E402
from fastdistill.hf import KDConfig, KDTrainer  # noqa: E402

V = 61
SEQ = 11


def _llama(seed, vocab=V, hidden=32, layers=2, tie=True, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=12, seed=0, vocab=V):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :3] = -100          # a prompt
        self.labels[1::3, -2:] = -100      # and some padding-like tail

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def _collate(feats):
    out = {k: torch.stack([f[k] for f in feats]) for k in ("input_ids", "attention_mask", "labels")}
    for k in feats[0]:
        if k not in out:
            out[k] = [f[k] for f in feats]
    return out


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                per_device_eval_batch_size=4, max_steps=4, learning_rate=1e-3, report_to=[],
                logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return KDConfig(**base)


def _batch(data, n=4):
    return _collate([data[i] for i in range(n)])


def _loss_and_grad(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _reference(student, teacher_logits_fn, batch, **kw):
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher_logits_fn(batch)
    loss = fd.kd_loss(logits[:, :-1], t[:, :-1], labels=batch["labels"][:, 1:], backend="torch",
                      **kw)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]


def _close(got, want):
    (lg, gg), (lw, gw) = got, want
    torch.testing.assert_close(lg, lw, rtol=2e-4, atol=1e-6)
    assert len(gg) == len(gw)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("div", fd.DIVERGENCES)
def test_loss_equals_kd_loss_on_the_materialized_logits(tmp_path, div, fused_head):
    student, teacher = _llama(0), _llama(1, hidden=48, tie=False)
    data = _Data()
    kw = dict(divergence=div, temperature=2.0, hard_weight=0.25)
    extra = {"taid": True} if div == "taid" else {}
    tr = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                   args=_args(tmp_path, fused_head=fused_head, **kw, **extra), train_dataset=data)
    if div == "taid":
        kw["taid_t"] = tr.taid.t
    batch = _batch(data)
    want = _reference(student, lambda b: teacher(input_ids=b["input_ids"]).logits, batch, **kw)
    _close(_loss_and_grad(tr, student, batch), want)


@pytest.mark.parametrize("mode", ["pad", "truncate"])
def test_vocab_mismatch(tmp_path, mode):
    student, teacher = _llama(0), _llama(1, vocab=V + 7)
    data = _Data()
    with pytest.raises(ValueError, match="vocab_mismatch='pad'"):
        KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                  args=_args(tmp_path), train_dataset=data)
    tr = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                   args=_args(tmp_path, vocab_mismatch=mode, divergence="jsd"), train_dataset=data)
    batch = _batch(data)
    want = _reference(student, lambda b: teacher(input_ids=b["input_ids"]).logits, batch,
                      divergence="jsd", vocab_mismatch=mode)
    _close(_loss_and_grad(tr, student, batch), want)


@pytest.mark.parametrize("fused_head", [True, False])
def test_multi_teacher_mixture(tmp_path, fused_head):
    student, t1, t2 = _llama(0), _llama(1), _llama(2, hidden=48)
    data = _Data()
    T, w = 2.0, [0.25, 0.75]
    tr = KDTrainer(model=student, teacher_model=[t1, t2], data_collator=_collate,
                   args=_args(tmp_path, temperature=T, teacher_weights=w, fused_head=fused_head),
                   train_dataset=data)

    def mixture(b):
        p = sum(wi * torch.softmax(t(input_ids=b["input_ids"]).logits / T, -1)
                for wi, t in zip(w, (t1, t2)))
        return T * p.log()

    want = _reference(student, mixture, _batch(data), temperature=T)
    _close(_loss_and_grad(tr, student, _batch(data)), want)


@pytest.mark.parametrize("by_index", [True, False])
def test_offline_soft_label_store(tmp_path, by_index):
    student, teacher = _llama(0), _llama(1)
    data = _Data()
    store_dir = tmp_path / "labels"
    keys = None if by_index else [f"ex-{i}" for i in range(len(data))]
    with sl.SoftLabelWriter(store_dir, vocab_size=V) as w:
        sl.label_tokens(teacher, [data.ids[i:i + 4] for i in range(0, len(data), 4)], w, k=8,
                        value_bits=16, keys=keys, progress=False)
    store = sl.SoftLabelStore(store_dir)

    class Keyed(_Data):
        def __getitem__(self, i):
            return dict(super().__getitem__(i), example_id=f"ex-{i}")

    ds = _Data() if by_index else Keyed()
    tr = KDTrainer(model=student, soft_labels=store, data_collator=_collate,
                   args=_args(tmp_path), train_dataset=ds)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    assert batch["example_id"] == ([str(i) for i in range(4)] if by_index
                                   else [f"ex-{i}" for i in range(4)])
    got = _loss_and_grad(tr, student, batch)
    # the reference: sparse_kd_loss on the decoded top-8 with the stored tail
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    entries = [store[k].labels for k in batch["example_id"]]
    packed = sl.SoftLabels(entries[0].codec, torch.stack([e.data for e in entries]))[:, :-1]
    want_loss = sl.kd_loss(logits, packed, labels=batch["labels"][:, 1:], backend="torch")
    want_loss.backward()
    want = (want_loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None])
    _close(got, want)
    tr.train()  # and a few real steps through HF's loop


def test_training_reduces_the_loss_and_evaluate_reports_the_metrics(tmp_path):
    student, teacher = _llama(0), _llama(1)
    data = _Data(n=16)
    tr = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                   args=_args(tmp_path, max_steps=12, learning_rate=5e-3), train_dataset=data,
                   eval_dataset=_Data(n=8, seed=1))
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    for m in (before, after):
        assert set(m) >= {"eval_loss", "eval_ce", "eval_ppl", "eval_kl_to_teacher"}
        assert math.isclose(m["eval_ppl"], math.exp(m["eval_ce"]), rel_tol=1e-6)
    assert after["eval_kl_to_teacher"] < before["eval_kl_to_teacher"]
    # eval_kl_to_teacher is forward KL at T=1, token mean, on the eval set
    ev = _Data(n=8, seed=1)
    b = _collate([ev[i] for i in range(8)])
    with torch.no_grad():
        want = fd.kd_loss(student(input_ids=b["input_ids"]).logits[:, :-1],
                          teacher(input_ids=b["input_ids"]).logits[:, :-1],
                          labels=b["labels"][:, 1:], backend="torch")
    assert math.isclose(after["eval_kl_to_teacher"], float(want), rel_tol=1e-4)


def test_on_policy_batches_train_on_student_generations(tmp_path):
    student, teacher = _llama(0), _llama(1)
    data = _Data(n=8)
    tr = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                   args=_args(tmp_path, lmbda=1.0, max_new_tokens=5, max_steps=2),
                   train_dataset=data)
    seen = []
    orig = tr.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append({k2: v for k2, v in inputs.items() if isinstance(v, torch.Tensor)})
        return orig(model, inputs, *a, **k)

    tr.compute_loss = spy
    tr.train()
    assert len(seen) == 2
    for b in seen:
        # prompt: the 3 tokens before the first label; then 5 generated tokens
        assert b["input_ids"].shape[1] == 3 + 5
        assert (b["labels"][:, :3] == -100).all()
        assert (b["labels"][:, 3:][b["attention_mask"][:, 3:] == 1] >= 0).all()
    # the prompt is the data's own first 3 tokens
    firsts = {tuple(r.tolist()) for r in data.ids[:, :3]}
    assert all(tuple(r.tolist()) in firsts for b in seen for r in b["input_ids"][:, :3])


def test_taid_state_resumes_from_a_checkpoint(tmp_path):
    data = _Data(n=16)

    def run(max_steps, resume=None):
        tr = KDTrainer(model=_llama(0), teacher_model=_llama(1), data_collator=_collate,
                       args=_args(tmp_path, divergence="taid", taid=fd.TAIDSchedule(6),
                                  max_steps=max_steps, save_strategy="steps", save_steps=3),
                       train_dataset=data)
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(6)
    state6 = full.taid.state_dict()
    ckpt = os.path.join(str(tmp_path / "out"), "checkpoint-3")
    with open(os.path.join(ckpt, "fastdistill_taid.json")) as f:
        state3 = json.load(f)
    assert state3["num_steps"] == 3
    resumed = run(6, resume=ckpt)
    assert resumed.taid.num_steps == 6
    assert math.isclose(resumed.taid.t, state6["t"], rel_tol=1e-9)
    os.remove(os.path.join(ckpt, "fastdistill_taid.json"))
    with pytest.raises(ValueError, match="fastdistill_taid.json: missing"):
        run(6, resume=ckpt)


def test_bad_input_is_a_clear_error(tmp_path):
    student, teacher = _llama(0), _llama(1)
    data = _Data()
    with pytest.raises(ValueError, match="lmbda"):
        _args(tmp_path, lmbda=1.5)
    with pytest.raises(ValueError, match="divergence"):
        _args(tmp_path, divergence="kl")
    with pytest.raises(ValueError, match="temperature"):
        _args(tmp_path, temperature=0.0)
    with pytest.raises(TypeError, match="KDConfig"):
        KDTrainer(model=student, teacher_model=teacher,
                  args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(ValueError, match="teacher_model .* or soft_labels"):
        KDTrainer(model=student, args=_args(tmp_path), data_collator=_collate, train_dataset=data)
    store_dir = tmp_path / "other"
    with sl.SoftLabelWriter(store_dir, vocab_size=V + 1) as w:
        w.add("0", sl.encode(torch.randn(SEQ, V + 1), k=4))
    with pytest.raises(ValueError, match=f"vocabulary {V + 1}, the student {V}"):
        KDTrainer(model=student, soft_labels=sl.SoftLabelStore(store_dir), args=_args(tmp_path),
                  data_collator=_collate, train_dataset=data)
    with pytest.raises(ValueError, match="needs an online teacher"):
        KDTrainer(model=student, soft_labels=sl.SoftLabelStore(store_dir),
                  args=_args(tmp_path, lmbda=0.5), data_collator=_collate, train_dataset=data)


def test_fd_hf_is_imported_on_first_use():
    import subprocess
    import sys

    code = ("import sys, fastdistill as fd\n"
            "assert 'transformers' not in sys.modules\n"
            "assert fd.hf.KDTrainer.__mro__[1] is __import__('transformers').Trainer\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------- silent failures (issue 27)

def _store(tmp_path, data, keys=None, name="labels"):
    """A top-8 store of a tiny teacher's rows for ``data`` (keys "0".."n-1" by default)."""
    teacher = _llama(1)
    store_dir = tmp_path / name
    with sl.SoftLabelWriter(store_dir, vocab_size=V) as w:
        sl.label_tokens(teacher, [data.ids[i:i + 4] for i in range(0, len(data), 4)], w, k=8,
                        value_bits=16, keys=keys, progress=False)
    return sl.SoftLabelStore(store_dir)


class _KeyedData(_Data):
    def __getitem__(self, i):
        return dict(super().__getitem__(i), example_id=f"ex-{i}")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0",
                                                eos_token="t1")


@pytest.mark.parametrize("mode", ["fused", "unfused", "store", "store_unfused", "on_policy",
                                  "teachers"])
def test_a_batch_with_every_label_ignored_contributes_nothing(tmp_path, mode):
    """A prompt-only batch (labels all -100): HF passes num_items_in_batch=0; the
    loss is 0 with a zero gradient and plain SGD leaves every weight as it was
    (0/0 turned every weight into NaN)."""
    data = _Data(n=8)
    data.labels[:] = -100
    kw = dict(optim="sgd", learning_rate=0.5, weight_decay=0.0, max_steps=2,
              lr_scheduler_type="constant", fused_head=mode not in ("unfused", "store_unfused"))
    student = _llama(0)
    if mode.startswith("store"):
        teachers = dict(soft_labels=_store(tmp_path, data))
    elif mode == "teachers":
        teachers = dict(teacher_model=[_llama(1), _llama(2)])
        kw["teacher_weights"] = [1.0, 3.0]
    else:
        teachers = dict(teacher_model=_llama(1))
    if mode == "on_policy":
        kw.update(lmbda=1.0, max_new_tokens=3)
    tr = KDTrainer(model=student, data_collator=_collate, args=_args(tmp_path, **kw),
                   train_dataset=data, **teachers)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    for n in (0, torch.tensor(0), None):  # the summed loss / 0 items, and the token mean
        student.zero_grad()
        loss = tr.compute_loss(student, batch, num_items_in_batch=n)
        loss.backward()
        assert loss.item() == 0.0, (n, loss)
        assert all(p.grad is None or not p.grad.any() for p in student.parameters())
    before = [p.detach().clone() for p in student.parameters()]
    tr.train()
    for a, b in zip(before, student.parameters()):
        assert torch.equal(a, b.detach())
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(v == 0.0 for v in losses)


@pytest.mark.parametrize("fused_head", [True, False])
def test_a_non_finite_teacher_still_gives_nan_with_kept_labels(tmp_path, fused_head):
    """The empty batch's 0/0 is the only NaN made 0: a NaN teacher still shows."""
    student, teacher = _llama(0), _llama(1)
    data = _Data()
    tr = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                   args=_args(tmp_path, fused_head=fused_head), train_dataset=data)
    with torch.no_grad():  # after the head probe, which would refuse it
        teacher.get_output_embeddings().weight[3, 0] = math.nan
    batch = _batch(data)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert torch.isnan(tr.compute_loss(student, batch, num_items_in_batch=n))
    assert torch.isnan(tr.compute_loss(student, batch))


@pytest.mark.parametrize("weights,exc", [
    ([math.nan, 1.0], ValueError), ([math.inf, 1.0], ValueError), ([-1.0, 2.0], ValueError),
    ([0.0, 0.0], ValueError), ([], ValueError), ([1e308, 1e308], ValueError),
    (["1", 1.0], TypeError), ([True, 1.0], TypeError), (0.5, TypeError),
])
def test_teacher_weights_are_checked(tmp_path, weights, exc):
    with pytest.raises(exc, match="teacher_weights"):
        _args(tmp_path, teacher_weights=weights)
    with pytest.raises(exc, match="weights"):
        fd.hf.TeacherMixture([_llama(1), _llama(2)], weights if weights != [] else [1.0])
    assert _args(tmp_path, teacher_weights=[0.0, 2]).teacher_weights == [0.0, 2.0]


def test_teacher_weights_are_normalized(tmp_path):
    """[1, 3] and [0.25, 0.75] are the same mixture (normalized to sum 1)."""
    student, t1, t2 = _llama(0), _llama(1), _llama(2)
    data = _Data()
    losses = []
    for w in ([1.0, 3.0], [0.25, 0.75]):
        tr = KDTrainer(model=student, teacher_model=[t1, t2], data_collator=_collate,
                       args=_args(tmp_path, teacher_weights=w), train_dataset=data)
        losses.append(tr.compute_loss(student, _batch(data)).detach())
    torch.testing.assert_close(losses[0], losses[1])


def test_taid_resume_refuses_a_bad_state_naming_the_file(tmp_path):
    data = _Data(n=8)

    def trainer(max_steps):
        return KDTrainer(model=_llama(0), teacher_model=_llama(1), data_collator=_collate,
                         args=_args(tmp_path, divergence="taid", taid=fd.TAIDSchedule(4),
                                    max_steps=max_steps, save_strategy="steps", save_steps=2),
                         train_dataset=data)

    trainer(2).train()
    ckpt = os.path.join(str(tmp_path / "out"), "checkpoint-2")
    path = os.path.join(ckpt, "fastdistill_taid.json")
    with open(path) as f:
        good = json.load(f)
    for bad in (dict(good, t_start=1.4), dict(good, total_steps=0), dict(good, t="x")):
        with open(path, "w") as f:
            json.dump(bad, f)
        with pytest.raises(ValueError, match=r"checkpoint-2.fastdistill_taid.json: not a valid "
                                             r"TAID state: (t_start|total_steps|t) must"):
            trainer(4).train(resume_from_checkpoint=ckpt)


@pytest.mark.parametrize("keyed", [False, True])
def test_a_missing_store_entry_is_named_at_construction(tmp_path, keyed):
    data = _KeyedData() if keyed else _Data()
    keys = [f"ex-{i}" for i in range(len(data))] if keyed else None
    full = _store(tmp_path, data, keys=keys)
    # a store without the entries of examples 7 and 9
    part_dir = tmp_path / "part"
    with sl.SoftLabelWriter(part_dir, vocab_size=V) as w:
        for k in full.keys():
            if k not in ("7", "9", "ex-7", "ex-9"):
                w.add(k, full[k].labels)
    part = sl.SoftLabelStore(part_dir)
    want = "ex-7" if keyed else "7"
    with pytest.raises(ValueError, match=rf"2 of the 12 examples of train_dataset have no entry "
                                         rf"in the store at .*part .*'example_id'.*'{want}', '"):
        KDTrainer(model=_llama(0), soft_labels=part, data_collator=_collate, args=_args(tmp_path),
                  train_dataset=data)
    if keyed:
        with pytest.raises(ValueError, match="examples of eval_dataset .*'ex-9'"):
            KDTrainer(model=_llama(0), soft_labels=part, data_collator=_collate,
                      args=_args(tmp_path), train_dataset=_KeyedData(n=4), eval_dataset=data)
    # met at run time (the dataset changed after construction): the same clear error
    tr = KDTrainer(model=_llama(0), soft_labels=full, data_collator=_collate, args=_args(tmp_path),
                   train_dataset=data)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(4)])
    tr.soft_labels = part
    batch["example_id"] = [want] + batch["example_id"][1:]
    with pytest.raises(ValueError, match=rf"1 of the 4 examples of this batch .*'{want}'"):
        tr.compute_loss(tr.model, batch)


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("tokenizer", [False, True])
def test_offline_store_with_the_default_collator(tmp_path, keyed, tokenizer):
    """data_collator=None (HF's default_data_collator, or the causal-LM collator with a
    tokenizer) trains on a store, by index or by the key column."""
    data = _KeyedData() if keyed else _Data()
    store = _store(tmp_path, data, keys=[f"ex-{i}" for i in range(len(data))] if keyed else None)
    ds = [data[i] for i in range(len(data))]  # a list of dicts, as a tokenizer gives them
    tr = KDTrainer(model=_llama(0), soft_labels=store, args=_args(tmp_path, max_steps=2),
                   train_dataset=ds, processing_class=_tiny_tokenizer() if tokenizer else None)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)


def test_on_policy_prompt_ignores_rows_without_labels(tmp_path):
    """A row with every label ignored has no "first label": the prompt is the
    other rows' 3 tokens, not 0 tokens (argmax of an all-False row)."""
    data = _Data(n=4)
    data.labels[1] = -100
    tr = KDTrainer(model=_llama(0), teacher_model=_llama(1), data_collator=_collate,
                   args=_args(tmp_path, lmbda=1.0, max_new_tokens=2, max_steps=1),
                   train_dataset=data)
    out = tr._on_policy(tr.model, _batch(data))
    assert out["input_ids"].shape[1] == 3 + 2
    assert torch.equal(out["input_ids"][:, :3], data.ids[:, :3])


@pytest.mark.parametrize("fused_head", [True, False])
def test_without_labels_padding_counts_nowhere(tmp_path, fused_head):
    """A batch without a labels column (HF's DataCollatorWithPadding, the
    default with a tokenizer): the padded positions (attention mask 0) are not
    trained on; the loss equals the one with those positions labelled -100."""
    student, teacher = _llama(0), _llama(1)
    stack = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
    trainer = KDTrainer(model=student, teacher_model=teacher, data_collator=stack,
                        args=_args(tmp_path, fused_head=fused_head), train_dataset=_Data())
    batch = _batch(_Data())
    batch["attention_mask"][:, -4:] = 0            # right padding
    batch["input_ids"][:, -4:] = 0
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    want_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labelled = dict(unlabelled, labels=want_labels)
    _close(_loss_and_grad(trainer, student, unlabelled), _loss_and_grad(trainer, student, labelled))
    metrics = trainer.evaluate(eval_dataset=[{k: v[i] for k, v in unlabelled.items()}
                                             for i in range(4)])
    labelled_metrics = trainer.evaluate(eval_dataset=[{k: v[i] for k, v in labelled.items()}
                                                      for i in range(4)])
    assert metrics["eval_ce"] == pytest.approx(labelled_metrics["eval_ce"], rel=1e-5)


def test_a_partitioned_head_weight_is_refused_by_name(tmp_path):
    """ZeRO-3's symptom: a head whose weight is still a (0,) partition inside its
    forward. fused_head=True must refuse it naming the layout and the way out,
    not blame the user's tensor or compute a loss on it."""
    from fastdistill.hf.trainer import _whole_head_weight

    with pytest.raises(ValueError, match=r"the student's LM head weight has shape \(0,\).*"
                                         r"partitioned.*fused_head=False"):
        _whole_head_weight(torch.empty(0), "the student")
    w = torch.randn(V, 8)
    assert _whole_head_weight(w, "the student") is w
    student, teacher = _llama(0), _llama(1)
    trainer = KDTrainer(model=student, teacher_model=teacher, data_collator=_collate,
                        args=_args(tmp_path), train_dataset=_Data())
    head = student.get_output_embeddings()
    kept = head.weight
    head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside a gather
    try:
        with pytest.raises(ValueError, match="partitioned"):
            trainer.compute_loss(student, _batch(_Data()))
    finally:
        head.weight = kept
