"""What ``fastdistill kd`` and ``fastdistill label`` run: models and text named on
the command line, resolved without any download.

``--teacher``: ``smollm2`` (the packaged SmolLM2-135M-Instruct) or a local
Hugging Face model folder; several, comma-separated, make a mixture.
``--student``: ``small`` (``defaults.small_student``), a local model folder, or
a ``config.json`` (a fresh model of that config). ``--data``: ``kjv`` (the
packaged King James Bible) or a UTF-8 text file (one passage per line).
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from ..softlabels.store import _fsync_dir  # the store's durable-rename helper
from .defaults import (align_special_tokens, declare_tied_weights, kjv_verses, load_teacher,
                       small_student, token_windows)
from .trainer import TeacherMixture  # noqa: F401 - label's mixture of teachers

LABEL_SETTINGS = "label_settings.json"  # in a store filled by `label`: what it was labelled with


class SettingsError(ValueError):
    """A job's options disagree with what is on disk already (a soft-label
    store's settings, the checkpoints in ``out``); raised before any model loads."""


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """transformers' progress bars (loading and saving weights) on or off for a block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def load_causal_lm(spec: str, *, progress: bool = True):
    """(model, tokenizer or None) of ``smollm2`` or a local HF model folder; the
    tokenizer has a pad token and the model's configs its PAD/BOS/EOS ids."""
    if spec == "smollm2":
        return load_teacher(progress=progress)
    if not os.path.isdir(spec):
        raise ValueError(f"model {spec!r}: not 'smollm2' and not a local model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    align_special_tokens(model, tok)
    return model, tok


def load_teachers(spec: str, *, progress: bool = True):
    """The teachers of a comma-separated ``--teacher`` and the first tokenizer found."""
    models, tok = [], None
    for part in spec.split(","):
        m, t = load_causal_lm(part.strip(), progress=progress)
        models.append(m.eval())
        tok = tok or t
    if tok is None:
        raise ValueError(f"no tokenizer in any of the teachers {spec!r}")
    return models, tok


def build_student(spec: str, vocab_size: int):
    """The student of ``--student``: ``small``, a model folder, or a config.json
    (initialized from seed 0, like ``small``); a tied LM head is declared (``defaults.declare_tied_weights``)."""
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
        torch.manual_seed(0)  # as small_student: the same fresh student on every run and rank
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    else:
        model, _ = load_causal_lm(spec)
    declare_tied_weights(model)
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


def _model_names(spec: str) -> list[str]:
    """``--teacher`` as settings compare it: packaged names as they are, folders absolute."""
    return [p if p == "smollm2" else os.path.abspath(p) for p in (x.strip() for x in spec.split(","))]


def _mixture_weights(spec: str, weights) -> list[float] | None:
    """The mixture's weights normalized to sum 1 (None for a single teacher)."""
    n = len(spec.split(","))
    if n == 1:
        return None
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    total = sum(w)
    return [x / total for x in w] if total > 0 else w


def label_settings(*, teacher: str, data: str, sequences: int, seq_len: int, k: int,
                   value_bits: int, temperature: float, teacher_weights=None) -> dict:
    """What a store filled by ``label`` holds, as ``label_settings.json`` records it."""
    return {"teacher": _model_names(teacher),
            "teacher_weights": _mixture_weights(teacher, teacher_weights),
            "data": data if data == "kjv" else os.path.abspath(data),
            "sequences": int(sequences), "seq_len": int(seq_len), "k": int(k),
            "value_bits": int(value_bits), "temperature": float(temperature)}


def read_label_settings(store: str) -> dict | None:
    """The ``label_settings.json`` of a store folder, or None if it has none."""
    path = os.path.join(store, LABEL_SETTINGS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except ValueError as e:
        raise SettingsError(f"{path}: not JSON ({e}); delete it only if you know what the "
                            "store was labelled with") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: not a JSON object")
    return settings


def write_label_settings(store: str, settings: dict) -> None:
    """Write ``label_settings.json`` atomically (temporary file, fsync, rename)."""
    path = os.path.join(store, LABEL_SETTINGS)
    tmp = os.path.join(store, f".{LABEL_SETTINGS}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(store)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
    return "none" if value is None else str(value)


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{key}: the store has {_show(stored.get(key))}, this run {_show(value)}"
            for key, value in wanted.items() if not _same(stored.get(key), value)]


# the settings `kd --soft-labels` must share with the store: the windows (keys "0", "1",
# ... are window indices of this text, count and length), the tokenizer (the teacher) and T
KD_STORE_SETTINGS = ("teacher", "data", "sequences", "seq_len", "temperature")


def check_store_for_kd(store: str, *, teacher: str, data: str, sequences: int, seq_len: int,
                       temperature: float) -> None:
    """A ``SettingsError`` naming each setting the store ``store`` (filled by
    ``label``) was labelled with that differs from this ``kd`` run's, or the
    windows it lacks; before anything is loaded."""
    from ..softlabels import SoftLabelStore

    stored = read_label_settings(store)
    if stored is None:
        raise SettingsError(f"--soft-labels {store}: no {LABEL_SETTINGS} in it, so it was not "
                            "filled by `fastdistill label`, whose settings the run must match "
                            "(its entries are keyed by window index)")
    wanted = label_settings(teacher=teacher, data=data, sequences=sequences, seq_len=seq_len,
                            k=0, value_bits=0, temperature=temperature)
    diff = _differences(stored, {k: wanted[k] for k in KD_STORE_SETTINGS})
    if diff:
        raise SettingsError(f"--soft-labels {store} was labelled with other settings than this "
                            f"run's: {'; '.join(diff)} (pass the store's, or label again)")
    keys = set(SoftLabelStore(store).keys())
    missing = [str(i) for i in range(sequences) if str(i) not in keys]
    if missing:
        raise SettingsError(f"--soft-labels {store} holds {sequences - len(missing)} of its "
                            f"{sequences} windows (window {missing[0]} is missing): rerun "
                            "`fastdistill label` with the same options to finish it")


def _check_label_rerun(out: str, settings: dict) -> None:
    """Refuse to add to a store labelled with other settings (naming them), or
    to one whose settings are unknown."""
    from ..softlabels.store import MANIFEST_NAME

    stored = read_label_settings(out)
    if stored is None:
        if os.path.exists(os.path.join(out, MANIFEST_NAME)):
            raise SettingsError(f"--out {out}: holds a soft-label store without "
                                f"{LABEL_SETTINGS} (not filled by `fastdistill label`), so "
                                "what it was labelled with is unknown: label into another folder")
        return
    diff = _differences(stored, settings)
    if diff:
        raise SettingsError(f"--out {out} was labelled with other settings: {'; '.join(diff)} "
                            "(a rerun resumes with the same settings only: label into another "
                            "folder, or pass the store's)")


def label(*, teacher: str, data: str, out: str, k: int = 32, value_bits: int = 8,
          temperature: float = 1.0, sequences: int = 512, seq_len: int = 128, batch: int = 8,
          teacher_weights=None, progress: bool = True, shard_bytes: int = 64 * 2**20) -> dict:
    """Fill the soft-label store ``out`` with the teacher's (or the teachers'
    mixture's) top-k rows for ``sequences`` windows of ``data``, keyed by window
    index ("0", "1", ...: what ``kd --soft-labels`` aligns by), and record the
    settings in ``out/label_settings.json``. Resumable: a rerun with the same
    settings skips the windows already stored; one with other settings is a
    ``SettingsError`` naming them (before any model loads). Returns
    ``{"stored_before": ..., "labelled": ...}`` (sequences found, and written now).

    Under ``torchrun``/``accelerate launch`` every rank runs this: the windows
    are split over the ranks, each labels its share into a staging store of
    its own and rank 0 merges them into ``out`` (and alone writes
    ``label_settings.json``); a rerun with any number of processes resumes
    (``fastdistill.softlabels.parallel`` has the design and the resume rule).
    ``shard_bytes``: the writers' (64 MiB, the store's default): how much each rank loses
    at most when killed."""
    from ..softlabels import encode
    from ..softlabels.parallel import label_windows

    settings = label_settings(teacher=teacher, data=data, sequences=sequences, seq_len=seq_len,
                              k=k, value_bits=value_bits, temperature=temperature,
                              teacher_weights=teacher_weights)
    _check_label_rerun(out, settings)
    with progress_bars(progress):
        models, tok = load_teachers(teacher, progress=progress)
    model = models[0] if len(models) == 1 else TeacherMixture(models, teacher_weights,
                                                              temperature)
    ids, _ = windows(tok, data, sequences, seq_len)
    V = models[0].get_output_embeddings().weight.shape[0]
    # the codec's own checks of k, value_bits, temperature against V, before the folder exists
    encode(torch.zeros(1, V), method="topk", k=k, value_bits=value_bits, temperature=temperature)

    def record_settings(writer):  # rank 0 alone, with the store open and locked
        if read_label_settings(out) is None:
            write_label_settings(out, settings)

    return label_windows(model, ids, out, batch=batch, k=k, value_bits=value_bits,
                         temperature=temperature, progress=progress, vocab_size=V,
                         shard_bytes=shard_bytes, prepare=record_settings)


def _global_step(checkpoint: str) -> int:
    """The step a checkpoint folder was saved at (its trainer_state.json)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SettingsError(f"{checkpoint}: no readable trainer_state.json with a global_step "
                            f"({e}); not a checkpoint of the HF Trainer") from None


def _load_checkpoint_weights(model, checkpoint: str) -> None:
    """The weights of ``checkpoint`` into ``model`` (the student of this run's
    --student), so its "before" metrics are the checkpoint's."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise SettingsError(f"{checkpoint} does not fit this run's --student: {e}") from None


def kd(*, teacher: str, student: str = "small", data: str = "kjv", out: str = "kd_out",
       max_steps: int = 100, divergence: str = "forward_kl", temperature: float = 1.0,
       batch: int = 8, seq_len: int = 128, sequences: int = 512, held_out: int = 32,
       learning_rate: float = 3e-3, soft_labels: str | None = None, resume: bool = False,
       teacher_weights=None, save_steps: int = 50, quiet: bool = False, **config) -> dict:
    """Distil ``teacher`` into ``student`` on ``data`` with KDTrainer, checkpointing
    into ``out`` every ``save_steps`` (``resume=True`` continues from the last
    checkpoint there: a ``SettingsError`` if there is none); the final model and
    tokenizer are saved in ``out``. With ``soft_labels`` (a store filled by
    ``label`` with the same teacher, data, window options and temperature:
    checked first) the teacher only gives the tokenizer and the held-out KL.
    ``quiet``: no progress bars and no per-step logs.

    Returns ``{"before", "after", "resumed_from", "global_step", "already_done"}``:
    the held-out metrics before (of the checkpoint's model when resuming) and
    after. A resumed run whose checkpoint is at ``max_steps`` already trains
    nothing and loads nothing: ``already_done`` is True and the metrics None."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from ..softlabels import SoftLabelStore
    from .demo import TokenWindows, collate
    from .trainer import KDConfig, KDTrainer

    if soft_labels:
        check_store_for_kd(soft_labels, teacher=teacher, data=data, sequences=sequences,
                           seq_len=seq_len, temperature=temperature)
    last, step = None, 0
    if resume:
        last = get_last_checkpoint(out) if os.path.isdir(out) else None
        if last is None:
            raise SettingsError(f"--resume: no checkpoint (checkpoint-N folder) in {out}: "
                                "nothing to resume; run without --resume to start fresh")
        step = _global_step(last)
        if step >= max_steps:
            return {"before": None, "after": None, "resumed_from": last, "global_step": step,
                    "already_done": True}
    with progress_bars(not quiet):
        teachers, tok = load_teachers(teacher, progress=not quiet)
        V = teachers[0].get_output_embeddings().weight.shape[0]
        model = build_student(student, V)
        align_special_tokens(model, tok)
        if last is not None:
            _load_checkpoint_weights(model, last)
        train_ids, eval_ids = windows(tok, data, sequences, seq_len, held_out)
        store = SoftLabelStore(soft_labels) if soft_labels else None
        use_cpu = not torch.cuda.is_available()
        config.setdefault("disable_tqdm", quiet)
        cfg = KDConfig(output_dir=out, max_steps=max_steps, per_device_train_batch_size=batch,
                       per_device_eval_batch_size=batch, learning_rate=learning_rate,
                       lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 10),
                       logging_steps=max(1, max_steps // 10), save_strategy="steps",
                       save_steps=save_steps, report_to=[], use_cpu=use_cpu,
                       dataloader_pin_memory=not use_cpu,  # no pinned memory without a GPU
                       divergence=divergence, temperature=temperature,
                       teacher_weights=teacher_weights, taid=divergence == "taid", **config)
        # held-out metrics against the (first) teacher, online (the store holds training text
        # only), taken now: KDTrainer may shard the teacher (then its weights are no longer
        # whole outside its forward), so its head is copied (to the student's device)
        from .demo import held_out_metrics
        from .trainer import LMHead, _hidden_states, lm_head_of

        with torch.no_grad():
            t_hidden = torch.cat([_hidden_states(teachers[0], {"input_ids": eval_ids[a:a + batch]})
                                  [:, :-1] for a in range(0, len(eval_ids), batch)])
        t_head = lm_head_of(teachers[0])
        t_head = LMHead(t_head.weight.detach().to(cfg.device, copy=True),
                        None if t_head.bias is None else t_head.bias.detach().to(cfg.device,
                                                                               copy=True),
                        t_head.logit_scale, t_head.softcap)
        trainer = KDTrainer(model=model, teacher_model=None if store else teachers, args=cfg,
                            soft_labels=store, train_dataset=TokenWindows(train_ids),
                            data_collator=collate, processing_class=tok)
        if quiet:
            trainer.remove_callback(PrinterCallback)  # disable_tqdm's per-step log lines
        before = held_out_metrics(model, eval_ids, t_hidden, t_head)
        trainer.train(resume_from_checkpoint=last)
        # through the engine's wrapper: a sharded (FSDP, ZeRO-3) student's head is whole in
        # its forward only
        after = held_out_metrics(trainer.model_wrapped, eval_ids, t_hidden, t_head)
        trainer.save_model(out)  # HF saves on the process that should_save; so does the tokenizer
        if tok is not None and trainer.args.should_save:
            tok.save_pretrained(out)
    return {"before": before, "after": after, "resumed_from": last,
            "global_step": trainer.state.global_step, "already_done": False}
