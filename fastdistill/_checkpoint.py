"""Sealed, atomic checkpoint files, shared by the trainers (dd, diffusion).

file = MAGIC (8 bytes) | version (u32) | payload length (u64) | SHA-256 of
the payload | payload, the payload being ``torch.save`` of the state. The
digest is checked before the payload is unpickled, and the unpickler is
torch's weights_only one (tensors, numbers, strings, containers; no code), so
a damaged or crafted file is an error naming it, never a resume from other
state or code run on load. Writes go to a temporary file renamed over the old
one, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import struct
from pathlib import Path

import torch

_HEADER = struct.Struct("<8sIQ32s")


def sealed_bytes(state: dict, magic: bytes, version: int) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return _HEADER.pack(magic, version, len(payload), hashlib.sha256(payload).digest()) + payload


def write(path: Path, state: dict, magic: bytes, version: int) -> None:
    """``state`` sealed into ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(sealed_bytes(state, magic, version))
    os.replace(tmp, path)


def read(path: str | os.PathLike, magic: bytes, version: int, what: str) -> dict:
    """The state in a sealed file, after checking, in this order, the header,
    the length and the SHA-256 of the payload, then unpickling it with
    ``weights_only=True`` and checking it is a dict of that ``version``.
    Anything else: a ValueError naming the file and the problem (``what``
    says which kind of checkpoint was expected)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the checkpoint ({e})") from e
    if len(data) < _HEADER.size or not data.startswith(magic):
        raise ValueError(f"{path}: not a fastdistill {what} checkpoint (no {magic.decode()} header)")
    _, found, length, digest = _HEADER.unpack_from(data)
    if found != version:
        raise ValueError(f"{path}: checkpoint format version {found}, this fastdistill reads "
                         f"{version}")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != length:
        raise ValueError(f"{path}: corrupt checkpoint (the header says {length} payload bytes, the "
                         f"file holds {len(payload)}: truncated or appended to)")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{path}: corrupt checkpoint (SHA-256 of the payload does not match the "
                         "header)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a failed or refused unpickling means a bad file
        raise ValueError(f"{path}: checkpoint payload cannot be loaded safely ({e})") from e
    if not isinstance(state, dict) or state.get("version") != version:
        raise ValueError(f"{path}: not a fastdistill {what} checkpoint of version {version}")
    return state


def check_fields(path, state: dict, types: dict) -> None:
    """Each field of ``types`` present with its type."""
    for key, kind in types.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: checkpoint field {key!r} is missing or not a {kind.__name__}")


def floats(obj, where: str):
    """(where, tensor or float) for every floating value inside obj."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield where, obj
    elif isinstance(obj, float):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from floats(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from floats(v, f"{where}[{i}]")


def check_finite(path, obj, where: str = "state") -> None:
    """Every floating value in ``obj`` finite: a diverged run is not resumed."""
    for at, v in floats(obj, where):
        if not (bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else math.isfinite(v)):
            raise ValueError(f"{path}: checkpoint holds non-finite values in {at} (the run "
                             "diverged before it was saved); it cannot be resumed")
