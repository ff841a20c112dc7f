"""KDTrainer across tokenizers (teacher_tokenizer=): a student with its own
byte-level BPE, a teacher with SmolLM2's tokenizer, tiny random Llamas. The
trainer's loss equals fd.xtok.alm_loss composed by hand from full logits (values
and gradients), fused and unfused alike; training lowers it; the refusals."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import fastdistill as fd  # noqa: E402
from fastdistill.reference.xtok import uld_exact  # noqa: E402
from fastdistill.hf import KDConfig, KDTrainer  # noqa: E402
from fastdistill.hf.defaults import kjv_verses, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizers_pair():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(kjv_verses()[:300], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    student = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                                   eos_token="<|endoftext|>",
                                                   pad_token="<|endoftext|>")
    return student, load_tokenizer()


def llama(vocab, seed, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


TEXTS = [v + " Ünïcödé 世界." if i % 3 == 0 else v for i, v in enumerate(kjv_verses()[400:412])]


def trainer(pair, fused=True, learning_rate=3e-2, **kw):
    s_tok, t_tok = pair
    args = KDConfig(output_dir="/tmp/kd_xtok", report_to=[], use_cpu=True, fused_head=fused,
                    per_device_train_batch_size=4, max_steps=6, learning_rate=learning_rate,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                    disable_tqdm=True, dataloader_pin_memory=False, temperature=1.5,
                    max_length=48, **kw)
    return KDTrainer(model=llama(len(s_tok), 0), teacher_model=llama(len(t_tok), 1, hidden=48),
                     args=args, processing_class=s_tok, teacher_tokenizer=t_tok,
                     train_dataset=[{"text": t} for t in TEXTS],
                     eval_dataset=[{"text": t} for t in TEXTS[:5]])


def by_hand(tr, batch, hard_weight, loss_name):
    """The loss from full logits of both models: fd.xtok.alm_loss on log-probs, or
    the exact sorted-L1 (the float64 reference, full sorts) at the chunk pairs."""
    s_logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = tr.teachers[0](input_ids=batch["teacher_input_ids"],
                                  attention_mask=batch["teacher_attention_mask"]).logits
    if loss_name == "alm":
        s_lp = fd.xtok.token_logprobs(s_logits, batch["input_ids"])
        t_lp = fd.xtok.token_logprobs(t_logits, batch["teacher_input_ids"])
        loss = fd.xtok.alm_loss(batch["student_chunks"], batch["teacher_chunks"],
                                student_logprobs=s_lp, student_labels=batch["labels"],
                                teacher_logprobs=t_lp, teacher_labels=batch["teacher_labels"],
                                num_chunks=batch["num_chunks"], temperature=1.5)
    else:  # the teacher's top-k covers its whole vocabulary: the exact ULD
        s_pos, t_pos = fd.xtok.chunk_pairs(batch["student_chunks"], batch["teacher_chunks"])
        p = torch.softmax(t_logits.flatten(0, 1)[t_pos].double() / 1.5, -1)
        rows = uld_exact(s_logits.flatten(0, 1)[s_pos].double(), p, temperature=1.5)
        loss = (rows.mean() * 1.5 ** 2).float()
    ce = torch.nn.functional.cross_entropy(s_logits[:, :-1].flatten(0, 1),
                                           batch["labels"][:, 1:].flatten(), ignore_index=-100)
    return loss + hard_weight * ce


@pytest.mark.parametrize("loss_name", ["alm", "uld"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_loss_and_gradients_equal_the_loss_by_hand(tokenizers_pair, fused, loss_name):
    tr = trainer(tokenizers_pair, fused=fused, hard_weight=0.3, cross_tokenizer_loss=loss_name,
                 uld_top_k=len(tokenizers_pair[1]))
    batch = tr.data_collator([{"text": t} for t in TEXTS[:4]])
    assert batch["num_chunks"] > 20 and batch["input_ids"].shape != batch["teacher_input_ids"].shape
    got = tr.compute_loss(tr.model, batch)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got, params)
    want = by_hand(tr, batch, 0.3, loss_name)
    g_want = torch.autograd.grad(want, params)
    assert math.isfinite(want.item()) and want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["alm", "uld"])
def test_training_lowers_the_loss_and_evaluate_reports_the_ce(tokenizers_pair, loss_name):
    # AdamW at 3e-2 overshoots the sorted-L1 of these random models; 3e-3 descends
    tr = trainer(tokenizers_pair, hard_weight=0.0, cross_tokenizer_loss=loss_name,
                 learning_rate=3e-2 if loss_name == "alm" else 3e-3)
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    assert 0 < after["eval_ce"] < 10 and math.isnan(after["eval_kl_to_teacher"])


def test_refusals(tokenizers_pair):
    s_tok, t_tok = tokenizers_pair
    args = KDConfig(output_dir="/tmp/kd_xtok", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="processing_class"):
        KDTrainer(model=llama(len(s_tok), 0), teacher_model=llama(len(t_tok), 1), args=args,
                  teacher_tokenizer=t_tok)
    with pytest.raises(ValueError, match="one teacher_model"):
        KDTrainer(model=llama(len(s_tok), 0), teacher_model=[llama(len(t_tok), 1)] * 2,
                  args=args, processing_class=s_tok, teacher_tokenizer=t_tok)
    with pytest.raises(ValueError, match="on-policy"):
        KDTrainer(model=llama(len(s_tok), 0), teacher_model=llama(len(t_tok), 1),
                  args=KDConfig(output_dir="/tmp/kd_xtok", report_to=[], use_cpu=True,
                                lmbda=0.5), processing_class=s_tok, teacher_tokenizer=t_tok)
    with pytest.raises(ValueError, match="alm_divergence"):
        KDConfig(output_dir="/tmp/kd_xtok", report_to=[], alm_divergence="kl")
    tr = trainer(tokenizers_pair)
    with pytest.raises(ValueError, match="'text'"):
        tr.data_collator([{"body": "no text column"}])
