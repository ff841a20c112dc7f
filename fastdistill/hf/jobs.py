"""What ``fastdistill kd`` and ``fastdistill label`` run: models and text named on
the command line, resolved without any download.

``--teacher``: ``smollm2`` (the packaged SmolLM2-135M-Instruct) or a local
Hugging Face model folder; several, comma-separated, make a mixture.
``--student``: ``small`` (``defaults.small_student``), a local model folder, or
a ``config.json`` (a fresh model of that config). ``--data``: ``kjv`` (the
packaged King James Bible) or a UTF-8 text file (one passage per line).
"""
from __future__ import annotations

import json
import os

import torch

from .defaults import kjv_verses, load_teacher, small_student, token_windows
from .trainer import TeacherMixture  # noqa: F401 - label's mixture of teachers


def load_causal_lm(spec: str):
    """(model, tokenizer or None) of ``smollm2`` or a local HF model folder."""
    if spec == "smollm2":
        return load_teacher()
    if not os.path.isdir(spec):
        raise ValueError(f"model {spec!r}: not 'smollm2' and not a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok


def load_teachers(spec: str):
    """The teachers of a comma-separated ``--teacher`` and the first tokenizer found."""
    models, tok = [], None
    for part in spec.split(","):
        m, t = load_causal_lm(part.strip())
        models.append(m.eval())
        tok = tok or t
    if tok is None:
        raise ValueError(f"no tokenizer in any of the teachers {spec!r}")
    return models, tok


def build_student(spec: str, vocab_size: int):
    """The student of ``--student``: ``small``, a model folder, or a config.json."""
    if spec == "small":
        return small_student(vocab_size)
    if spec.endswith(".json"):
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isfile(spec):
            raise ValueError(f"student config {spec!r}: no such file")
        with open(spec) as f:
            try:
                cfg = json.load(f)
            except ValueError as e:
                raise ValueError(f"{spec}: not JSON ({e})") from None
        model_type = cfg.pop("model_type", "llama")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    model, _ = load_causal_lm(spec)
    return model


def text_passages(spec: str) -> list[str]:
    """The passages of ``--data``: the KJV verses or a text file's non-empty lines."""
    if spec == "kjv":
        return kjv_verses()
    if not os.path.isfile(spec):
        raise ValueError(f"data {spec!r}: not 'kjv' and not a text file")
    with open(spec, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [x for x in lines if x]
    if not lines:
        raise ValueError(f"{spec}: no text")
    return lines


def windows(tok, spec: str, n: int, seq_len: int, held_out: int = 0):
    """(train, held-out) token windows from disjoint parts of the text."""
    passages = text_passages(spec)
    if held_out:
        cut = int(len(passages) * 0.9)
        return (token_windows(tok, passages[:cut], n, seq_len),
                token_windows(tok, passages[cut:], held_out, seq_len))
    return token_windows(tok, passages, n, seq_len), None


def label(*, teacher: str, data: str, out: str, k: int = 32, value_bits: int = 8,
          temperature: float = 1.0, sequences: int = 512, seq_len: int = 128, batch: int = 8,
          teacher_weights=None, progress: bool = True) -> int:
    """Fill the soft-label store ``out`` with the teacher's (or the teachers'
    mixture's) top-k rows for ``sequences`` windows of ``data``, keyed by window
    index ("0", "1", ...: what ``kd --soft-labels`` aligns by). Resumable: a rerun
    skips the windows already stored. Returns the number written."""
    from ..softlabels import SoftLabelWriter, label_tokens

    models, tok = load_teachers(teacher)
    model = models[0] if len(models) == 1 else TeacherMixture(models, teacher_weights,
                                                              temperature)
    ids, _ = windows(tok, data, sequences, seq_len)
    V = models[0].get_output_embeddings().weight.shape[0]
    with SoftLabelWriter(out, vocab_size=V) as writer:
        return label_tokens(model, [ids[a:a + batch] for a in range(0, len(ids), batch)], writer,
                            k=k, value_bits=value_bits, temperature=temperature,
                            progress=progress)


def kd(*, teacher: str, student: str = "small", data: str = "kjv", out: str = "kd_out",
       max_steps: int = 100, divergence: str = "forward_kl", temperature: float = 1.0,
       batch: int = 8, seq_len: int = 128, sequences: int = 512, held_out: int = 32,
       learning_rate: float = 3e-3, soft_labels: str | None = None, resume: bool = False,
       teacher_weights=None, save_steps: int = 50, **config) -> dict:
    """Distil ``teacher`` into ``student`` on ``data`` with KDTrainer, checkpointing
    into ``out`` every ``save_steps`` (``resume=True`` continues from the last
    checkpoint there); the final model and tokenizer are saved in ``out``. With
    ``soft_labels`` (a store filled by ``label`` on the same data and window
    options) the teacher only gives the tokenizer. Returns the held-out metrics
    before and after."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..softlabels import SoftLabelStore
    from .demo import TokenWindows, collate
    from .trainer import KDConfig, KDTrainer

    teachers, tok = load_teachers(teacher)
    V = teachers[0].get_output_embeddings().weight.shape[0]
    model = build_student(student, V)
    train_ids, eval_ids = windows(tok, data, sequences, seq_len, held_out)
    store = SoftLabelStore(soft_labels) if soft_labels else None
    cfg = KDConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch,
                   per_device_eval_batch_size=batch, learning_rate=learning_rate,
                   lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 10),
                   logging_steps=max(1, max_steps // 10), save_strategy="steps",
                   save_steps=save_steps, report_to=[], use_cpu=not torch.cuda.is_available(),
                   divergence=divergence, temperature=temperature,
                   teacher_weights=teacher_weights, taid=divergence == "taid", **config)
    trainer = KDTrainer(model=model, teacher_model=None if store else teachers, args=cfg,
                        soft_labels=store, train_dataset=TokenWindows(train_ids),
                        data_collator=collate, processing_class=tok)
    # held-out metrics against the (first) teacher, online: the store holds training text only
    from .demo import held_out_metrics
    from .trainer import _hidden_states, lm_head_of

    with torch.no_grad():
        t_hidden = torch.cat([_hidden_states(teachers[0], {"input_ids": eval_ids[a:a + batch]})
                              [:, :-1] for a in range(0, len(eval_ids), batch)])
    t_head = lm_head_of(teachers[0])
    before = held_out_metrics(model, eval_ids, t_hidden, t_head)
    last = get_last_checkpoint(out) if resume and os.path.isdir(out) else None
    trainer.train(resume_from_checkpoint=last)
    after = held_out_metrics(model, eval_ids, t_hidden, t_head)
    trainer.save_model(out)
    if tok is not None:
        tok.save_pretrained(out)
    return {"before": before, "after": after, "resumed_from": last}
