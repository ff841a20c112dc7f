"""Label token windows with a teacher on one process or on several ranks
(``torchrun``, ``accelerate launch``) into one soft-label store.

``label_windows(model, windows, out, ...)`` stores the packed soft labels of
row ``i`` of ``windows`` under the key ``str(i)``. On one process it writes
straight into the store ``out``. Under a launcher (``WORLD_SIZE`` > 1, or a
process group already initialized) the windows not stored yet are split over
the ranks and each rank labels its part into a store of its own, and rank 0
moves those entries into ``out``. Every rank must see the same folder ``out``
(one machine, or a file system shared by the nodes).

Design: per-rank staging stores, merged by rank 0
--------------------------------------------------
A store has a single writer (an flock keeps a second one out) and a single
manifest numbering its shards 0, 1, 2, ...; a reader trusts nothing the
manifest does not list. Two processes appending to one manifest would race
on the numbering and on the manifest file itself. So:

- Rank ``r`` writes through its own ``SoftLabelWriter`` into
  ``out/.ranks/rank-<r>``, a complete store of its own (lock, manifest,
  crash safety). ``SoftLabelStore(out)`` never looks inside ``.ranks`` (only
  ``shard-*.fdsl`` files at the top of ``out`` belong to the store), so
  readers see one store, ``out``, before, during and after the run.
- Rank 0 holds the writer of ``out`` itself for the whole run (so a second
  job on ``out`` is refused), and after the ranks are done *merges*: it
  reads every staging store and adds its entries, in window order, to ``out``
  through that writer, copying each entry's packed bytes as they are
  (bit-exact), then flushes, then deletes the staging store (renamed first
  to ``.ranks/.merged-*``, so a kill during the deletion never leaves half a
  store where the next run looks).
- Why copy rather than rename the staging shards into ``out``: a shard's
  header carries its number, which is its position in one manifest; adopting
  a file would mean rewriting its header and checksum in place, outside the
  store's temp-file/rename protocol that makes every step crash-safe.
  Copying goes through that protocol unchanged; it costs one sequential
  read and write of the packed rows (a few bytes per token), small next to
  the teacher's forward passes that produced them.

Which rank labels what: the windows are cut into the batches a single
process would run (rows ``b*batch .. (b+1)*batch - 1``), and the batches that
hold a window not stored yet go to the ranks in turn (the j-th such batch to
rank ``j % world``). A batch always runs whole (``label_tokens(...,
whole_batches=True)``), so every window's logits come from the same batch of
the same inputs whatever the number of ranks and whatever was stored before:
the entries equal a single process's bit for bit (given the same device,
dtype and thread settings on every rank).

Resuming (the rule): a rerun, with any number of processes, first merges
every staging store left in ``out/.ranks`` (by a run killed at any point,
with any world size) into ``out``, skipping windows ``out`` holds already;
then labels only the windows still missing. Every entry that some rank had
flushed before the kill is kept; what a rank had added but not flushed (at
most ``shard_bytes`` of packed rows per rank) is labelled again. A staging
store still locked by a live writer (a rank of another run) is an error
naming it.

Failures: the ranks meet at three points (after rank 0 opened the store and
merged what a killed run left, after labelling, after the final merge) and
exchange whether each succeeded; an exception on any rank makes every rank
raise, naming the failed rank and its error, instead of waiting for it. A
rank that dies is the launcher's to report (``torchrun`` stops the others);
a rank that hangs makes the others' collectives time out after ``timeout``
seconds (the process group's timeout; where this function initializes the
group or makes its own gloo group for the exchanges).
"""
from __future__ import annotations

import datetime
import numbers
import os
import re
import shutil

import torch

from .. import _checks
from .store import DEFAULT_SHARD_BYTES, SoftLabelStore, SoftLabelWriter
from .teacher import label_tokens

__all__ = ["STAGING_DIR", "label_windows", "world_from_env"]

STAGING_DIR = ".ranks"          # in the store's folder: the ranks' own stores
_RANK_DIR = re.compile(r"^rank-(\d+)$")
_MERGED_PREFIX = ".merged-"     # a merged staging store, renamed before it is deleted


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank): the initialized process group's, else
    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` as a launcher sets them, else (1, 0, 0)."""
    import torch.distributed as dist

    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), local
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: RANK={rank} and WORLD_SIZE={world} need "
                         "0 <= RANK < WORLD_SIZE")
    return world, rank, local


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


class _Ranks:
    """The exchanges between the ranks (gloo, CPU objects); one process: no-ops."""

    def __init__(self, timeout: float):
        self.world, self.rank, self.local_rank = world_from_env()
        self.group = None
        self.created = self.own_group = False
        if self.world == 1:
            return
        import torch.distributed as dist

        self.dist = dist
        delta = datetime.timedelta(seconds=timeout)
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=delta)
            self.created = True
        else:  # e.g. accelerate's NCCL group: the exchanges get a CPU group of their own
            self.group = dist.new_group(backend="gloo", timeout=delta)
            self.own_group = True

    def from_rank0(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def check(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether ``what`` succeeded; raise on every rank if one failed."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        every = [None] * self.world
        self.dist.all_gather_object(every, mine, group=self.group)
        failed = [(r, e) for r, e in enumerate(every) if e is not None]
        if not failed:
            return
        if error is not None:
            raise error
        names = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RuntimeError(f"{what} failed on {len(failed)} of {self.world} ranks ({names}); "
                           "what every rank flushed is kept: rerun to resume")

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()
        elif self.own_group:
            self.dist.destroy_process_group(self.group)


def _staging_dirs(out: str) -> list[str]:
    """The rank stores in ``out/.ranks``, in rank order; removes merged leftovers."""
    root = os.path.join(out, STAGING_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(_MERGED_PREFIX):
            shutil.rmtree(path)
        elif (m := _RANK_DIR.match(name)) and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def _window_index(key: str, n: int, where: str) -> int:
    if not key.isdigit() or str(int(key)) != key or int(key) >= n:
        raise ValueError(f"{where} holds key {key!r}, not a window index of this run "
                         f"(0..{n - 1}); it was labelled for other windows: move it away")
    return int(key)


def _merge(writer: SoftLabelWriter, out: str, n: int) -> int:
    """Move every staging store's entries that ``writer`` lacks into it, in
    window order, flush, then delete the staging stores; returns the entries added."""
    dirs = _staging_dirs(out)
    if not dirs:
        return 0
    holders = []  # each staging store's own writer: its lock (no live rank writes it), temp files cleaned
    try:
        sources = []
        for path in dirs:
            holders.append(SoftLabelWriter(path, vocab_size=writer.vocab_size))
            if len(holders[-1]):
                store = SoftLabelStore(path)
                where = f"staging store {path}"
                sources += [(_window_index(key, n, where), key, store) for key in store.keys()]
        added = 0
        for _, key, store in sorted(sources, key=lambda s: s[0]):
            if key not in writer:
                entry = store[key]  # the payload checksum is checked on this read
                writer.add(key, entry.labels, entry.aug)
                added += 1
        writer.flush()  # from here on the staging stores hold nothing the store lacks
    finally:
        for h in holders:
            h.close()
    for path in dirs:
        gone = os.path.join(os.path.dirname(path), _MERGED_PREFIX + os.path.basename(path))
        os.replace(path, gone)
        shutil.rmtree(gone)
    try:
        os.rmdir(os.path.join(out, STAGING_DIR))  # if nothing else is in it
    except OSError:
        pass
    return added


def _batches_to_label(stored, n: int, batch: int, world: int, rank: int) -> list[int]:
    """This rank's batches: of those holding a window not stored yet, every world-th."""
    todo = [b for b in range(-(-n // batch))
            if any(str(i) not in stored for i in range(b * batch, min(n, (b + 1) * batch)))]
    return todo[rank::world]


def label_windows(model, windows: torch.Tensor, out, *, batch: int = 8, k: int = 32,
                  value_bits: int = 8, temperature: float = 1.0,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, device=None,
                  timeout: float = 1800.0, vocab_size: int | None = None,
                  prepare=None) -> dict:
    """Fill the store ``out`` with ``model``'s top-``k`` soft labels of each row of
    ``windows`` (a LongTensor (N, T), every position kept), keyed ``"0"``..``"N-1"``;
    on one process or on the ranks of a launcher (see the module docstring:
    each rank labels its share of the batches into its own staging store, rank
    0 merges them into ``out``). Resumable with any number of processes: only
    windows ``out`` and the staging stores left by a killed run lack are labelled.

    ``batch`` windows per forward pass (the batches a single process runs;
    each runs whole); ``k``, ``value_bits``, ``temperature`` are ``encode``'s;
    ``shard_bytes`` is the writers' (a rank flushes every ``shard_bytes`` of
    packed rows: what a killed rank loses at most). ``progress``: rank 0's bar.
    ``device``: where the model runs (default: its own device); ``"cuda"``
    without an index means this rank's ``cuda:LOCAL_RANK``. ``timeout``
    (seconds) bounds every exchange between the ranks where this function sets
    up the process group. ``vocab_size``: the store's (default: the size of
    the model's output embedding, else ``model.config.vocab_size``).
    ``prepare(writer)``, if given, runs on rank 0 alone
    once ``out`` is open and locked, before anything is labelled (the
    ``label`` job writes ``label_settings.json`` there).

    Returns ``{"stored_before": ..., "labelled": ...}`` (the same on every
    rank): entries ``out`` held when it was opened, and entries it gained
    (those merged from a killed run's staging stores included).
    """
    _checks.tensor("windows", windows)
    if windows.dtype.is_floating_point or windows.is_complex() or windows.dtype == torch.bool:
        raise TypeError(f"windows must be an integer tensor of token ids, got {windows.dtype}")
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError(f"windows must have shape (N, T) with N, T >= 1, got {tuple(windows.shape)}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise TypeError(f"batch must be an int, got {type(batch).__name__}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    timeout = _checks.real("timeout", timeout, low=0.0, low_open=True)
    if prepare is not None and not callable(prepare):
        raise TypeError(f"prepare must be callable or None, got {type(prepare).__name__}")
    _checks.flag("progress", progress)
    out = os.fspath(out)
    n = windows.shape[0]
    if vocab_size is None:
        V = _vocab_size(model)
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    else:
        V = int(vocab_size)
    ranks = _Ranks(timeout)
    if isinstance(device, str) and device == "cuda" and ranks.world > 1:
        device = f"cuda:{ranks.local_rank}"
    try:
        return _run(ranks, model, windows, out, n, V, batch, k, value_bits, temperature,
                    shard_bytes, progress, device, prepare)
    finally:
        ranks.close()


def _vocab_size(model) -> int:
    head = getattr(model, "get_output_embeddings", None)
    weight = getattr(head() if callable(head) else None, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size)
    raise TypeError(f"model must be a causal LM with an output embedding or config.vocab_size "
                    f"(its vocabulary size), got {type(model).__name__}")


def _run(ranks, model, windows, out, n, V, batch, k, value_bits, temperature, shard_bytes,
         progress, device, prepare) -> dict:
    writer = None  # rank 0: the store's writer, held (locked) for the whole run
    state, error = None, None  # rank 0's (entries found, windows stored) for every rank
    try:
        if ranks.rank == 0:
            writer = SoftLabelWriter(out, vocab_size=V, shard_bytes=shard_bytes)
            before = len(writer)
            if prepare is not None:
                prepare(writer)
            _merge(writer, out, n)  # what a killed run's ranks had flushed
            state = (before, [i for i in range(n) if str(i) in writer])
    except Exception as e:  # noqa: BLE001 - every rank is told, then it is raised
        error = e
    try:
        state = ranks.from_rank0(state)
        if state is None:
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not open the soft-label store {out} (its error is "
                               "in rank 0's output)")
        before, stored = state[0], {str(i) for i in state[1]}
        mine = _batches_to_label(stored, n, batch, ranks.world, ranks.rank)
        error = None
        try:
            batches = [windows[b * batch:(b + 1) * batch] for b in mine]
            keys = [i for b in mine for i in range(b * batch, min(n, (b + 1) * batch))]
            opts = dict(k=k, value_bits=value_bits, temperature=temperature, keys=keys,
                        progress=progress and ranks.rank == 0, device=device, whole_batches=True)
            if ranks.world == 1:
                label_tokens(model, batches, writer, **opts)
            else:
                staging = os.path.join(out, STAGING_DIR, f"rank-{ranks.rank}")
                with SoftLabelWriter(staging, vocab_size=V, shard_bytes=shard_bytes) as own:
                    label_tokens(model, batches, own, **opts)
        except Exception as e:  # noqa: BLE001
            error = e
        ranks.check(error, "labelling")
        error = None
        total = None
        try:
            if ranks.rank == 0:
                if ranks.world > 1:
                    _merge(writer, out, n)
                writer.close()
                total = len(writer)
        except Exception as e:  # noqa: BLE001
            error = e
        ranks.check(error, f"merging the ranks' entries into {out}")
        total = ranks.from_rank0(total)
        return {"stored_before": before, "labelled": total - before}
    finally:
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the error that got here is the one to report
