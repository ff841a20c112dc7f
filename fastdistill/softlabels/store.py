"""The on-disk soft-label store: a directory of shard files and a manifest.

A producer (the teacher) adds ``SoftLabels`` under string keys with
``SoftLabelWriter``; training reads them back memory-mapped with
``SoftLabelStore``. Reading a store never unpickles anything: headers,
indexes and the manifest are fixed binary layouts parsed with ``struct``,
the codec is JSON, and the payload is mapped as raw bytes.

Files of a store directory:

- ``shard-NNNNNN.fdsl``: the shards, numbered 0, 1, 2, ... without gaps.
- ``manifest.fdsm``: which shards the store holds (see below). It is the
  authority: a listed shard that is missing, a ``shard-*.fdsl`` file it
  does not list (extra, or misnamed), and a shard whose size, entry count
  or header differs from its record (replaced, swapped, renamed) all raise
  ``CorruptShardError`` naming the file, on opening a reader or a writer.
  A directory with shards but no manifest is refused the same way (a
  format-1 store, which had no manifest, is refused by its version).
- ``.shard-NNNNNN.fdsl.tmp``, ``.manifest.fdsm.tmp``: files being written
  (readers never look at them; a resuming writer deletes them).
- ``.writer.lock``: an flock held while a writer is open keeps a second
  writer out. The kernel drops it when the holder dies, even by SIGKILL.

A flush (``flush()``, ``close()``, or ``add()`` once ``shard_bytes`` are
pending) writes shard N to its temporary name and fsyncs it, replaces the
manifest with one listing shards 0..N-1 and N as *pending* (every file
replacement here is temp file, fsync, rename, fsync of the directory),
renames the shard into place, then replaces the manifest with one listing
0..N. A pending shard that is in place and matches its record belongs to
the store; a pending shard that is absent is an unfinished flush and is
ignored. Hence:

- Crash (SIGKILL, at any point): the directory holds every entry of every
  flush that returned, exactly once, plus possibly the entries of the flush
  in progress (all of them or none). A reader opens it as is; a new writer
  resumes (``len(writer)``, ``key in writer`` tell the producer what to
  redo) and continues the numbering. Entries added but not yet flushed are
  lost. (Power loss gives the same if the disk honours fsync.)
- Full disk (any ``OSError`` while flushing): the store on disk is
  unchanged and the entries stay pending, so ``flush()``/``close()`` can be
  retried (a failed ``close()`` leaves the writer open); an ``add()`` that
  raises leaves the writer as if it had not been called (its entry is
  neither pending nor known), so the same ``add()`` can be retried once
  there is space. The only write whose failure is not raised is the final
  manifest update of a flush: the shard is durable by then (listed as
  pending and in place); the next flush or ``close()`` retries the update
  and ``close()`` raises if it still fails.
- A reader opened while a writer is flushing sees the store before or
  after that flush (it rereads the manifest if it changed meanwhile).

Manifest ``manifest.fdsm`` (little-endian): 8 bytes magic ``b"FDSLMNFT"``,
u32 manifest version (1), u32 zlib.crc32 of the bytes from offset 16 on,
u64 committed shard count S, u64 pending count P (0 or 1), then S + P
records (shards 0..S+P-1) of u64 entry count, u64 file size, u32
zlib.crc32 of the shard's 80-byte header, u32 reserved (0). The file is
exactly 32 + 24 (S + P) bytes.

Shard file ``shard-NNNNNN.fdsl`` (all integers little-endian):

======  ====  ==============================================================
offset  size  field
======  ====  ==============================================================
0       8     magic ``b"FDSLSHRD"``
8       4     format version (u32, 2)
12      4     prefix CRC (u32): zlib.crc32 of bytes 16..80
16      4     codec JSON length C (u32)
20      4     reserved, 0
24      8     vocab size (u64), equal to the codec's
32      8     entry count N (u64)
40      8     index length I (u64)
48      8     payload offset P (u64): 80 + C + I rounded up to a multiple of 64
56      8     payload length L (u64); the file is exactly P + L bytes
64      4     meta CRC (u32): zlib.crc32 of the codec JSON and the index
68      4     payload CRC (u32): zlib.crc32 of the payload
72      8     shard number (u64), equal to NNNNNN in the file name
80      C     ``Codec.to_json()`` (UTF-8)
80+C    I     the index: N records, each
                  u64 byte offset of the entry's rows in the payload,
                  u16 key length K, u8 ndim D, u8 has-aug flag, u16 aug length A,
                  K bytes of the key (UTF-8), D × i64 leading shape,
                  A × f32 aug
..P           zero padding
P       L     the payload: every entry's packed rows (``codec.row_bytes``
              each), in index order; each entry starts at the first multiple
              of 8 after the previous one's end (zero padding between), so
              the float fields of a single-row entry are aligned in memory
======  ====  ==============================================================

(Format 1 had 0 at offset 72 and no manifest.) The prefix CRC is checked on
open before any length in it is trusted, then the meta CRC before the codec
and index are parsed; the payload CRC is checked by
``SoftLabelStore.verify()`` or the first time an entry of the shard is read.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import struct
import warnings
import zlib
from array import array
from typing import NamedTuple

import torch

from .codec import Codec, SoftLabels

try:  # a second writer on the same directory would reuse shard numbers
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["CorruptShardError", "Entry", "SoftLabelStore", "SoftLabelWriter"]

MAGIC = b"FDSLSHRD"
SHARD_VERSION = 2
MANIFEST_MAGIC = b"FDSLMNFT"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.fdsm"
DEFAULT_SHARD_BYTES = 64 * 2**20
PAYLOAD_ALIGN = 64
ENTRY_ALIGN = 8

_PREFIX = struct.Struct("<8sIIIIQQQQQIIQ")
PREFIX_SIZE = _PREFIX.size  # 80
_RECORD = struct.Struct("<QHBBH")
_MANIFEST_HEAD = struct.Struct("<8sIIQQ")   # magic, version, crc, committed, pending
_MANIFEST_RECORD = struct.Struct("<QQII")   # entries, file size, header crc, reserved
_SHARD_LIKE = re.compile(r"^shard-.*\.fdsl$")  # any of these must be listed in the manifest
_TEMP_NAME = re.compile(r"^\.shard-\d{6,}\.fdsl\.tmp$|^\.manifest\.fdsm\.tmp$")
_MANIFEST_TEMP = ".manifest.fdsm.tmp"
_SCAN_TRIES = 20  # rereads when a writer replaced the manifest while a reader scanned
_LOCK_NAME = ".writer.lock"
_MAX_U16 = 2**16 - 1


class CorruptShardError(ValueError):
    """A store file that cannot be trusted: a shard with a bad header, size or
    checksum, a shard missing from or not listed in the manifest, or a bad
    manifest. The message names the file."""


class Entry(NamedTuple):
    """One stored entry: its soft labels and its augmentation parameters."""

    labels: SoftLabels
    aug: torch.Tensor | None


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.fdsl"


def _temp_name(number: int) -> str:
    return f".shard-{number:06d}.fdsl.tmp"


def normalize_key(key, name: str = "key") -> str:
    """Keys are strings; an int is its decimal string, so 3 and "3" are one entry."""
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} must be encodable as UTF-8, got {key!r}: {e}") from None
        if len(raw) > _MAX_U16:
            raise ValueError(f"{name} must be at most {_MAX_U16} bytes of UTF-8, got {len(raw)}")
        return key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return str(int(key))
    raise TypeError(f"{name} must be a str or an int, got {type(key).__name__}")


def _check_aug(aug) -> torch.Tensor | None:
    """None, or a 1-D run of finite reals as a float32 tensor (exactly what is stored)."""
    if aug is None:
        return None
    if isinstance(aug, (str, bytes)):
        raise TypeError(f"aug must be None or a 1-D sequence/tensor of floats, got {type(aug).__name__}")
    if isinstance(aug, torch.Tensor):
        t = aug.detach()
    elif hasattr(aug, "__array__"):
        try:
            t = torch.as_tensor(aug)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"aug must be a 1-D sequence/tensor of floats: {e}") from None
    else:
        try:
            items = list(aug)
        except TypeError:
            raise TypeError("aug must be None or a 1-D sequence/tensor of floats, "
                            f"got {type(aug).__name__}") from None
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"aug must be a 1-D sequence of real numbers; aug[{i}] is "
                                f"{type(v).__name__}")
        t = torch.tensor([float(v) for v in items], dtype=torch.float64)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"aug must hold real numbers, got a {t.dtype} tensor")
    if t.dim() != 1:
        raise ValueError(f"aug must be 1-D (a few floats per entry), got shape {tuple(t.shape)}")
    if t.numel() > _MAX_U16:
        raise ValueError(f"aug may hold at most {_MAX_U16} values, got {t.numel()}")
    out = t.to(device="cpu", dtype=torch.float32).clone()
    if not bool(torch.isfinite(out).all()):
        raise ValueError("aug must be finite in float32 (None marks an entry without aug), "
                         f"got {t.tolist()}")
    return out


# ----------------------------------------------------------------- reading shards

class _ShardMeta:
    """What a shard's header and index say, checked against its file."""

    __slots__ = ("path", "number", "codec", "codec_json", "prefix", "file_size",
                 "payload_offset", "payload_len", "payload_crc",
                 "keys", "offsets", "shapes", "augs")

    def where(self) -> str:
        return _where(self.path, self.number)


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _where(path: str, number: int) -> str:
    return f"soft-label shard {number} ({path})"


def _read_shard_meta(path: str, number: int) -> _ShardMeta:
    """Header and index of one shard, every length and checksum checked."""
    where = _where(path, number)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREFIX_SIZE)
        if len(prefix) < PREFIX_SIZE:
            raise CorruptShardError(f"{where}: truncated: {size} bytes, shorter than the "
                                    f"{PREFIX_SIZE}-byte shard header")
        (magic, version, prefix_crc, codec_len, reserved0, vocab, count, index_len,
         payload_offset, payload_len, meta_crc, payload_crc, header_number) = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise CorruptShardError(f"{where}: not a soft-label shard (magic {magic!r}, "
                                    f"expected {MAGIC!r})")
        if version != SHARD_VERSION:
            old = (" (format 1 stores have no manifest: write the store again)"
                   if version == 1 else "")
            raise CorruptShardError(f"{where}: shard format version {version} is not supported "
                                    f"(this fastdistill reads version {SHARD_VERSION}){old}")
        if zlib.crc32(prefix[16:]) != prefix_crc:
            raise CorruptShardError(f"{where}: header checksum mismatch (the header is corrupt)")
        if reserved0:
            raise CorruptShardError(f"{where}: reserved header field is not zero")
        if header_number != number:
            raise CorruptShardError(f"{where}: its header says it is shard {header_number}: the "
                                    "file was renamed or copied into this position")
        meta_end = PREFIX_SIZE + codec_len + index_len
        if payload_offset != _align(meta_end, PAYLOAD_ALIGN):
            raise CorruptShardError(f"{where}: payload offset {payload_offset} does not follow "
                                    f"the {meta_end}-byte header and index")
        if size != payload_offset + payload_len:
            what = "truncated" if size < payload_offset + payload_len else "has trailing bytes"
            raise CorruptShardError(f"{where}: {what}: the header says the file is "
                                    f"{payload_offset + payload_len} bytes, it is {size}")
        meta = f.read(codec_len + index_len)
        pad = f.read(payload_offset - meta_end)
    if len(meta) != codec_len + index_len or zlib.crc32(meta) != meta_crc:
        raise CorruptShardError(f"{where}: codec/index checksum mismatch (the header is corrupt)")
    if pad.strip(b"\0"):
        raise CorruptShardError(f"{where}: padding before the payload is not zero")
    codec_json = meta[:codec_len].decode("utf-8", errors="replace")
    try:
        codec = Codec.from_json(codec_json)
    except (ValueError, TypeError) as e:
        raise CorruptShardError(f"{where}: unreadable codec {codec_json!r}: {e}") from None
    if codec.vocab_size != vocab:
        raise CorruptShardError(f"{where}: header vocab size {vocab} differs from its codec's "
                                f"{codec.vocab_size}")
    m = _ShardMeta()
    m.path, m.number, m.codec, m.codec_json, m.prefix = path, number, codec, codec_json, prefix
    m.file_size, m.payload_offset, m.payload_len, m.payload_crc = (
        size, payload_offset, payload_len, payload_crc)
    m.keys, m.offsets, m.shapes, m.augs = _parse_index(meta, codec_len, count, payload_len,
                                                       codec.row_bytes, where)
    return m


def _parse_index(meta: bytes, pos: int, count: int, payload_len: int, row_bytes: int,
                 where: str):
    keys, offsets, shapes, augs = [], [], [], []
    seen = set()
    end = len(meta)
    end_of_last = 0
    for i in range(count):
        if pos + _RECORD.size > end:
            raise CorruptShardError(f"{where}: index ends inside record {i} of {count}")
        offset, klen, ndim, has_aug, alen = _RECORD.unpack_from(meta, pos)
        pos += _RECORD.size
        need = klen + 8 * ndim + 4 * alen
        if pos + need > end or has_aug not in (0, 1) or (alen and not has_aug):
            raise CorruptShardError(f"{where}: index record {i} is malformed")
        try:
            key = meta[pos:pos + klen].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptShardError(f"{where}: index record {i} has a key that is not UTF-8") from None
        pos += klen
        shape = struct.unpack_from(f"<{ndim}q", meta, pos)
        pos += 8 * ndim
        aug = struct.unpack_from(f"<{alen}f", meta, pos) if has_aug else None
        pos += 4 * alen
        expected = _align(end_of_last, ENTRY_ALIGN)
        if any(d < 0 for d in shape) or offset != expected:
            raise CorruptShardError(f"{where}: index record {i} (key {key!r}) has shape {shape} "
                                    f"at payload offset {offset}, expected offset {expected}")
        if key in seen:
            raise CorruptShardError(f"{where}: key {key!r} appears twice in the index")
        seen.add(key)
        end_of_last = offset + math.prod(shape) * row_bytes
        keys.append(key)
        offsets.append(offset)
        shapes.append(shape)
        augs.append(aug)
    if pos != end:
        raise CorruptShardError(f"{where}: {end - pos} unparsed bytes after the {count} index records")
    if end_of_last != payload_len:
        raise CorruptShardError(f"{where}: the index covers {end_of_last} payload bytes, the header "
                                f"says {payload_len}")
    return keys, offsets, shapes, augs


def _manifest_where(path: str) -> str:
    return f"soft-label store manifest {os.path.join(path, MANIFEST_NAME)}"


class _Record(NamedTuple):
    """The manifest's record of one shard: what its file must be."""

    entries: int
    size: int
    header_crc: int


def _record_of(m: _ShardMeta) -> _Record:
    return _Record(len(m.keys), m.file_size, zlib.crc32(m.prefix))


def _read_manifest_bytes(path: str) -> bytes | None:
    """The manifest's bytes, or None where the directory has none."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _parse_manifest(raw: bytes, path: str) -> tuple[list[_Record], _Record | None]:
    """(committed records, pending record or None), every field checked."""
    where = _manifest_where(path)
    if len(raw) < _MANIFEST_HEAD.size:
        raise CorruptShardError(f"{where}: truncated: {len(raw)} bytes, shorter than the "
                                f"{_MANIFEST_HEAD.size}-byte manifest header")
    magic, version, crc, committed, pending = _MANIFEST_HEAD.unpack_from(raw)
    if magic != MANIFEST_MAGIC:
        raise CorruptShardError(f"{where}: not a soft-label store manifest (magic {magic!r}, "
                                f"expected {MANIFEST_MAGIC!r})")
    if version != MANIFEST_VERSION:
        raise CorruptShardError(f"{where}: manifest version {version} is not supported (this "
                                f"fastdistill reads version {MANIFEST_VERSION})")
    if zlib.crc32(raw[16:]) != crc:
        raise CorruptShardError(f"{where}: checksum mismatch (the manifest is corrupt)")
    if pending > 1:
        raise CorruptShardError(f"{where}: {pending} pending shards, at most 1 is possible")
    size = _MANIFEST_HEAD.size + _MANIFEST_RECORD.size * (committed + pending)
    if len(raw) != size:
        raise CorruptShardError(f"{where}: {len(raw)} bytes, but {committed} + {pending} shard "
                                f"records make {size}")
    records = []
    for i in range(committed + pending):
        entries, fsize, hcrc, reserved = _MANIFEST_RECORD.unpack_from(
            raw, _MANIFEST_HEAD.size + i * _MANIFEST_RECORD.size)
        if reserved:
            raise CorruptShardError(f"{where}: record {i} has a nonzero reserved field")
        records.append(_Record(entries, fsize, hcrc))
    return records[:committed], (records[committed] if pending else None)


def _manifest_bytes(records: list[_Record], pending: _Record | None) -> bytes:
    body = struct.pack("<QQ", len(records), pending is not None)
    body += b"".join(_MANIFEST_RECORD.pack(*r, 0)
                     for r in (records if pending is None else [*records, pending]))
    return MANIFEST_MAGIC + struct.pack("<II", MANIFEST_VERSION, zlib.crc32(body)) + body


def _check_record(m: _ShardMeta, rec: _Record, path: str, what: str) -> None:
    got = _record_of(m)
    if got != rec:
        manifest = os.path.join(path, MANIFEST_NAME)
        raise CorruptShardError(
            f"{m.where()}: does not match its record in the manifest {manifest} ({what}: "
            f"{rec.entries} entries, {rec.size} bytes, header CRC {rec.header_crc:#010x}; the "
            f"file has {got.entries} entries, {got.size} bytes, header CRC "
            f"{got.header_crc:#010x}): it was replaced by another shard")


class _Layout(NamedTuple):
    """What a store directory holds, checked against its manifest."""

    metas: list[_ShardMeta]     # the store's shards, numbered 0..len-1
    records: list[_Record]      # their manifest records
    stale: bool                 # the manifest on disk has a pending record (rewrite it)


def _scan_once(path: str, raw: bytes | None) -> _Layout:
    names = sorted(n for n in os.listdir(path) if _SHARD_LIKE.match(n))
    if raw is None:
        if not names:
            return _Layout([], [], False)
        first = os.path.join(path, names[0])
        if names[0] == shard_name(0):  # a format-1 store: say so by its version
            _read_shard_meta(first, 0)
        raise CorruptShardError(f"{_manifest_where(path)}: missing, but the directory holds "
                                f"{len(names)} shard files (e.g. {first}); without the manifest "
                                "the store cannot tell whether shards are missing")
    committed, pending = _parse_manifest(raw, path)
    present = set(names)
    metas, records = [], []
    for n, rec in enumerate(committed):
        file = os.path.join(path, shard_name(n))
        if shard_name(n) not in present:
            raise CorruptShardError(f"{_where(file, n)}: missing: the manifest "
                                    f"{os.path.join(path, MANIFEST_NAME)} lists it with "
                                    f"{rec.entries} entries ({len(committed)} shards in all)")
        m = _read_shard_meta(file, n)
        _check_record(m, rec, path, "listed")
        metas.append(m)
        records.append(rec)
    if pending is not None and shard_name(len(committed)) in present:
        n = len(committed)
        m = _read_shard_meta(os.path.join(path, shard_name(n)), n)
        _check_record(m, pending, path, "pending")
        metas.append(m)
        records.append(pending)
    extra = [n for n in names if n not in {shard_name(i) for i in range(len(metas))}]
    if extra:
        lists = f"shards 0..{len(metas) - 1}" if metas else "no shards"
        more = f" ({len(extra) - 1} more such files)" if len(extra) > 1 else ""
        raise CorruptShardError(f"soft-label shard file {os.path.join(path, extra[0])} is not "
                                f"listed in the manifest {os.path.join(path, MANIFEST_NAME)}, "
                                f"which lists {lists}{more}: an extra or misnamed shard (move it "
                                "out of the store directory)")
    owner: dict[str, _ShardMeta] = {}
    for m in metas:
        if m.codec != metas[0].codec:
            raise CorruptShardError(f"{m.where()}: codec {m.codec_json} differs from the codec "
                                    f"{metas[0].codec_json} of {metas[0].where()}; a store holds "
                                    "one codec")
        for key in m.keys:
            other = owner.setdefault(key, m)
            if other is not m:
                raise CorruptShardError(f"key {key!r} is stored in both {other.where()} and "
                                        f"{m.where()}")
    return _Layout(metas, records, pending is not None)


def _scan(path: str) -> _Layout:
    """Every shard's header and index, checked against the manifest; one codec, unique keys.

    A writer may replace the manifest (and add a shard) while this runs; an
    error is only raised if the manifest was the same before and after it.
    """
    raw = _read_manifest_bytes(path)
    for _ in range(_SCAN_TRIES):
        try:
            return _scan_once(path, raw)
        except (CorruptShardError, FileNotFoundError):
            again = _read_manifest_bytes(path)
            if again == raw:
                raise
            raw = again
    return _scan_once(path, raw)


def _write_durably(path: str, chunks) -> None:
    """Write ``chunks`` (bytes or 1-D byte buffers) to a new file at ``path`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        buf = bytearray()
        for chunk in chunks:
            buf += memoryview(chunk)
            if len(buf) >= 2**20:
                _write_all(fd, buf)
                buf.clear()
        _write_all(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buf) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _remove_quietly(path: str) -> None:
    """Remove a temporary file a failed write leaves, if it is there at all."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    """Make a rename durable: fsync the directory entry (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _positive_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be ≥ 1, got {x}")
    return int(x)


# ----------------------------------------------------------------- the writer

class SoftLabelWriter:
    """Adds soft labels under keys to a store directory, shard by shard.

    The codec is fixed by the first ``add`` (or by the shards already in
    the directory); every ``SoftLabels`` must carry that codec and the
    writer's ``vocab_size``. Entries are buffered and written as a shard
    once about ``shard_bytes`` of packed rows are pending; ``flush()`` writes
    them now and ``close()`` (or leaving a ``with`` block) writes the rest.
    Once ``flush()`` returns its entries survive a crash; entries added but
    not yet in a shard are lost if the process dies: ``len(writer)`` and
    ``key in writer`` after reopening tell a producer what to redo. An
    ``OSError`` (a full disk) from ``add``, ``flush`` or ``close`` leaves the
    store as it was and the call can be retried (see the module docstring).
    """

    def __init__(self, path, *, vocab_size: int, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.path = os.fspath(path)
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.shard_bytes = _positive_int("shard_bytes", shard_bytes)
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = None
        self._closed = False
        self._pending: list[tuple[str, tuple[int, ...], torch.Tensor | None, torch.Tensor]] = []
        self._pending_bytes = 0
        self._lock()
        try:
            for name in os.listdir(self.path):  # a killed writer's unfinished files
                if _TEMP_NAME.match(name):
                    os.unlink(os.path.join(self.path, name))
            layout = _scan(self.path)
        except BaseException:
            self._unlock()
            raise
        metas = layout.metas
        self.codec: Codec | None = metas[0].codec if metas else None
        if self.codec is not None and self.codec.vocab_size != self.vocab_size:
            self._unlock()
            raise ValueError(f"vocab_size={self.vocab_size} but the shards already in {self.path} "
                             f"hold vocab size {self.codec.vocab_size}")
        self._keys = {k for m in metas for k in m.keys}
        # a pending shard in place is adopted; the manifest is rewritten by the next flush
        self._records: list[_Record] = list(layout.records)
        self._stale_manifest = layout.stale
        self.num_shards = len(metas)
        self._next_number = len(metas)

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(os.path.join(self.path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"another SoftLabelWriter has {self.path} open; one writer per "
                               "store directory") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __contains__(self, key) -> bool:
        return normalize_key(key) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key, soft_labels: SoftLabels, aug=None) -> None:
        """Store ``soft_labels`` (any leading shape, kept) and optional ``aug`` floats under ``key``.

        If it raises (e.g. ``OSError`` from a full disk while writing the
        full shard), the entry was not added and the same call can be
        retried; entries pending before it may have been written.
        """
        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed")
        key = normalize_key(key)
        if not isinstance(soft_labels, SoftLabels):
            raise TypeError(f"soft_labels must be SoftLabels, got {type(soft_labels).__name__}")
        codec = soft_labels.codec
        if codec.vocab_size != self.vocab_size:
            raise ValueError(f"soft_labels has vocab size {codec.vocab_size}, the writer's "
                             f"vocab_size is {self.vocab_size}")
        if self.codec is not None and codec != self.codec:
            raise ValueError(f"soft_labels has codec {codec}, but this store holds {self.codec}; "
                             "a store holds one codec (write another codec to another directory)")
        if key in self._keys:
            raise ValueError(f"key {key!r} is already in the store at {self.path}")
        shape = tuple(soft_labels.shape)
        if len(shape) > 255:
            raise ValueError(f"soft_labels may have at most 255 leading dimensions, got {len(shape)}")
        aug = _check_aug(aug)
        data = torch.empty(soft_labels.data.shape, dtype=torch.uint8)
        data.copy_(soft_labels.data)  # our own contiguous CPU copy: later edits don't leak in
        if self._pending and self._pending_bytes + data.numel() > self.shard_bytes:
            self._write_shard()  # raises before this entry is taken in
        codec_before = self.codec
        self.codec = codec
        entry = (key, shape, aug, data)
        self._pending.append(entry)
        self._pending_bytes += data.numel()
        self._keys.add(key)
        if self._pending_bytes >= self.shard_bytes:
            try:
                self._write_shard()
            except BaseException:
                if self._pending and self._pending[-1] is entry:  # not written: as if never added
                    self._pending.pop()
                    self._pending_bytes -= data.numel()
                    self._keys.discard(key)
                    self.codec = codec_before
                raise

    def flush(self) -> None:
        """Write the pending entries as a shard now (smaller than ``shard_bytes``).

        When it returns they survive a crash. If it raises, the store on disk
        is as it was and the entries are still pending: call it again.
        """
        if self._pending:
            self._write_shard()
        if self._stale_manifest:
            self._write_manifest(None)

    def _write_manifest(self, pending: _Record | None) -> None:
        """Replace the manifest atomically: temp file, fsync, rename, fsync of the directory."""
        tmp = os.path.join(self.path, _MANIFEST_TEMP)
        try:
            _write_durably(tmp, [_manifest_bytes(self._records, pending)])
            os.replace(tmp, os.path.join(self.path, MANIFEST_NAME))
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(self.path)
        self._stale_manifest = pending is not None

    def _write_shard(self) -> None:
        """Shard file, manifest naming it pending, rename into place, manifest listing it.

        Raises (leaving the store and the pending entries as they were) only
        before the rename; from then on the shard is in the store.
        """
        number = self._next_number
        codec_json = self.codec.to_json().encode("utf-8")
        index = bytearray()
        payload_crc = 0
        offset = 0
        pads = []
        for key, shape, aug, data in self._pending:
            pad = _align(offset, ENTRY_ALIGN) - offset
            pads.append(b"\0" * pad)
            payload_crc = zlib.crc32(pads[-1], payload_crc)
            offset += pad
            raw_key = key.encode("utf-8")
            naug = 0 if aug is None else aug.numel()
            index += _RECORD.pack(offset, len(raw_key), len(shape), aug is not None, naug)
            index += raw_key
            index += struct.pack(f"<{len(shape)}q", *shape)
            if aug is not None:
                index += struct.pack(f"<{naug}f", *aug.tolist())
            payload_crc = zlib.crc32(data.numpy(), payload_crc)
            offset += data.numel()
        meta_end = PREFIX_SIZE + len(codec_json) + len(index)
        payload_offset = _align(meta_end, PAYLOAD_ALIGN)
        fields = _PREFIX.pack(MAGIC, SHARD_VERSION, 0, len(codec_json), 0, self.codec.vocab_size,
                              len(self._pending), len(index), payload_offset, offset,
                              zlib.crc32(codec_json + index), payload_crc, number)
        prefix = fields[:12] + struct.pack("<I", zlib.crc32(fields[16:])) + fields[16:]
        record = _Record(len(self._pending), payload_offset + offset, zlib.crc32(prefix))
        tmp = os.path.join(self.path, _temp_name(number))
        final = os.path.join(self.path, shard_name(number))
        if os.path.exists(final):
            raise RuntimeError(f"{final} appeared while writing; is another process writing to "
                               f"{self.path}?")

        def chunks():
            yield prefix
            yield codec_json
            yield index
            yield b"\0" * (payload_offset - meta_end)
            for pad, (*_, data) in zip(pads, self._pending):
                yield pad
                yield data.numpy().reshape(-1)

        try:
            _write_durably(tmp, chunks())
            self._write_manifest(record)  # a crash from here on: pending, absent or in place
            os.replace(tmp, final)
        except BaseException:
            _remove_quietly(tmp)
            raise
        # the shard is in the store now (pending and in place): nothing below may undo that
        self._records.append(record)
        self._pending.clear()
        self._pending_bytes = 0
        self._next_number += 1
        self.num_shards += 1
        _fsync_dir(self.path)
        try:
            self._write_manifest(None)
        except OSError:  # the shard is durable already; flush() and close() retry this
            pass

    def close(self) -> None:
        """Write the pending entries and release the directory (idempotent)."""
        if self._closed:
            return
        self.flush()  # on failure the writer stays open, so close() can be retried
        self._closed = True
        self._unlock()

    def __enter__(self) -> "SoftLabelWriter":
        return self

    def __exit__(self, *exc) -> None:
        # entries added before an exception are complete: keep them
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            if self._pending:
                warnings.warn(f"SoftLabelWriter({self.path!r}) was not closed: {len(self._pending)} "
                              "pending entries were not written", ResourceWarning, stacklevel=2)
            self._unlock()

    def __repr__(self) -> str:
        return (f"SoftLabelWriter({self.path!r}, {len(self)} entries, {self.num_shards} shards, "
                f"codec={self.codec})")


# ----------------------------------------------------------------- the reader

class SoftLabelStore:
    """Read-only, memory-mapped view of a store directory's finished shards.

    Headers and indexes are read and checked on open; a shard's payload is
    mapped (copy-on-write, the file is never modified) the first time one of
    its entries is read, and ``store[key].labels.data`` is a view into that
    mapping. Each shard's payload checksum is checked once per process
    before its first entry is returned (call ``verify()`` in the main
    process to check everything up front: a pickled store carries which
    shards are checked, so DataLoader workers do not check them again).

    A view keeps its whole shard mapped; clone it before sending it to
    another process (``SoftLabelDataset`` does so in DataLoader workers).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"soft-label store directory {self.path} does not exist")
        metas = _scan(self.path).metas
        if not metas:
            raise ValueError(f"{self.path} holds no finished soft-label shards (shard-*.fdsl); "
                             "was the writer closed?")
        self.codec: Codec = metas[0].codec
        self._files = [m.path for m in metas]
        self._numbers = [m.number for m in metas]
        self._prefixes = [m.prefix for m in metas]
        self._sizes = [m.file_size for m in metas]
        self._payload = [(m.payload_offset, m.payload_len, m.payload_crc) for m in metas]
        # per entry, compact (a store may hold millions): shard, file offset, shape, aug
        self._keys: list[str] = []
        self._shard = array("i")
        self._offset = array("q")
        self._ndim = array("B")
        self._dims_at = array("q")
        self._dims = array("q")
        self._aug_at = array("q")   # -1: no aug
        self._aug_len = array("H")
        self._augs = array("f")
        rows = 0
        for s, m in enumerate(metas):
            for key, off, shape, aug in zip(m.keys, m.offsets, m.shapes, m.augs):
                self._keys.append(key)
                self._shard.append(s)
                self._offset.append(m.payload_offset + off)
                self._ndim.append(len(shape))
                self._dims_at.append(len(self._dims))
                self._dims.extend(shape)
                rows += math.prod(shape)
                self._aug_at.append(-1 if aug is None else len(self._augs))
                self._aug_len.append(0 if aug is None else len(aug))
                if aug is not None:
                    self._augs.extend(aug)
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._rows_bytes = rows * self.codec.row_bytes
        self._maps: list[torch.Tensor | None] = [None] * len(metas)
        self._checked = [False] * len(metas)

    # -- mapping and checks
    def _where(self, s: int) -> str:
        return _where(self._files[s], self._numbers[s])

    def _map(self, s: int) -> torch.Tensor:
        buf = self._maps[s]
        if buf is None:
            path = self._files[s]
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise CorruptShardError(f"{self._where(s)}: cannot be opened: {e}") from None
            if size != self._sizes[s]:
                raise CorruptShardError(f"{self._where(s)}: is {size} bytes, it was "
                                        f"{self._sizes[s]} when the store was opened")
            buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
            if bytes(buf[:PREFIX_SIZE].numpy()) != self._prefixes[s]:
                raise CorruptShardError(f"{self._where(s)}: header changed since the store was "
                                        "opened")
            self._maps[s] = buf
        return buf

    def _verify_shard(self, s: int) -> None:
        buf = self._map(s)
        offset, length, crc = self._payload[s]
        if zlib.crc32(buf[offset:offset + length].numpy()) != crc:
            raise CorruptShardError(f"{self._where(s)}: payload checksum mismatch (the soft "
                                    "labels in this shard are corrupt)")
        self._checked[s] = True

    def verify(self) -> None:
        """Check every shard's payload checksum; ``CorruptShardError`` names the bad shard."""
        for s in range(len(self._files)):
            self._verify_shard(s)

    # -- mapping-like access
    def __getitem__(self, key) -> Entry:
        i = self._index.get(normalize_key(key))
        if i is None:
            raise KeyError(key)
        return self.entry_at(i)

    def entry_at(self, i: int) -> Entry:
        """The ``i``-th entry in insertion order."""
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"i must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self._keys):
            raise IndexError(f"entry {i} out of range for a store of {len(self._keys)} entries")
        s = self._shard[i]
        if not self._checked[s]:
            self._verify_shard(s)
        buf = self._map(s)
        at, nd = self._dims_at[i], self._ndim[i]
        shape = tuple(self._dims[at:at + nd])
        row_bytes = self.codec.row_bytes
        start = self._offset[i]
        data = buf[start:start + math.prod(shape) * row_bytes].view(*shape, row_bytes)
        a = self._aug_at[i]
        aug = None if a < 0 else torch.tensor(self._augs[a:a + self._aug_len[i]], dtype=torch.float32)
        return Entry(SoftLabels(self.codec, data), aug)

    def get(self, key, default=None):
        i = self._index.get(normalize_key(key))
        return default if i is None else self.entry_at(i)

    def __contains__(self, key) -> bool:
        return normalize_key(key) in self._index

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys)

    def keys(self) -> list[str]:
        """The keys in insertion order (a copy)."""
        return list(self._keys)

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def nbytes(self) -> int:
        """Bytes of packed rows in all shards (headers, indexes and padding not counted)."""
        return self._rows_bytes

    @property
    def shard_files(self) -> list[str]:
        return list(self._files)

    def shard_of(self, key) -> str:
        """The file holding ``key``."""
        i = self._index.get(normalize_key(key))
        if i is None:
            raise KeyError(key)
        return self._files[self._shard[i]]

    # -- pickling for DataLoader workers: no mappings, reopened lazily
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._maps)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        c = self.codec
        return (f"SoftLabelStore({self.path!r}, {len(self)} entries in {len(self._files)} shards, "
                f"{c.method} k={c.k} value_bits={c.value_bits} V={c.vocab_size})")
