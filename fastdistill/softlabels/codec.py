"""Soft-label codecs: a teacher's output per token packed into a few bytes.

One packed row per token, ``Codec.row_bytes`` bytes, little-endian:

=============  ==========================  =====================================
field          topk                        sampled
=============  ==========================  =====================================
tail           float32 at byte 0: the      (absent)
               teacher mass off the k ids
values         k values after the tail:    k counts, ``count_bits`` each,
               16 bits: float16 log-probs  bit-packed LSB-first (0 = padding)
               8 bits: codes c in 0..255
ids            k ids, ``id_bits`` =        same
               ⌈log2 V⌉ each, bit-packed
               LSB-first
=============  ==========================  =====================================

Decoding (the same in the reference here, the C++ kernel and the CUDA
unpack, ``csrc/softlabels/packed_row.h``):

- topk, 16 bits: raw_i = the float16 log-prob; 8 bits: code 0 is probability
  0 (a teacher's -inf), code c > 0 is raw_i = 4·log(c/255): the code of
  y = (P_i / P_max)^(1/4) on a uniform grid. An entry's rounding error δ in
  log-probability is 4·Δy/y, and adds ≈ P_i·δ²/2 = 8·P_max·y²·Δy² to the
  KL; summed over k entries that is ≤ 2Δ²·√k nats at worst (Δ = 1/255,
  half-step errors; Cauchy–Schwarz), ~2.5e-4 at k = 64, whatever the row's
  log-prob range. The smallest code stands for P/P_max ≈ 2.4e-10, so tiny
  entries are not inflated (a square-root code's smallest step, 1.5e-5,
  moved up to 1e-3 of mass into a top-64 row's tail entries). Then both widths are
  renormalized so that the k masses sum to 1 − tail:
  lp_i = raw_i + log(1 − tail) − logsumexp(raw). The tail (float32, summed
  in float64 over the tokens off the ids when encoding) is kept exactly; a
  row's overall offset or scale is never needed.
- sampled: lp_i = log(count_i / n); count 0 is padding (lp = -inf).

Row sizes (V = 49152: 16-bit ids): top-32 at 8 bits 4 + 32 + 64 = 100 bytes,
at 16 bits 4 + 64 + 64 = 132 bytes (a dense fp16 row: 98,304 bytes).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from ..reference import kd as ref_kd
from ..reference import sparse as ref_sparse

METHODS = ("topk", "sampled")
VALUE_BITS = (16, 8)
FORMAT_VERSION = 2  # 2: the 8-bit code is (P/P_max)^(1/4) (1 was its square root)
_ROWS_PER_CHUNK = 256  # rows encoded at a time (float64 work rows of V)


def _bits_for(count: int) -> int:
    """Bits to store 0..count-1."""
    return max(1, (count - 1).bit_length())


@dataclass(frozen=True)
class Codec:
    """How rows are packed; travels with every ``SoftLabels`` and store."""

    method: str
    vocab_size: int
    k: int               # slots per row: top-k's k, or sampled's n (draws per row)
    value_bits: int      # topk: 16 or 8; sampled: bits of a count (derived)
    temperature: float   # the teacher's log-probs / draws are at this temperature

    @property
    def id_bits(self) -> int:
        return _bits_for(self.vocab_size)

    @property
    def has_tail(self) -> bool:
        return self.method == "topk"

    @property
    def values_offset(self) -> int:
        return 4 if self.has_tail else 0

    @property
    def values_bytes(self) -> int:
        return (self.k * self.value_bits + 7) // 8

    @property
    def ids_offset(self) -> int:
        return self.values_offset + self.values_bytes

    @property
    def ids_bytes(self) -> int:
        return (self.k * self.id_bits + 7) // 8

    @property
    def row_bytes(self) -> int:
        return self.ids_offset + self.ids_bytes

    @property
    def tail(self) -> str:
        """The sparse_kd_loss tail this codec's rows are meant for."""
        return "bucket" if self.method == "topk" else "none"

    def layout(self) -> tuple[int, ...]:
        """The numbers the kernels unpack a row with (csrc/softlabels/packed_row.h)."""
        return (METHODS.index(self.method), self.vocab_size, self.k, self.value_bits,
                self.id_bits, self.values_offset, self.ids_offset, self.row_bytes)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Codec":
        d = json.loads(text)
        version = d.pop("format", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"soft-label codec format {version!r} is not supported "
                             f"(this fastdistill reads format {FORMAT_VERSION})")
        codec = cls(**d)
        codec.validate()
        return codec

    def validate(self) -> None:
        _checks.choice("method", self.method, METHODS)
        for name in ("vocab_size", "k", "value_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"codec {name} must be a positive int, got {v!r}")
        if self.method == "topk":
            if self.value_bits not in VALUE_BITS:
                raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}")
            if self.k > self.vocab_size:
                raise ValueError(f"k={self.k} is larger than the vocabulary ({self.vocab_size})")
        elif self.value_bits != _bits_for(self.k + 1):
            raise ValueError(f"sampled codec: value_bits must be {_bits_for(self.k + 1)} for "
                             f"n={self.k}, got {self.value_bits}")
        if self.id_bits > 31:
            raise ValueError(f"vocab_size={self.vocab_size} needs more than 31 bits per id")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"codec temperature must be > 0, got {self.temperature!r}")


# ----------------------------------------------------------------- bit packing

def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, k) non-negative ints < 2**bits → (R, ⌈k·bits/8⌉) uint8, LSB-first."""
    R, k = values.shape
    shifts = torch.arange(bits, device=values.device)
    flat = ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(R, k * bits)
    nbytes = (k * bits + 7) // 8
    flat = torch.nn.functional.pad(flat, (0, nbytes * 8 - k * bits))
    weights = 1 << torch.arange(8, device=values.device)
    return (flat.reshape(R, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: (R, nbytes) uint8 → (R, k) int64."""
    R = packed.shape[0]
    bit = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    bit = bit.reshape(R, packed.shape[1] * 8)[:, : k * bits].reshape(R, k, bits)
    return (bit << torch.arange(bits, device=packed.device)).sum(-1)


def _float_field(data: torch.Tensor, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` little-endian floats of ``dtype`` at byte ``offset`` of every row."""
    size = torch.empty((), dtype=dtype).element_size()
    # a fresh dense copy: a one-row slice counts as contiguous yet keeps the row stride
    raw = torch.empty((data.shape[0], count * size), dtype=torch.uint8, device=data.device)
    raw.copy_(data[:, offset:offset + count * size])
    return raw.view(dtype).reshape(data.shape[0], count)


# ----------------------------------------------------------------- the container

class SoftLabels:
    """Packed soft labels of rows (tokens) of leading shape ``shape``.

    ``data`` is a uint8 tensor (*shape, codec.row_bytes); ``codec`` says how
    it is packed. Index it like the leading dimensions of a tensor
    (``labels[3]``, ``labels[:, 10:20]``); ``decode()`` gives (ids,
    logprobs) for ``fastdistill.sparse_kd_loss``; ``fastdistill.softlabels.
    kd_loss`` computes the loss from ``data`` itself.
    """

    def __init__(self, codec: Codec, data: torch.Tensor):
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a Codec, got {type(codec).__name__}")
        codec.validate()
        _checks.tensor("data", data)
        if data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] != codec.row_bytes:
            raise ValueError(f"data must be a uint8 tensor of shape (..., {codec.row_bytes}) for "
                             f"this codec, got {data.dtype} {tuple(data.shape)}")
        self.codec = codec
        self.data = data

    # -- shape and storage
    @property
    def shape(self) -> torch.Size:
        return self.data.shape[:-1]

    @property
    def num_rows(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed rows (the codec's few bytes are not counted)."""
        return self.num_rows * self.codec.row_bytes

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of the soft labels of a single row")
        return self.shape[0]

    def __getitem__(self, index) -> "SoftLabels":
        if isinstance(index, tuple) and len(index) > len(self.shape):
            raise IndexError(f"too many indices for soft labels of shape {tuple(self.shape)}")
        if not isinstance(index, tuple):
            index = (index,)
        return SoftLabels(self.codec, self.data[index + (slice(None),)])

    def reshape(self, *shape) -> "SoftLabels":
        return SoftLabels(self.codec, self.data.reshape(*shape, self.codec.row_bytes))

    def to(self, device) -> "SoftLabels":
        return SoftLabels(self.codec, self.data.to(device))

    def rows(self) -> torch.Tensor:
        """``data`` as (R, row_bytes), contiguous."""
        return self.data.reshape(-1, self.codec.row_bytes).contiguous()

    def __repr__(self) -> str:
        c = self.codec
        return (f"SoftLabels({c.method}, k={c.k}, value_bits={c.value_bits}, V={c.vocab_size}, "
                f"shape={tuple(self.shape)}, {c.row_bytes} bytes/row)")

    # -- serialization
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (torch.save / safetensors friendly): the packed rows and the codec."""
        codec = torch.frombuffer(bytearray(self.codec.to_json().encode()), dtype=torch.uint8)
        return {"data": self.data, "codec": codec.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SoftLabels":
        for key in ("data", "codec"):
            if key not in state:
                raise ValueError(f"a SoftLabels state dict has '{key}'; got keys {sorted(state)}")
        codec = Codec.from_json(bytes(state["codec"].cpu().tolist()).decode())
        return cls(codec, state["data"])

    # -- decoding (the readable reference of the kernels' unpack)
    def tail_mass(self) -> torch.Tensor:
        """The teacher mass off the stored ids (float32, shape ``shape``); 0 for sampled."""
        rows = self.rows()
        if not self.codec.has_tail:
            return torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        return _float_field(rows, 0, 1, torch.float32).reshape(self.shape)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64, logprobs float32), each (*shape, k); -inf log-probs mark
        padding or probability 0 (their ids are then meaningless)."""
        c = self.codec
        rows = self.rows()
        R = rows.shape[0]
        ids = unpack_bits(rows[:, c.ids_offset:], c.k, c.id_bits)
        if c.method == "sampled":
            counts = unpack_bits(rows[:, c.values_offset:c.ids_offset], c.k, c.value_bits)
            lp = torch.where(counts > 0, (counts.double() / c.k).log(),
                             torch.full((), -math.inf, dtype=torch.float64, device=rows.device))
        else:
            if c.value_bits == 16:
                raw = _float_field(rows, c.values_offset, c.k, torch.float16).double()
            else:
                code = rows[:, c.values_offset:c.ids_offset].to(torch.int64)
                raw = torch.where(code > 0, 4.0 * (code.double() / 255.0).log(),
                                  torch.full((), -math.inf, dtype=torch.float64, device=rows.device))
            tail = _float_field(rows, 0, 1, torch.float32).double()
            lse = torch.logsumexp(raw, -1, keepdim=True)
            shift = torch.where(lse > -math.inf, torch.log1p(-tail) - lse, torch.zeros_like(lse))
            lp = raw + shift
        lead = tuple(self.shape)
        return ids.reshape(*lead, c.k), lp.float().reshape(*lead, c.k)

    def check_rows(self, keep: torch.Tensor | None = None) -> None:
        """Raise a ValueError naming the first corrupt row (of those ``keep``
        marks, flat row order) and its fault, checked in this order: a tail
        mass outside [0, 1]; a value that is NaN or +inf; an id of a stored
        entry not below the vocabulary size; sampled counts that do not sum to
        k; an id stored twice. The encoder never writes any of these, so each
        means a corrupt (or hand-made) row. Every backend of
        ``softlabels.kd_loss`` runs this one check, so one fault gives one
        message, whatever the backend."""
        c = self.codec
        ids, lp = self.decode()
        ids, lp = ids.reshape(-1, c.k), lp.reshape(-1, c.k)
        tail = self.tail_mass().reshape(-1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        if keep is not None:
            keep = keep.reshape(-1)
            ids, lp, tail, rows = ids[keep], lp[keep], tail[keep], rows[keep]
        if rows.numel() == 0:
            return
        bad_tail = ~((tail >= 0) & (tail <= 1))
        bad_value = torch.isnan(lp) | (lp == math.inf)
        stored = lp > -math.inf
        bad_id = stored & (ids >= c.vocab_size)
        bad_count = torch.zeros_like(bad_tail)
        if c.method == "sampled":
            counts = torch.where(stored, (lp.double().exp() * c.k).round(), 0.0).sum(-1)
            bad_count = counts != c.k
        # repeats among the stored entries: padding gets distinct negative stand-ins
        stand_in = -1 - torch.arange(c.k, device=ids.device)
        order = torch.where(stored, ids, stand_in).sort(dim=-1, stable=True)
        same = order.values[:, 1:] == order.values[:, :-1]
        faulty = (bad_tail | bad_value.any(-1) | bad_id.any(-1) | bad_count | same.any(-1))
        if not bool(faulty.any()):
            return
        i = int(faulty.nonzero()[0, 0])
        r = int(rows[i])
        where = f"soft labels row {r}"
        if bad_tail[i]:
            raise ValueError(f"{where}: tail mass {float(tail[i]):g} is not in [0, 1] "
                             "(corrupt packed row?)")
        if bad_value[i].any():
            e = int(bad_value[i].nonzero()[0, 0])
            raise ValueError(f"{where} entry {e}: value is NaN or +inf (corrupt packed row?)")
        if bad_id[i].any():
            e = int(bad_id[i].nonzero()[0, 0])
            raise ValueError(f"{where} entry {e}: id {int(ids[i, e])} is not below the "
                             f"vocabulary size {c.vocab_size} (corrupt packed row?)")
        if bad_count[i]:
            total = int(torch.where(stored[i], (lp[i].double().exp() * c.k).round(), 0.0).sum())
            raise ValueError(f"{where}: sample counts sum to {total}, not k={c.k} "
                             "(corrupt packed row?)")
        j = int(same[i].nonzero()[0, 0])
        dup = int(order.values[i, j])
        a, b = sorted(int(order.indices[i, x]) for x in (j, j + 1))
        raise ValueError(f"{where}: id {dup} is stored twice (entries {a} and {b}); a packed row "
                         "never repeats an id (corrupt or hand-made row?)")

    def to_dense(self, vocab_size: int | None = None) -> torch.Tensor:
        """Dense log-probabilities (*shape, V), float32: the decoded ids' values
        and -inf elsewhere (a top-k row's tail mass is not spread over the
        other tokens: see ``tail_mass()``). ``vocab_size`` ≥ the codec's pads."""
        V = self.codec.vocab_size if vocab_size is None else vocab_size
        if isinstance(V, bool) or not isinstance(V, int) or V < self.codec.vocab_size:
            raise ValueError(f"vocab_size must be an int ≥ the codec's {self.codec.vocab_size}, "
                             f"got {vocab_size!r}")
        ids, lp = self.decode()
        dense = torch.full((*ids.shape[:-1], V), -math.inf, dtype=torch.float32, device=ids.device)
        keep = lp > -math.inf
        return dense.scatter_(-1, torch.where(keep, ids, 0), torch.where(keep, lp, dense[..., :1]))


# ----------------------------------------------------------------- encoding

def _check_logits(logits: torch.Tensor) -> None:
    bad = torch.isnan(logits) | (logits == math.inf)
    if bool(bad.any()):
        raise ValueError("logits must be finite or -inf (a masked token); got NaN or +inf")
    if logits.numel() and bool((logits == -math.inf).all(-1).any()):
        raise ValueError("every row of logits needs at least one finite entry")


def encode(logits: torch.Tensor, *, method: str = "topk", k: int | None = None,
           n_samples: int | None = None, temperature: float = 1.0, value_bits: int = 16,
           seed: int | None = None) -> SoftLabels:
    """Pack a teacher's logits (..., V) into ``SoftLabels``.

    ``method="topk"``: the k most likely tokens of softmax(logits / T), their
    log-probabilities at ``value_bits`` (16: float16; 8: one byte, see the
    module docstring) and the exact tail mass; for
    ``kd_loss(tail="bucket")``. ``method="sampled"``: ``n_samples`` draws per
    row from softmax(logits / T) (``seed`` makes them reproducible), kept as
    the distinct ids and their counts: an unbiased estimate of the teacher,
    for ``tail="none"`` (``value_bits`` does not apply).
    """
    t = _checks.tensor("logits", logits, floating=True)
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V ≥ 1, got {tuple(t.shape)}")
    _checks.choice("method", method, METHODS)
    temperature = _checks.temperature(temperature)
    V = t.shape[-1]
    lead = t.shape[:-1]
    if method == "topk":
        if n_samples is not None:
            raise ValueError("n_samples applies to method='sampled'; top-k takes k")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int (the number of tokens kept per row), got {k!r}")
        if not 1 <= k <= V:
            raise ValueError(f"k must be in [1, V={V}], got {k}")
        if isinstance(value_bits, bool) or value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {value_bits!r}")
        codec = Codec("topk", V, k, value_bits, temperature)
    else:
        if k is not None:
            raise ValueError("k applies to method='topk'; sampling takes n_samples")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int):
            raise TypeError(f"n_samples must be an int, got {n_samples!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
        if value_bits != 16:
            raise ValueError("value_bits applies to method='topk' (sampled rows store counts)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        codec = Codec("sampled", V, n_samples, _bits_for(n_samples + 1), temperature)
    codec.validate()
    t2 = t.detach().reshape(-1, V)
    _check_logits(t2)
    R = t2.shape[0]
    out = torch.empty((R, codec.row_bytes), dtype=torch.uint8, device=t.device)
    gen = None
    if method == "sampled" and seed is not None:
        gen = torch.Generator(device=t.device).manual_seed(seed)
    for a in range(0, R, _ROWS_PER_CHUNK):
        b = min(a + _ROWS_PER_CHUNK, R)
        out[a:b] = _encode_rows(t2[a:b], codec, gen)
    return SoftLabels(codec, out.reshape(*lead, codec.row_bytes))


def _encode_rows(z: torch.Tensor, codec: Codec, gen) -> torch.Tensor:
    """Packed rows of a chunk of logits (r, V)."""
    r = z.shape[0]
    row = torch.zeros((r, codec.row_bytes), dtype=torch.uint8, device=z.device)
    if codec.method == "sampled":
        ids, counts = sample_counts(z, codec.k, temperature=codec.temperature, generator=gen)
        if ids.shape[-1] < codec.k:  # n draws over V < n tokens: pad the row's n slots
            pad = codec.k - ids.shape[-1]
            ids, counts = F.pad(ids, (0, pad)), F.pad(counts, (0, pad))
        row[:, codec.values_offset:codec.ids_offset] = pack_bits(counts, codec.value_bits)
    else:
        lp = torch.log_softmax(z.double() / codec.temperature, dim=-1)
        top, ids = lp.topk(codec.k, dim=-1)              # sorted: top[:, 0] is the row max
        rest = lp.scatter(-1, ids, -math.inf)
        tail = torch.logsumexp(rest, -1).exp() if codec.k < codec.vocab_size else lp.new_zeros(r)
        row[:, 0:4] = tail.float().unsqueeze(-1).contiguous().view(torch.uint8)
        if codec.value_bits == 16:
            vals = top.to(torch.float16)
            row[:, codec.values_offset:codec.ids_offset] = vals.contiguous().view(torch.uint8)
        else:
            x = ((top - top[:, :1]) / 4).exp()          # (P / P_max)^(1/4) in [0, 1]
            code = (x * 255).round().clamp(1, 255)      # a token with P > 0 never becomes 0
            code = torch.where(top > -math.inf, code, torch.zeros_like(code))
            row[:, codec.values_offset:codec.ids_offset] = code.to(torch.uint8)
        ids = torch.where(top > -math.inf, ids, torch.zeros_like(ids))
    row[:, codec.ids_offset:] = pack_bits(ids, codec.id_bits)
    return row


def sample_counts(teacher_logits: torch.Tensor, n: int, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_teacher``'s draws as (ids, counts), int64 (..., min(n, V)): the
    distinct ids drawn (ascending) and how often each was drawn, then padding
    (id 0, count 0). The sampled codec stores exactly these."""
    t = _checks.tensor("teacher_logits", teacher_logits, floating=True)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    temperature = _checks.temperature(temperature)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"teacher_logits must have shape (..., V) with V ≥ 1, got {tuple(t.shape)}")
    lead, V = t.shape[:-1], t.shape[-1]
    bad = ref_kd.nonfinite_rows(t.detach().reshape(-1, V))
    if bool(bad.any()):  # there is no distribution to draw from
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"teacher_logits row {r} holds a NaN or +inf, or is all -inf: it is no "
                         "distribution to sample from")
    with torch.no_grad():
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        probs = torch.softmax(t.reshape(-1, V).to(acc) / temperature, dim=-1)
        R = probs.shape[0]
        width = min(n, V)  # distinct ids per row
        if R == 0:
            zeros = torch.zeros(*lead, width, dtype=torch.int64, device=t.device)
            return zeros, zeros.clone()
        draws = torch.multinomial(probs, n, replacement=True, generator=generator)  # (R, n)
        s = draws.sort(-1).values
        first = torch.ones_like(s, dtype=torch.bool)
        first[:, 1:] = s[:, 1:] != s[:, :-1]
        run = first.cumsum(-1) - 1  # which distinct id each draw is, 0..u-1
        counts = torch.zeros_like(s).scatter_add_(1, run, torch.ones_like(s))
        ids = torch.zeros_like(s).scatter_(1, run, s)  # a run's draws all write the same id
    return ids[:, :width].reshape(*lead, width), counts[:, :width].reshape(*lead, width)


def check_soft_labels(soft_labels, lead, vocab_size: int, tail, temperature, divergence: str,
                      **same_device_as):
    """Checks packed soft labels against the student (leading shape, vocabulary,
    device) and the loss options; returns (tail, temperature) with the codec's
    defaults filled in. A temperature other than the codec's is an error."""
    if not isinstance(soft_labels, SoftLabels):
        raise TypeError(f"soft_labels must be fastdistill.softlabels.SoftLabels, got "
                        f"{type(soft_labels).__name__}")
    codec = soft_labels.codec
    _checks.same_device(**same_device_as, soft_labels=soft_labels.data)
    if soft_labels.shape != lead:
        raise ValueError(f"the student's leading shape {tuple(lead)} differs from the soft "
                         f"labels' {tuple(soft_labels.shape)}")
    if vocab_size != codec.vocab_size:
        raise ValueError(f"the student's vocabulary ({vocab_size}) differs from the soft labels' "
                         f"({codec.vocab_size})")
    tail = codec.tail if tail is None else tail
    _checks.choice("tail", tail, ref_sparse.TAILS)
    if codec.method == "sampled" and tail == "bucket":
        raise ValueError("sampled soft labels store no tail mass: use tail='none' (or "
                         "'renormalize')")
    if temperature is None:
        temperature = codec.temperature
    elif not math.isclose(float(temperature), codec.temperature, rel_tol=1e-6):
        raise ValueError(f"temperature={temperature} differs from the soft labels' "
                         f"({codec.temperature}): the teacher's log-probabilities were taken at that "
                         "temperature")
    if divergence == "taid":
        raise ValueError("divergence='taid' needs the dense teacher logits; not with soft labels")
    return tail, temperature
