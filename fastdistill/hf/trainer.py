"""Knowledge distillation of Hugging Face causal LMs on the HF ``Trainer``.

``KDTrainer`` is a ``transformers.Trainer``: logging, checkpoints, gradient
accumulation, mixed precision and accelerate's multi-GPU engines are HF's.
What it adds is the loss: the student's last hidden states and LM head go
into ``fused_linear_kd_loss`` against the teacher's (or a mixture of
teachers', or packed soft labels from a ``SoftLabelStore``), so neither
model's N×V logits are ever built. The hidden states are the LM head's own
input, taken by a forward pre-hook that hands the head an empty slice: any
architecture whose logits are ``head(h)`` (then a logit scale or a soft cap
read from its config) works, and the probe at construction checks it.

Positions follow HF's causal-LM loss: the distributions at position i
predict token i + 1, so the loss of a batch is
``kd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:])``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import Trainer, TrainingArguments
except ImportError as e:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("fastdistill.hf needs transformers (pip install transformers accelerate)") from e

from .. import _checks
from . import fsdp as _fsdp
from ..kd import DIVERGENCES, TAIDSchedule, kd_options
from ..kd.fused_linear import fused_linear_kd_loss, log_mixture_weights, mixture_logits
from ..softlabels.codec import SoftLabels
from ..softlabels.store import SoftLabelStore
from ..xtok import ALM_DIVERGENCES
from . import tensor_parallel as tp
from . import xtok as _xtok
from . import zero
from .xtok import CROSS_TOKENIZER_LOSSES

__all__ = ["KDConfig", "KDTrainer", "LMHead", "TeacherMixture", "lm_head_of"]

TAID_STATE = "fastdistill_taid.json"
TEACHER_SHARDING = ("shard", "replicate")


@dataclass
class KDConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation options. Names mirror TRL's
    ``GKDConfig`` where they mean the same thing (``lmbda``, ``beta``,
    ``max_new_tokens``); ``temperature`` is the distillation temperature (the
    sampling temperature of on-policy batches is ``generation_temperature``)."""

    divergence: str = field(default="forward_kl", metadata={"help": f"one of {DIVERGENCES}"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    beta: float = field(default=0.5, metadata={"help": "JSD mixture weight"})
    skew: float = field(default=0.1, metadata={"help": "skew of the skew KL divergences"})
    hard_weight: float = field(default=0.0, metadata={"help": "weight of the hard-label CE"})
    t2_scale: bool = field(default=True, metadata={"help": "multiply the soft term by T²"})
    lmbda: float = field(default=0.0, metadata={
        "help": "fraction of batches whose completions the student generates (on-policy)"})
    max_new_tokens: int = field(default=128, metadata={"help": "on-policy completion length"})
    generation_temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature of on-policy completions"})
    prompt_length: int | None = field(default=None, metadata={
        "help": "on-policy prompts: the first prompt_length tokens of each sequence (default: "
                "the tokens before its first label)"})
    taid: Any = field(default=False, metadata={
        "help": "True (a TAIDSchedule over max_steps) or a TAIDSchedule; divergence='taid'"})
    fused_head: bool = field(default=True, metadata={
        "help": "fuse both LM heads into the loss (no N×V logits); False: full logits"})
    chunk_size: int | None = field(default=None, metadata={"help": "rows per fused chunk"})
    vocab_mismatch: str = field(default="error", metadata={
        "help": "teacher and student vocabularies of different sizes: 'pad' or 'truncate'"})
    teacher_weights: list[float] | None = field(default=None, metadata={
        "help": "mixture weights of several teachers (default uniform): finite, >= 0, not all "
                "0; normalized to sum 1 (only their ratios matter)"})
    soft_label_key: str = field(default="example_id", metadata={
        "help": "dataset column naming each example's soft-label entry (absent: by index)"})
    teacher_sharding: str = field(default="shard", metadata={
        "help": "'shard': under an engine that shards the student (FSDP1/FSDP2, DeepSpeed "
                "ZeRO-3) the teachers are sharded by it too (eval, no grad, resharded after "
                "each forward); 'replicate': every rank holds whole teachers. Under DDP or in "
                "one process teachers are always whole"})
    cross_tokenizer_loss: str = field(default="alm", metadata={
        "help": f"with KDTrainer(teacher_tokenizer=...): the loss across tokenizers, one of "
                f"{CROSS_TOKENIZER_LOSSES}"})
    alm_divergence: str = field(default="binary_ce", metadata={
        "help": f"cross_tokenizer_loss='alm': its per-chunk divergence, one of {ALM_DIVERGENCES}"})
    uld_top_k: int = field(default=128, metadata={
        "help": "cross_tokenizer_loss='uld': the teacher's top-k ranks compared (the error of "
                "the top-k form is at most 2 min(tail_T, tail_S), the mass outside them)"})
    text_column: str = field(default="text", metadata={
        "help": "with teacher_tokenizer: the dataset column holding each example's text"})
    max_length: int | None = field(default=None, metadata={
        "help": "with teacher_tokenizer: tokens per example and side (None: all)"})

    def __post_init__(self):
        super().__post_init__()
        _checks.choice("divergence", self.divergence, DIVERGENCES)
        kd_options(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                   skew=self.skew, taid_t=0.5 if self.divergence == "taid" else None,
                   ignore_index=-100, hard_weight=self.hard_weight, reduction="mean",
                   t2_scale=self.t2_scale, vocab_mismatch=self.vocab_mismatch)
        self.lmbda = _checks.real("lmbda", self.lmbda, low=0.0, high=1.0)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        _checks.real("generation_temperature", self.generation_temperature, low=0.0,
                     low_open=True)
        if self.prompt_length is not None and (
                isinstance(self.prompt_length, bool) or not isinstance(self.prompt_length, int)
                or self.prompt_length < 1):
            raise ValueError(f"prompt_length must be a positive int or None, got "
                             f"{self.prompt_length!r}")
        if not (isinstance(self.taid, (bool, TAIDSchedule))):
            raise TypeError(f"taid must be a bool or a TAIDSchedule, got {type(self.taid).__name__}")
        if self.taid is not False and self.divergence != "taid":
            raise ValueError(f"taid is set but divergence={self.divergence!r}: use "
                             "divergence='taid'")
        if self.chunk_size is not None and (
                isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(self.fused_head).__name__}")
        _checks.choice("teacher_sharding", self.teacher_sharding, TEACHER_SHARDING)
        _checks.choice("cross_tokenizer_loss", self.cross_tokenizer_loss, CROSS_TOKENIZER_LOSSES)
        _checks.choice("alm_divergence", self.alm_divergence, ALM_DIVERGENCES)
        if isinstance(self.uld_top_k, bool) or not isinstance(self.uld_top_k, int) \
                or self.uld_top_k < 1:
            raise ValueError(f"uld_top_k must be a positive int, got {self.uld_top_k!r}")
        if self.max_length is not None and (
                isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                or self.max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {self.max_length!r}")
        if self.teacher_weights is not None:
            self.teacher_weights = _checks.mixture_weights("teacher_weights", self.teacher_weights)

    def to_dict(self):
        d = super().to_dict()
        if isinstance(d.get("taid"), TAIDSchedule):
            d["taid"] = d["taid"].state_dict()
        return d


@dataclass(frozen=True)
class LMHead:
    """A causal LM's output layer as the fused loss takes it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    # a tensor-parallel head (see tensor_parallel.py): weight/bias are this rank's rows
    # [vocab_offset, vocab_offset + rows) and the loss takes process_group
    process_group: Any = None
    vocab_offset: int = 0


def lm_head_of(model) -> LMHead:
    """The LM head of a HF causal LM: its output embedding (tied or not) and the
    logit post-processing its config names (Gemma's ``final_logit_softcapping``,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embedding with a weight "
                        "(get_output_embeddings()): not a causal LM?")
    cfg = getattr(model, "config", None)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), scale,
                  None if softcap is None else float(softcap))


def _whole_head_weight(weight, where: str) -> torch.Tensor:
    """The head's weight as the fused loss reads it, inside the head's forward.
    FSDP1/FSDP2 units and ZeRO-3 hand the module its whole weight there; a
    vocabulary-sharded DTensor head is taken by ``tensor_parallel.head_shard``
    before this, so any other DTensor, or a still-partitioned weight, is refused
    rather than read as something else."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()
    if isinstance(weight, DTensor):
        raise ValueError(f"fused_head=True: {where}'s LM head weight is a DTensor with placements "
                         f"{tuple(weight.placements)} inside its forward (a tensor-parallel head): "
                         "use fused_head=False, or fused_linear_kd_loss(process_group=...) with "
                         "the local shard in your own loop")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"fused_head=True: {where}'s LM head weight has shape "
                         f"{tuple(weight.shape)} inside its forward, not (V, H): it is still "
                         "partitioned by a sharding engine that gathers it elsewhere; use "
                         "fused_head=False")
    return weight


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _in_head_forward(model, inputs: dict, fn, where: str = "the model"):
    """One forward of ``model`` (the wrapped module, so DDP's, FSDP's and
    DeepSpeed's hooks run) in which the LM head is handed an empty slice of its
    input (no logits are computed) and ``fn(hidden, head)`` runs inside the
    head's forward: there its weight is whole even where it is sharded outside
    (an FSDP1/FSDP2 unit of its own, ZeRO-3), so the fused loss reads it and its
    gradient lands on what the engine reduces. Returns (fn's result, the model's
    output); add ``_with_output(loss, output)`` so the engine's backward hooks
    on that output run."""
    m = _unwrap(model)
    head_module = _fsdp.head_module(m.get_output_embeddings())  # FSDP1: the wrapped module
    config_head = lm_head_of(m)  # the config's logit scale and soft cap
    box = {}

    def pre_hook(module, args, kwargs):
        (h, *rest) = args
        shard = tp.head_shard(module, where)  # None unless a vocabulary-sharded DTensor head
        if shard is None:
            head = LMHead(_whole_head_weight(module.weight, where), getattr(module, "bias", None),
                          config_head.logit_scale, config_head.softcap)
            box["result"] = fn(h, head)
        else:  # this rank's rows and the replicated hidden states: the vocab-parallel loss
            head = LMHead(shard.weight, shard.bias, config_head.logit_scale, config_head.softcap,
                          shard.group, shard.offset)
            box["result"] = fn(tp.local_hidden(h), head)
            return (tp.empty_input(h), *rest), kwargs
        return (h[..., :0, :], *rest), kwargs

    handle = head_module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    if "result" not in box:
        raise RuntimeError(f"{type(m).__name__}'s forward never called its output embedding: "
                           "fused_head=True cannot take its hidden states")
    return box["result"], out


def _with_output(loss: torch.Tensor, output) -> torch.Tensor:
    """``loss`` plus the sum of the model output's empty logits (exactly 0): the
    loss's graph then reaches the model's output, whose backward hooks FSDP
    needs (without them its root unit never reduces its gradients)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.requires_grad:  # a DTensor: its local part
        return loss + tp.local_tensor(logits).sum().to(loss.dtype)
    return loss


def _stored_teacher(packed):
    """The soft-label counterpart of ``KDTrainer._fused_teachers``: a context giving
    the teacher arguments of ``fused_linear_kd_loss`` (no heads to gather)."""
    return lambda: contextlib.nullcontext(((), dict(teacher_sparse=packed)))


def _hidden_states(model, inputs: dict) -> torch.Tensor:
    """The LM head's input (B, T, H) of one forward of ``model``, without
    computing logits (for a model whose head is not sharded: a teacher)."""
    return _in_head_forward(model, inputs, lambda h, head: h)[0]


def _head_logits(h: torch.Tensor, head: LMHead) -> torch.Tensor:
    """head(h) with the logit scale and soft cap, in float32."""
    y = F.linear(h, head.weight, head.bias).float() * head.logit_scale
    return y if head.softcap is None else head.softcap * torch.tanh(y / head.softcap)


def _logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


def _check_head_probe(model, name: str) -> None:
    """One tiny forward: head(hidden) with the config's scale and cap must give the
    model's own logits, or fused_head would train on something else."""
    m = _unwrap(model)
    device = m.get_output_embeddings().weight.device
    vocab = getattr(getattr(m, "config", None), "vocab_size", None) or _fsdp.head_rows(m)
    ids = torch.arange(4, device=device).unsqueeze(0) % vocab
    was = m.training
    m.eval()
    try:  # through ``model``: a sharded (FSDP1) teacher gathers in its wrapper's forward
        with torch.no_grad():
            want = model(input_ids=ids).logits
            (y, head), _ = _in_head_forward(model, {"input_ids": ids},
                                            lambda h, head: (_head_logits(h, head), head), name)
    finally:
        m.train(was)
    want, y = tp.probe_logits(want, y, head)  # a tensor-parallel head: this rank's columns
    tol = 1e-3 * max(1.0, float(want.abs().max()))
    bad = y.shape != want.shape or not torch.allclose(y, want, rtol=1e-3, atol=tol)
    if tp.any_rank(bad, head.process_group, device):
        raise ValueError(f"{name}: its logits are not head(last hidden state) with the logit "
                         f"scale/soft cap of its config ({type(m).__name__}); use "
                         "fused_head=False")


class TeacherMixture(torch.nn.Module):
    """Several causal LMs as one whose logits are T·log Σ_i w_i softmax(z_i / T):
    at temperature T its distribution is the weighted mixture of the teachers'
    (what ``label`` stores for several teachers). Computes full logits: for
    labelling, a batch at a time."""

    def __init__(self, models, weights=None, temperature: float = 1.0):
        super().__init__()
        self.models = torch.nn.ModuleList(models)
        w = ([1.0] * len(models) if weights is None
             else _checks.mixture_weights("weights", weights, len(models)))
        self.log_w = log_mixture_weights(w)  # normalized to sum 1
        self.temperature = float(temperature)

    def forward(self, input_ids, attention_mask=None):
        return mixture_logits((m(input_ids=input_ids, attention_mask=attention_mask).logits
                               for m in self.models), self.log_w, self.temperature)


class _Keyed(torch.utils.data.Dataset):
    """A dataset of dicts with each example's index added as its soft-label key."""

    def __init__(self, dataset, key: str):
        self.dataset, self.key = dataset, key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item[self.key] = str(i)
        return item


def _with_keys(dataset, key: str):
    """``dataset`` if its examples carry ``key``, else the examples keyed by index
    (the keys ``label_tokens`` writes by default: "0", "1", ...)."""
    if dataset is None:
        return None
    names = getattr(dataset, "column_names", None)
    if names is None and len(dataset):
        first = dataset[0]
        names = list(first) if isinstance(first, dict) else []
    return dataset if key in (names or []) else _Keyed(dataset, key)


def _items_divisor(n):
    """HF's ``num_items_in_batch`` as the summed loss's divisor. A batch whose
    labels are all ignored has 0 items, and its summed loss is exactly 0 with a
    zero gradient (ignored rows contribute 0): it divides by 1, so that batch
    contributes nothing, where 0/0 would turn every weight into NaN. Any other
    count is used as it is (and a NaN loss stays NaN)."""
    if isinstance(n, torch.Tensor):
        return torch.where(n == 0, torch.ones_like(n), n)
    return 1 if n == 0 else n


def _missing_keys_message(store, what: str, n: int, missing: list, key: str) -> str:
    first = ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (f"soft labels: {len(missing)} of the {n} examples of {what} have no entry in the "
            f"store at {store.path} (keys from the {key!r} column, or \"0\"..\"n-1\" by index "
            f"without it); first missing: {first}")


def _check_store_keys(store: SoftLabelStore, dataset, key: str, what: str) -> None:
    """Every example of ``dataset`` (as ``_with_keys`` returned it) has its entry in
    ``store``: by index, the keys "0".."n-1"; else its ``key`` column (an HF
    dataset's column at once, any other dataset example by example). Datasets
    without a length (iterable) are checked batch by batch instead."""
    if dataset is None:
        return
    try:
        n = len(dataset)
    except TypeError:
        return
    if isinstance(dataset, _Keyed):
        keys = (str(i) for i in range(n))
    elif getattr(dataset, "column_names", None) is not None:
        keys = (str(k) for k in dataset[key])
    else:
        keys = (str(dataset[i][key]) for i in range(n))
    missing = [k for k in keys if k not in store]
    if missing:
        raise ValueError(_missing_keys_message(store, what, n, missing, key))


class _KeyedCollator:
    """Runs a collator on the examples without their soft-label key (a string the
    tokenizer's padding cannot take) and puts the keys back as a list."""

    def __init__(self, collator, key: str):
        self.collator, self.key = collator, key

    def __call__(self, features):
        keys = [str(f[self.key]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch[self.key] = keys
        return batch


class KDTrainer(Trainer):
    """``Trainer`` whose loss distils ``teacher_model`` (a causal LM, a list of
    them, or None with ``soft_labels``) into ``model``.

    ``KDTrainer(model=student, teacher_model=teacher, args=KDConfig(...),
    train_dataset=..., eval_dataset=..., processing_class=tokenizer)``.
    Datasets hold tokenized ``input_ids`` (and ``attention_mask``/``labels``;
    the default collator is HF's causal-LM one, labels = input_ids with padding
    −100). A teacher is frozen, kept in eval mode and run under no_grad, in its
    own dtype. ``soft_labels``: a ``SoftLabelStore`` whose entries hold one
    packed row per token of each example (``fastdistill.softlabels.label_tokens``
    writes them), found by the ``args.soft_label_key`` column or, without it, by
    the example's index in the dataset; every example's entry is checked at
    construction (ValueError naming the store, the column and the missing keys).
    A batch whose labels are all −100 contributes nothing (loss 0, no gradient),
    in every mode; on-policy, it is not turned into completions.
    """

    def __init__(self, model=None, teacher_model=None, args: KDConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, soft_labels: SoftLabelStore | None = None,
                 teacher_tokenizer=None, **kwargs):
        if args is None:
            args = KDConfig(output_dir="kd_out")
        if not isinstance(args, KDConfig):
            raise TypeError(f"args must be a fastdistill.hf.KDConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("model (the student) is required")
        teachers = teacher_model if isinstance(teacher_model, (list, tuple)) else (
            [] if teacher_model is None else [teacher_model])
        if not teachers and soft_labels is None:
            raise ValueError("give teacher_model (one model or a list) or soft_labels (a "
                             "SoftLabelStore)")
        if teachers and soft_labels is not None:
            raise ValueError("give teacher_model or soft_labels, not both")
        if soft_labels is not None and not isinstance(soft_labels, SoftLabelStore):
            raise TypeError(f"soft_labels must be a SoftLabelStore, got "
                            f"{type(soft_labels).__name__}")
        if args.lmbda > 0 and not teachers:
            raise ValueError(f"lmbda={args.lmbda} needs an online teacher to score the student's "
                             "completions; soft labels are fixed")
        if args.teacher_weights is not None:
            if len(teachers) < 2:
                raise ValueError("teacher_weights applies to several teachers (teacher_model=[...])")
            if len(args.teacher_weights) != len(teachers):
                raise ValueError(f"teacher_weights has {len(args.teacher_weights)} entries for "
                                 f"{len(teachers)} teachers")
        self.teacher_tokenizer = teacher_tokenizer
        if teacher_tokenizer is not None:  # cross-tokenizer mode (fastdistill.hf.xtok)
            if processing_class is None:
                raise ValueError("teacher_tokenizer needs processing_class: the student's "
                                 "tokenizer (both tokenize each example's text)")
            if len(teachers) != 1:
                raise ValueError(f"teacher_tokenizer: one teacher_model, got {len(teachers)}")
            if args.lmbda > 0:
                raise ValueError("teacher_tokenizer with lmbda > 0 (on-policy batches) is not "
                                 "supported yet")
            if any(tp.is_dtensor(_unwrap(m).get_output_embeddings().weight)
                   for m in (model, teachers[0])):
                raise ValueError("teacher_tokenizer with a tensor-parallel head is not supported")
            if data_collator is None:
                data_collator = _xtok.CrossTokenizerCollator(
                    processing_class, teacher_tokenizer, text_column=args.text_column,
                    max_length=args.max_length)
        student_vocab = _fsdp.head_rows(_unwrap(model))
        for i, t in enumerate(teachers):
            tv = _fsdp.head_rows(t)
            if tv != student_vocab and args.vocab_mismatch == "error" and \
                    teacher_tokenizer is None:  # across tokenizers the vocabularies differ
                raise ValueError(
                    f"teacher {i} has a vocabulary of {tv} tokens, the student {student_vocab}: "
                    "pass vocab_mismatch='pad' (missing tokens get probability 0) or 'truncate'"
                    ", after making sure both tokenizers give the same ids to the shared tokens")
            if i and tv != _fsdp.head_rows(teachers[0]):
                raise ValueError("the teachers of a mixture must share one vocabulary")
        tp.check_heads(_unwrap(model), teachers, args, soft_labels)  # tensor-parallel heads
        if soft_labels is not None:
            if soft_labels.vocab_size != student_vocab:
                raise ValueError(f"the soft-label store has vocabulary {soft_labels.vocab_size}, "
                                 f"the student {student_vocab}")
            if args.divergence == "taid":
                raise ValueError("divergence='taid' needs an online teacher, not soft labels")
            codec = soft_labels.codec
            if codec is not None and not math.isclose(codec.temperature, args.temperature,
                                                      rel_tol=1e-6):
                raise ValueError(f"the soft labels were taken at temperature {codec.temperature}, "
                                 f"args.temperature is {args.temperature}: they must agree")
        if data_collator is None and processing_class is not None:
            data_collator = transformers.DataCollatorForLanguageModeling(processing_class,
                                                                         mlm=False)
        if soft_labels is not None:
            train_dataset = _with_keys(train_dataset, args.soft_label_key)
            if eval_dataset is not None and _with_keys(eval_dataset, args.soft_label_key) \
                    is not eval_dataset:
                raise ValueError(f"eval_dataset needs its {args.soft_label_key!r} column with soft "
                                 "labels: by index, its keys would name the training examples' "
                                 "entries")
            if data_collator is None:  # HF's default without a tokenizer; it drops string columns
                data_collator = transformers.default_data_collator
            data_collator = _KeyedCollator(data_collator, args.soft_label_key)
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        # the engine that shards the student: HF's FSDP (it wraps the student in train()) or
        # the user's own fully_shard / FullyShardedDataParallel
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if \
            getattr(self, "is_fsdp_enabled", False) else None
        engine = _fsdp.engine_of(model) or (
            None if plugin is None else f"fsdp{getattr(plugin, 'fsdp_version', 1)}")
        self.teachers = []
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
            if engine is not None and args.teacher_sharding == "shard":
                t = _fsdp.shard_teacher(t, engine, self.args.device, plugin)
            elif _fsdp.engine_of(t) is None:
                # whole on this rank's device, or under ZeRO-3 with teacher_sharding="shard"
                # partitioned by its own inference engine (its forwards are then collective)
                t = zero.place_teacher(t, self.args)
            self.teachers.append(t)
        # forwards are collective (FSDP, ZeRO-3): every rank runs each
        self._sharded = engine is not None or zero.is_zero3(self.args)
        self.soft_labels = soft_labels
        if soft_labels is not None:
            for what, ds in (("train_dataset", self.train_dataset),
                             ("eval_dataset", self.eval_dataset)):
                _check_store_keys(soft_labels, ds, args.soft_label_key, what)
        self.taid = None
        if args.divergence == "taid":
            self.taid = (args.taid if isinstance(args.taid, TAIDSchedule)
                         else TAIDSchedule(max(1, args.max_steps if args.max_steps > 0 else 1000)))
        self._rng = random.Random(args.seed)
        self._taid_loss = 0.0
        zero.check_state(self.args, self.accelerator)
        # a student zero.Init partitioned is probed at its first loss, through its engine
        self._probe_student = args.fused_head and zero.check_student(_unwrap(self.model), args)
        if args.fused_head:
            if not self._probe_student:
                _check_head_probe(self.model, "the student")
            for i, t in enumerate(self.teachers):
                _check_head_probe(t, f"teacher {i}")
        else:  # a tensor-parallel head must give whole logits
            tp.check_unfused_logits(_unwrap(self.model), "the student")
            for i, t in enumerate(self.teachers):
                tp.check_unfused_logits(t, f"teacher {i}")
        if teacher_tokenizer is not None:
            _xtok.check_heads(lm_head_of(_unwrap(self.model)), lm_head_of(_unwrap(self.teachers[0])))
        # the probes' forwards leave FSDP2's root unit gathered, its unsharded tensors the
        # module's parameters: the shards again before an optimizer is built on them
        for m in (_unwrap(self.model), *self.teachers):
            _fsdp.reshard_all(m)

    # -- columns: keep the soft-label key
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.soft_labels is not None and self.args.soft_label_key not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [self.args.soft_label_key]
        if self.teacher_tokenizer is not None and \
                self.args.text_column not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [self.args.text_column]

    # -- the loss
    def _kd_keywords(self) -> dict:
        a = self.args
        kw = dict(divergence=a.divergence, temperature=a.temperature, beta=a.beta, skew=a.skew,
                  hard_weight=a.hard_weight, t2_scale=a.t2_scale)
        if self.taid is not None:
            kw["taid_t"] = self.taid.t
        return kw

    @staticmethod
    def _labels(inputs: dict) -> torch.Tensor:
        """The batch's labels; without a ``labels`` column, the input ids with the
        positions the attention mask leaves out (padding) as -100."""
        labels = inputs.get("labels")
        if labels is not None:
            return labels
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, -100)

    @staticmethod
    def _model_inputs(inputs: dict) -> dict:
        return {k: v for k, v in inputs.items()
                if k in ("input_ids", "attention_mask", "position_ids", "token_type_ids")}

    def _soft_label_batch(self, inputs: dict, n_positions: int) -> SoftLabels:
        """The (B, T) packed teacher rows of a batch (rows past an entry's end are
        zero bytes: their labels are −100, so they are never read)."""
        keys = inputs.get(self.args.soft_label_key)
        if keys is None:
            raise ValueError(f"soft labels: the batch has no {self.args.soft_label_key!r} column "
                             "(the key of each example's entry)")
        if isinstance(keys, torch.Tensor):
            keys = [str(int(k)) for k in keys.reshape(-1)]
        keys = [str(k) for k in keys]
        missing = [k for k in keys if k not in self.soft_labels]
        if missing:  # checked at construction: the dataset changed since, or a new one
            raise ValueError(_missing_keys_message(self.soft_labels, "this batch", len(keys),
                                                   missing, self.args.soft_label_key))
        entries = [self.soft_labels[k].labels for k in keys]
        codec = entries[0].codec
        data = torch.zeros(len(entries), n_positions, codec.row_bytes, dtype=torch.uint8)
        for b, e in enumerate(entries):
            if e.codec != codec:
                raise ValueError(f"soft labels: entry {keys[b]!r} has another codec than "
                                 f"entry {keys[0]!r}")
            rows = e.data.reshape(-1, codec.row_bytes)
            if rows.shape[0] > n_positions:
                raise ValueError(f"soft labels: entry {keys[b]!r} has {rows.shape[0]} rows for a "
                                 f"sequence of {n_positions} positions")
            data[b, :rows.shape[0]] = rows
        return SoftLabels(codec, data.to(self.args.device))

    def _fused_teachers(self, model_inputs: dict):
        """A context giving the (positional, keyword) teacher arguments of
        ``fused_linear_kd_loss`` for a batch: the teachers' hidden states (no grad,
        taken now) and heads (read inside it: a sharded teacher's head is whole
        there, see fsdp.whole_heads), one or a mixture."""
        with torch.no_grad():
            ths = [_hidden_states(t, model_inputs)[:, :-1] for t in self.teachers]

        @contextlib.contextmanager
        def teacher_args():  # a sharded teacher's head: gathered while the loss reads it
            with _fsdp.whole_heads(self.teachers), zero.teacher_heads_whole(self.teachers):
                yield self._teacher_args(ths)
        return teacher_args

    def _teacher_args(self, ths):
        heads = [lm_head_of(_unwrap(t)) for t in self.teachers]
        kw = dict(vocab_mismatch=self.args.vocab_mismatch)
        if len(heads) == 1:
            h = heads[0]
            return (ths[0], h.weight), dict(kw, teacher_bias=h.bias,
                                            teacher_logit_scale=h.logit_scale,
                                            teacher_softcap=h.softcap)
        return (ths, [h.weight for h in heads]), dict(
            kw, teacher_bias=[h.bias for h in heads],
            teacher_logit_scale=[h.logit_scale for h in heads],
            teacher_softcap=[h.softcap for h in heads], mixture_weights=self.args.teacher_weights)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._probe_student:  # every rank at once: the probe's forward is collective
            self._probe_student = False
            _check_head_probe(model, "the student")
        if self.teacher_tokenizer is not None:
            loss = self._cross_tokenizer_loss(model, inputs)
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # HF then takes the loss as normalized over the accumulated batches (by
                # num_items_in_batch, a token count); this one is each batch's chunk mean
                loss = loss / self.current_gradient_accumulation_steps
            return (loss, None) if return_outputs else loss
        labels = self._labels(inputs)
        model_inputs = self._model_inputs(inputs)
        lab = labels[:, 1:]
        kw = self._kd_keywords()
        sum_reduce = num_items_in_batch is not None
        reduction = "sum" if sum_reduce else "mean"
        if self.args.fused_head:
            if self.soft_labels is not None:
                packed = self._soft_label_batch(inputs, labels.shape[1])[:, :-1]
                teacher_args = _stored_teacher(packed)
            else:  # the teachers first: their hidden states are ready in the student's head
                teacher_args = self._fused_teachers(model_inputs)

            def loss_of(hidden, head):  # inside the student's head forward (see _in_head_forward)
                hs = hidden[:, :-1]
                if hs.dtype != head.weight.dtype:  # autocast: the head runs in its own dtype
                    hs = hs.to(head.weight.dtype)
                tp.check_same_batch(head, model_inputs["input_ids"], lab)  # TP ranks: one batch
                with teacher_args() as (t_args, t_kw):  # a sharded teacher's head: whole here
                    ta, tk = tp.shard_teacher(head, t_args, t_kw)  # a TP student: its rows
                    return fused_linear_kd_loss(
                        hs, head.weight, *ta, student_bias=head.bias,
                        student_logit_scale=head.logit_scale, student_softcap=head.softcap,
                        labels=lab, reduction=reduction, chunk_size=self.args.chunk_size,
                        process_group=head.process_group, **tk, **kw)

            loss, output = _in_head_forward(model, model_inputs, loss_of, "the student")
            loss = _with_output(loss, output)
        else:
            from ..kd import kd_loss
            from ..softlabels.loss import kd_loss as soft_kd_loss

            s_logits = _logits(model, model_inputs)[:, :-1]
            if self.soft_labels is not None:
                packed = self._soft_label_batch(inputs, labels.shape[1])[:, :-1]
                loss = soft_kd_loss(s_logits, packed, labels=lab, reduction=reduction,
                                    **{k: v for k, v in kw.items() if k != "taid_t"})
            else:
                with torch.no_grad():
                    t_logits = self._teacher_target_logits(model_inputs)
                loss = kd_loss(s_logits, t_logits, labels=lab, reduction=reduction,
                               vocab_mismatch=self.args.vocab_mismatch, **kw)
        if sum_reduce:
            loss = loss / _items_divisor(num_items_in_batch)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                # HF's own scale: the tensor-parallel ranks share one batch, which HF's
                # num_items_in_batch counts once (divided by the TP size)
                tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp_size)
        return (loss, None) if return_outputs else loss

    def _cross_tokenizer_loss(self, model, inputs: dict) -> torch.Tensor:
        """The cross-tokenizer loss of a batch (fastdistill.hf.xtok): the teacher on its
        own ids, the student's loss inside its head's forward (fused) or from logits."""
        teacher = self.teachers[0]
        t_inputs = _xtok.teacher_inputs(inputs)
        if not self.args.fused_head:
            with torch.no_grad():
                t_logits = _logits(teacher, t_inputs)
            return _xtok.LOSSES[self.args.cross_tokenizer_loss][1](
                inputs, _logits(model, self._model_inputs(inputs)), t_logits, self.args)
        with torch.no_grad():
            t_hidden = _hidden_states(teacher, t_inputs)

        def loss_of(hidden, head):  # inside the student's head forward
            with _fsdp.whole_heads(self.teachers), zero.teacher_heads_whole(self.teachers):
                return _xtok.LOSSES[self.args.cross_tokenizer_loss][0](
                    inputs, hidden, head, t_hidden, lm_head_of(_unwrap(teacher)), self.args)

        loss, output = _in_head_forward(model, self._model_inputs(inputs), loss_of, "the student")
        return _with_output(loss, output)

    def _teacher_target_logits(self, model_inputs: dict) -> torch.Tensor:
        """Full teacher logits (B, T-1, V); several teachers: their mixture's."""
        if len(self.teachers) == 1:
            return _logits(self.teachers[0], model_inputs)[:, :-1].float()
        mix = TeacherMixture(self.teachers, self.args.teacher_weights, self.args.temperature)
        return mix(**model_inputs)[:, :-1]

    # -- on-policy batches
    def _on_policy(self, model, inputs: dict) -> dict:
        """The batch with each sequence's completion generated by the student from
        its prompt (sampled at generation_temperature); labels cover the completion."""
        ids = inputs["input_ids"]
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.args.prompt_length is not None:
            p = min(self.args.prompt_length, ids.shape[1])
        elif labels is not None and bool((labels[:, 0] == -100).all()):
            kept = labels != -100
            first = kept.float().argmax(1)[kept.any(1)]  # rows without a label have no prompt end
            p = int(first.min()) if first.numel() else max(1, ids.shape[1] // 2)
        else:
            p = max(1, ids.shape[1] // 2)
        prompt, pmask = ids[:, :p], mask[:, :p]
        tok = self.processing_class
        pad_id = getattr(tok, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tok, "eos_token_id", None) or 0
        m = _unwrap(model)
        was = m.training
        m.eval()
        # sharded: every forward is collective, so every rank runs as many as the longest
        synced = self._sharded and self.accelerator.num_processes > 1
        try:
            with torch.no_grad(), _fsdp.generation_context(model):
                out = m.generate(input_ids=prompt, attention_mask=pmask, do_sample=True,
                                 temperature=self.args.generation_temperature,
                                 max_new_tokens=self.args.max_new_tokens, pad_token_id=pad_id,
                                 synced_gpus=synced)
        finally:
            m.train(was)
        new_mask = torch.ones_like(out)
        new_mask[:, :p] = pmask
        gen = out[:, p:]
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None:  # after a sequence's first EOS: padding
            done = (gen == eos).long().cumsum(1)
            after = (done - (gen == eos).long()) > 0
            new_mask[:, p:] = (~after).long()
        new_labels = out.clone()
        new_labels[:, :p] = -100
        new_labels[new_mask == 0] = -100
        return {"input_ids": out, "attention_mask": new_mask, "labels": new_labels}

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.teachers and self.args.lmbda > 0 and self._rng.random() < self.args.lmbda:
            inputs = self._prepare_inputs(inputs)
            labels = inputs.get("labels")
            targets = labels is None or bool((labels[:, 1:] != -100).any())
            if self._sharded and self.accelerator.num_processes > 1:
                # generation is collective: all ranks generate if any has targets
                targets = bool(self.accelerator.reduce(
                    torch.tensor(float(targets), device=self.args.device), "sum") > 0)
            if targets:
                inputs = self._on_policy(model, inputs)
                num_items_in_batch = None  # the completions' own mean
            # else: a batch with no targets contributes nothing, on-policy or not
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.taid is not None:  # one TAID step per optimizer step, on its whole loss
            # the mean over the ranks: every rank steps t on the global loss, so all keep one
            # t (a rank's own loss would give each its own t, none of them one process's)
            self._taid_loss += float(self.accelerator.reduce(loss.detach(), reduction="mean"))
            if self.accelerator.sync_gradients:
                self.taid.step(self._taid_loss)
                self._taid_loss = 0.0
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The distillation loss only (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- evaluation: eval_loss, eval_ce, eval_ppl, eval_kl_to_teacher
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """HF's evaluate (``{prefix}_loss``) plus the student's hard-label
        cross-entropy ``{prefix}_ce``, ``{prefix}_ppl`` = exp(ce), and the forward
        KL to the teacher at T=1 ``{prefix}_kl_to_teacher`` (token means)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        extra = self._eval_ce_kl(eval_dataset if eval_dataset is not None else self.eval_dataset)
        extra = {f"{metric_key_prefix}_{k}": v for k, v in extra.items()}
        metrics.update(extra)
        self.log(extra)
        return metrics

    def _eval_ce_kl(self, dataset) -> dict:
        """Token-mean CE and KL over the whole eval set. Per-example sums are
        gathered over the ranks (``gather_for_metrics``: the copies accelerate
        pads the last batch with are dropped) and added up in float64, so every
        rank reports what one process would."""
        loader = self.get_eval_dataloader(dataset)
        model = self.model
        was = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # ce, kl, kept tokens
        try:
            with torch.no_grad():
                for inputs in loader:  # every rank runs every batch: the gather is collective
                    inputs = self._prepare_inputs(inputs)
                    labels = self._labels(inputs)
                    lab = labels[:, 1:]
                    mi = self._model_inputs(inputs)
                    if self.teacher_tokenizer is not None:  # vocabularies differ: no KL
                        teacher_args = None
                    elif self.teachers:
                        teacher_args = self._fused_teachers(mi)
                    else:
                        packed = self._soft_label_batch(inputs, labels.shape[1])[:, :-1]
                        teacher_args = _stored_teacher(packed)

                    def ce_kl_of(hidden, head):  # inside the student's head forward
                        tp.check_same_batch(head, mi["input_ids"], lab)
                        base = dict(student_bias=head.bias, student_logit_scale=head.logit_scale,
                                    student_softcap=head.softcap, labels=lab, reduction="none",
                                    chunk_size=self.args.chunk_size,
                                    process_group=head.process_group)
                        hs = hidden[:, :-1].to(head.weight.dtype)
                        # hard_weight=1: the cross-entropy alone (at a store's own T, which
                        # the soft labels require and the CE does not see); then KL at T=1
                        t_ce = 1.0 if self.teachers else packed.codec.temperature
                        with teacher_args() as (t_args, t_kw):  # whole sharded teacher heads
                            ta, tk = tp.shard_teacher(head, t_args, t_kw)
                            ce = fused_linear_kd_loss(hs, head.weight, *ta, hard_weight=1.0,
                                                      temperature=t_ce, **base, **tk)
                            if self.teachers or packed.codec.temperature == 1.0:
                                kl = fused_linear_kd_loss(hs, head.weight, *ta,
                                                          divergence="forward_kl",
                                                          temperature=1.0, **base, **tk)
                            else:  # the store's distributions are at another T
                                kl = torch.full_like(ce, math.nan)
                        return ce, kl

                    rows_of = ce_kl_of if self.teacher_tokenizer is None else \
                        _xtok.eval_rows_of(lab)  # across tokenizers: the CE only
                    (ce, kl), _ = _in_head_forward(model, mi, rows_of, "the student")
                    rows = torch.stack([ce.double().sum(-1), kl.double().sum(-1),
                                        (lab != -100).sum(-1).double()], dim=-1)  # (B, 3)
                    totals += self.accelerator.gather_for_metrics(rows).sum(0).cpu()
        finally:
            model.train(was)
        ce_sum, kl_sum, n = totals.tolist()
        ce = ce_sum / max(n, 1)
        return {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "kl_to_teacher": kl_sum / max(n, 1)}

    # -- checkpoints carry the TAID state
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.taid is not None and self.args.should_save:
            path = os.path.join(output_dir, TAID_STATE)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.taid.state_dict(), f)
            os.replace(tmp, path)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.taid is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, TAID_STATE)
        if not os.path.exists(path):
            raise ValueError(f"{path}: missing; the checkpoint was not written by a TAID run")
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a TAID state ({e})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a TAID state (expected a JSON object of numbers)")
        try:  # the schedule's own checks: its constructor's, and the running state's
            self.taid.load_state_dict(state)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid TAID state: {e}") from None
