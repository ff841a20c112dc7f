"""DatasetDistiller checkpoints (issues 15.5 and 20.2): a damaged file is an
error naming it, never a silent resume from different state; non-finite
values are refused; loading runs no code, even from a payload with a valid
checksum."""
import hashlib
import io
import os
import pickle

import pytest
import torch

from fastdistill import _checkpoint
from fastdistill.dd import trainer
from fastdistill.dd.trainer import CHECKPOINT_MAGIC, DatasetDistiller, load_checkpoint

TINY = dict(width=8, depth=2, batch_real=6, outer_loop=2, inner_loop=2, progress=False,
            expert_epochs=1, num_experts=1, syn_steps=2)


def toy_real(n_per_class=6, classes=2, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return torch.randn(len(y), 1, size, size, generator=g) + y.view(-1, 1, 1, 1).float(), y


def write_valid(path, state):
    """A file with a correct header and SHA-256 around any payload state."""
    path.write_bytes(_checkpoint.sealed_bytes(state, CHECKPOINT_MAGIC, trainer.CHECKPOINT_VERSION))


def resume(method, ck, iterations=2):
    return DatasetDistiller(method, ipc=1, iterations=iterations, checkpoint=ck, **TINY).fit(toy_real())


@pytest.mark.parametrize("method", ["dm", "mtt"])
def test_every_single_bit_flip_is_an_error_naming_the_file(method, tmp_path):
    ck = tmp_path / "run.ckpt"
    resume(method, ck, iterations=1)
    good = ck.read_bytes()
    assert load_checkpoint(ck)["iteration"] == 1
    gen = torch.Generator().manual_seed(15_5)
    n = len(good) * 8
    # 64 bit positions: every header bit region, then seeded positions over the whole file
    bits = [0, 7, 8 * 8, 8 * 12 + 3, 8 * 20 + 1, 8 * 40 - 1]
    bits += torch.randint(0, n, (64 - len(bits),), generator=gen).tolist()
    for bit in bits:
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        ck.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="run.ckpt") as info:
            resume(method, ck)
        assert "checkpoint" in str(info.value), bit
    for bad in (good[:-1], good[: len(good) // 2], good + b"\0", b""):  # truncated, appended to
        ck.write_bytes(bad)
        with pytest.raises(ValueError, match="run.ckpt"):
            resume(method, ck)
    ck.write_bytes(good)  # the intact file still resumes
    assert resume(method, ck)[0].shape == (2, 1, 8, 8)


def test_the_checksum_is_over_the_whole_payload(tmp_path):
    ck = tmp_path / "c.ckpt"
    resume("dm", ck, iterations=1)
    data = ck.read_bytes()
    magic, version, length, digest = _checkpoint._HEADER.unpack_from(data)
    assert magic == CHECKPOINT_MAGIC and version == trainer.CHECKPOINT_VERSION
    assert length == len(data) - _checkpoint._HEADER.size
    assert digest == hashlib.sha256(data[_checkpoint._HEADER.size:]).digest()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_images_in_a_checkpoint_are_refused(value, tmp_path):
    ck = tmp_path / "nan.ckpt"
    resume("dc", ck, iterations=1)
    state = load_checkpoint(ck)
    state["images"][1, 0, 2, 3] = value
    write_valid(ck, state)  # a valid checksum: the values themselves are checked
    with pytest.raises(ValueError, match=r"nan.ckpt.*non-finite.*images"):
        resume("dc", ck)


def test_non_finite_optimizer_state_and_mtt_rate_are_refused(tmp_path):
    ck = tmp_path / "m.ckpt"
    resume("mtt", ck, iterations=1)
    state = load_checkpoint(ck)
    state["opt"]["state"][0]["momentum_buffer"].view(-1)[0] = float("nan")
    write_valid(ck, state)
    with pytest.raises(ValueError, match=r"m.ckpt.*non-finite.*opt"):
        resume("mtt", ck)
    resume("mtt", tmp_path / "m2.ckpt", iterations=1)
    state = load_checkpoint(tmp_path / "m2.ckpt")
    state["extra"]["syn_lr"] = float("inf")
    write_valid(ck, state)
    with pytest.raises(ValueError, match=r"m.ckpt.*non-finite.*syn_lr"):
        resume("mtt", ck)


def test_a_valid_file_for_other_data_or_with_missing_fields_is_refused(tmp_path):
    ck = tmp_path / "s.ckpt"
    resume("dm", ck, iterations=1)
    state = load_checkpoint(ck)
    wrong = dict(state, images=state["images"][:, :, :4])
    write_valid(ck, wrong)
    with pytest.raises(ValueError, match=r"s.ckpt.*does not fit"):
        resume("dm", ck)
    for key in ("rng", "opt", "images"):
        write_valid(ck, {k: v for k, v in state.items() if k != key})
        with pytest.raises(ValueError, match=rf"s.ckpt.*{key}"):
            resume("dm", ck)
    write_valid(ck, dict(state, rng=torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"s.ckpt.*generator"):
        resume("dm", ck)


def test_a_checkpoint_from_before_the_checksum_is_refused(tmp_path):
    """Version-2 files (plain torch.save) are not read: they carry no checksum."""
    ck = tmp_path / "old.ckpt"
    resume("dm", ck, iterations=1)
    state = load_checkpoint(ck)
    torch.save(dict(state, version=2), ck)
    with pytest.raises(ValueError, match=r"old.ckpt.*header"):
        resume("dm", ck)


class _Pwn:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _PwnExec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('x')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle", "exec"])
def test_loading_a_crafted_checkpoint_runs_no_code(kind, tmp_path):
    ck = tmp_path / "evil.ckpt"
    armed = tmp_path / "armed"
    marker = tmp_path / "pwned"
    resume("dm", ck, iterations=1)
    state = load_checkpoint(ck)
    evil = _PwnExec(marker) if kind == "exec" else _Pwn(marker)
    payload_state = dict(state, extra={"x": evil})
    if kind == "raw_pickle":
        payload = pickle.dumps(payload_state)
    else:
        buf = io.BytesIO()
        torch.save(payload_state, buf)
        payload = buf.getvalue()
    # the payload is live: an unrestricted unpickler runs it
    probe = _PwnExec(armed) if kind == "exec" else _Pwn(armed)
    live = pickle.dumps(probe) if kind == "raw_pickle" else None
    if live is None:
        buf = io.BytesIO()
        torch.save(probe, buf)
        torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    else:
        pickle.loads(live)
    assert armed.exists()
    # wrapped with a VALID header and checksum: only weights_only stands in the way
    ck.write_bytes(_checkpoint._HEADER.pack(CHECKPOINT_MAGIC, trainer.CHECKPOINT_VERSION, len(payload),
                                        hashlib.sha256(payload).digest()) + payload)
    with pytest.raises(ValueError, match=r"evil.ckpt.*cannot be loaded safely"):
        resume("dm", ck)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_the_loader_uses_no_unrestricted_unpickler():
    """The trainer's source never calls torch.load with weights_only=False."""
    import inspect

    src = inspect.getsource(trainer)
    assert "weights_only=False" not in src and "pickle.load" not in src
    assert "weights_only=True" in src
