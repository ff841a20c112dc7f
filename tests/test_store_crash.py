"""The soft-label store under damage and failure: missing, extra, swapped or
replaced shards and bad manifests are refused naming the file; a full disk
during add/flush/close leaves the store and the writer as they were; a
writer killed with SIGKILL at random points leaves a store that a reader and
a resuming writer open at once, with every flushed entry exactly once."""
import errno
import os
import pickle
import random
import select
import shutil
import signal
import time
import traceback
import zlib

import pytest
import torch

from fastdistill.softlabels import store as store_mod
from fastdistill.softlabels.codec import SoftLabels, encode
from fastdistill.softlabels.store import (MANIFEST_NAME, CorruptShardError, SoftLabelStore,
                                          SoftLabelWriter, shard_name)

V = 64
CODEC = encode(torch.randn(1, V), k=4, value_bits=8).codec
ROW = CODEC.row_bytes  # 11 bytes; entries are 2 rows = 22 bytes
N_KEYS = 4000
# made up front (no torch work in a forked child); only the store's bytes matter here
DATA = torch.randint(0, 256, (N_KEYS, 2, ROW), generator=torch.Generator().manual_seed(0),
                     dtype=torch.uint8)


def labels(i: int) -> SoftLabels:
    return SoftLabels(CODEC, DATA[i])


def write_store(path, n=12, shard_bytes=60):
    with SoftLabelWriter(path, vocab_size=V, shard_bytes=shard_bytes) as w:
        for i in range(n):
            w.add(i, labels(i), aug=[float(i)])
    return path


def check_store(path, want_keys, exact=True, crashed=False):
    """The store opens, holds each key once (exactly ``want_keys`` if exact), right bytes;
    no temporary files unless a writer ``crashed``."""
    store = SoftLabelStore(path)
    keys = store.keys()
    assert len(set(keys)) == len(keys), "a key is stored twice"
    if exact:
        assert sorted(keys, key=int) == sorted(want_keys, key=int)
    else:
        assert set(want_keys) <= set(keys)
    store.verify()
    for k in keys:
        e = store[k]
        assert torch.equal(e.labels.data, DATA[int(k)]) and e.aug.tolist() == [float(k)]
    assert crashed or not [n for n in os.listdir(path) if n.endswith(".tmp")]
    return store


# ----------------------------------------------------------------- missing, extra, swapped

@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_missing_shard_is_named(tmp_path, which):
    write_store(tmp_path)
    shards = sorted(n for n in os.listdir(tmp_path) if n.endswith(".fdsl"))
    assert len(shards) == 6
    n = {"first": 0, "middle": 3, "last": 5}[which]
    os.unlink(tmp_path / shard_name(n))
    pattern = rf"shard {n} \(.*{shard_name(n)}\): missing: the manifest .*manifest.fdsm lists it"
    with pytest.raises(CorruptShardError, match=pattern):
        SoftLabelStore(tmp_path)
    with pytest.raises(CorruptShardError, match=pattern):  # a resuming writer refuses too
        SoftLabelWriter(tmp_path, vocab_size=V)


@pytest.mark.parametrize("name", [shard_name(6), shard_name(40), "shard-0000002.fdsl",
                                  "shard-000002 (copy).fdsl", "shard-2.fdsl"])
def test_extra_shard_is_named(tmp_path, name):
    write_store(tmp_path)
    shutil.copy(tmp_path / shard_name(2), tmp_path / name)
    with pytest.raises(CorruptShardError, match=rf"{name.replace('(', '.').replace(')', '.')} "
                                                r"is not listed in the manifest"):
        SoftLabelStore(tmp_path)
    with pytest.raises(CorruptShardError, match="is not listed in the manifest"):
        SoftLabelWriter(tmp_path, vocab_size=V)
    os.unlink(tmp_path / name)
    check_store(tmp_path, [str(i) for i in range(12)])


def test_swapped_renamed_or_replaced_shards_are_named(tmp_path):
    write_store(tmp_path)
    a, b = tmp_path / shard_name(1), tmp_path / shard_name(4)
    os.replace(a, tmp_path / "x")
    os.replace(b, a)
    os.replace(tmp_path / "x", b)
    with pytest.raises(CorruptShardError,
                       match=r"shard-000001.fdsl\): its header says it is shard 4"):
        SoftLabelStore(tmp_path)
    os.replace(a, tmp_path / "x")  # swap back
    os.replace(b, a)
    os.replace(tmp_path / "x", b)
    check_store(tmp_path, [str(i) for i in range(12)])

    # a shard 1 of another store, valid in itself, in this store's place
    other = write_store(tmp_path / "other", n=4, shard_bytes=30)
    shutil.copy(other / shard_name(1), a)
    with pytest.raises(CorruptShardError,
                       match=r"shard-000001.fdsl\): does not match its record in the manifest"):
        SoftLabelStore(tmp_path)


def test_store_without_manifest_or_of_format_1_is_named(tmp_path):
    write_store(tmp_path)
    os.unlink(tmp_path / MANIFEST_NAME)
    with pytest.raises(CorruptShardError, match=r"manifest .*manifest.fdsm: missing, but the "
                                                r"directory holds 6 shard files"):
        SoftLabelStore(tmp_path)
    with pytest.raises(CorruptShardError, match="manifest.fdsm: missing"):
        SoftLabelWriter(tmp_path, vocab_size=V)
    # a format-1 shard 0 is a format-2 one with version 1 (offset 72 was reserved, 0)
    with open(tmp_path / shard_name(0), "r+b") as f:
        f.seek(8)
        f.write((1).to_bytes(4, "little"))
    with pytest.raises(CorruptShardError, match=r"shard-000000.fdsl\): shard format version 1 is "
                                                r"not supported .*reads version 2.*no manifest"):
        SoftLabelStore(tmp_path)


class _RunsCode:
    """Unpickling this creates a marker file: proof that something unpickled store data."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_garbage_or_crafted_manifest_is_named_and_never_run(tmp_path):
    write_store(tmp_path)
    manifest = tmp_path / MANIFEST_NAME
    good = manifest.read_bytes()
    marker = tmp_path.parent / f"{tmp_path.name}-unpickled"
    bomb = pickle.dumps(_RunsCode(str(marker)))
    pat = rf"manifest {tmp_path}/manifest.fdsm: "
    cases = [
        (bomb, "not a soft-label store manifest"),
        (b"", "truncated"),
        (good[:-1], "checksum mismatch"),
        (good[:20], "truncated"),
        (good[:16] + bytes([good[16] ^ 1]) + good[17:], "checksum mismatch"),
        (good[:8] + (9).to_bytes(4, "little") + good[12:], "manifest version 9 is not supported"),
        (os.urandom(300), "not a soft-label store manifest"),
    ]
    for raw, msg in cases:
        manifest.write_bytes(raw)
        with pytest.raises(CorruptShardError, match=pat + msg):
            SoftLabelStore(tmp_path)
        with pytest.raises(CorruptShardError, match=pat + msg):
            SoftLabelWriter(tmp_path, vocab_size=V)
    # a manifest with a valid checksum but impossible fields
    body = (3).to_bytes(8, "little") + (2).to_bytes(8, "little")
    crafted = store_mod.MANIFEST_MAGIC + (1).to_bytes(4, "little")
    crafted += zlib.crc32(body).to_bytes(4, "little") + body
    manifest.write_bytes(crafted)
    with pytest.raises(CorruptShardError, match=pat + "2 pending shards"):
        SoftLabelStore(tmp_path)
    # the same pickle as a whole shard is refused as well
    (tmp_path / shard_name(2)).write_bytes(bomb)
    manifest.write_bytes(good)
    with pytest.raises(CorruptShardError, match=r"shard-000002.fdsl\): not a soft-label shard"):
        SoftLabelStore(tmp_path)
    assert not marker.exists()


def test_reader_rescans_when_a_writer_flushes_during_its_scan(tmp_path, monkeypatch):
    w = SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=10**6)
    for i in range(3):
        w.add(i, labels(i), aug=[float(i)])
    w.flush()
    w.add(3, labels(3), aug=[3.0])
    listdir = os.listdir
    calls = []

    def flushing_listdir(path):  # the writer's next shard lands between manifest read and listing
        if not calls:
            w.flush()
        calls.append(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", flushing_listdir)
    store = SoftLabelStore(tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2 and len(store) == 4
    w.close()


# ----------------------------------------------------------------- full disk

class Faults:
    """Counts, and fails on request with ENOSPC, the store's os.write/os.fsync/os.replace calls."""

    def __init__(self, monkeypatch, root, names=("write", "fsync", "replace")):
        self.root = os.path.realpath(root)
        self.count = 0
        self.fail_at = None
        self.failed = []
        for name in names:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _ours(self, name, args):
        if name == "replace":
            return os.path.realpath(args[0]).startswith(self.root)
        try:
            return os.readlink(f"/proc/self/fd/{args[0]}").startswith(self.root)
        except OSError:
            return False

    def _wrap(self, name, real):
        def call(*args):
            if self._ours(name, args):
                self.count += 1
                if self.count == self.fail_at:
                    self.failed.append(name)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)
        return call

    def arm(self, k):
        """Fail the k-th (1-based) call from now."""
        self.count, self.fail_at, self.failed = 0, k, []


def test_add_that_failed_on_a_full_disk_can_be_retried(tmp_path, monkeypatch):
    """The simplest case: the shard's fsync reports ENOSPC once, in the add that fills it."""
    faults = Faults(monkeypatch, tmp_path, names=("fsync",))
    with SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=44) as w:
        w.add(0, labels(0), aug=[0.0])
        faults.arm(1)  # the first fsync is the new shard file's
        with pytest.raises(OSError, match="No space left"):
            w.add(1, labels(1), aug=[1.0])
        assert faults.failed == ["fsync"] and "1" not in w and len(w) == 1
        w.add(1, labels(1), aug=[1.0])  # space is back
        w.add(2, labels(2), aug=[2.0])
    check_store(tmp_path, ["0", "1", "2"])


@pytest.mark.parametrize("shard_bytes,before", [(44, 1), (50, 2)],
                         ids=["flush-after-taking-in", "flush-before-taking-in"])
def test_full_disk_during_add_leaves_writer_as_before(tmp_path, monkeypatch, shard_bytes, before):
    """22-byte entries. shard_bytes=44: the 2nd pending entry fills a shard, which the add
    writes with that entry in it; 50: the 3rd add writes the 2 pending ones first."""
    base = write_store(tmp_path / "base", n=4, shard_bytes=shard_bytes)  # 2 shards, 0 pending
    faults = Faults(monkeypatch, tmp_path)
    pre = list(range(4, 4 + before))
    key = 4 + before

    def start(d):
        w = SoftLabelWriter(d, vocab_size=V, shard_bytes=shard_bytes)
        for i in pre:
            w.add(i, labels(i), aug=[float(i)])
        assert w.num_shards == 2 and len(w._pending) == before
        return w

    w = start(shutil.copytree(base, tmp_path / "probe"))
    faults.arm(None)
    w.add(key, labels(key), aug=[float(key)])  # this add writes a shard
    ops = faults.count
    assert w.num_shards == 3
    w.close()
    assert ops >= 10  # shard write+fsync, pending manifest, rename, manifest, dir fsyncs
    for k in range(1, ops + 1):
        d = shutil.copytree(base, tmp_path / f"k{k}")
        w = start(d)
        state = (len(w), w.num_shards, list(w._pending), w.codec)
        faults.arm(k)
        try:
            w.add(key, labels(key), aug=[float(key)])
        except OSError as e:
            assert e.errno == errno.ENOSPC and faults.failed
            assert str(key) not in w, k
            assert (len(w), w.num_shards, list(w._pending), w.codec) == state, k
            assert not [n for n in os.listdir(d) if n.endswith(".tmp")], k
            check_store(d, [str(i) for i in range(4)])  # the store on disk is as it was
            faults.arm(None)
            w.add(key, labels(key), aug=[float(key)])  # the retry works now that there is space
        else:  # only the last manifest update (or a directory fsync) may fail unseen
            assert faults.failed and str(key) in w and w.num_shards == 3, k
        faults.arm(None)
        w.add(9, labels(9), aug=[9.0])
        w.close()
        want = [str(i) for i in [*range(key + 1), 9]]
        check_store(d, want)
        w2 = SoftLabelWriter(d, vocab_size=V, shard_bytes=shard_bytes)
        assert len(w2) == len(want) and not w2._stale_manifest
        w2.close()


def test_full_disk_during_flush_and_close_can_be_retried(tmp_path, monkeypatch):
    base = write_store(tmp_path / "base", n=4, shard_bytes=10**6)
    faults = Faults(monkeypatch, tmp_path)
    for k in range(1, 30):
        d = shutil.copytree(base, tmp_path / f"k{k}")
        w = SoftLabelWriter(d, vocab_size=V, shard_bytes=10**6)
        for i in range(4, 7):
            w.add(i, labels(i), aug=[float(i)])
        faults.arm(k)
        try:
            (w.flush if k % 2 else w.close)()
        except OSError:
            # nothing half done: the store holds the old entries, or (failure after the
            # rename, at close rewriting the manifest) all of them
            store = SoftLabelStore(d)
            assert sorted(store, key=int) in ([str(i) for i in range(4)],
                                              [str(i) for i in range(7)]), k
            store.verify()
            faults.arm(None)
            w.close()  # the retry
        else:
            if faults.fail_at > faults.count:  # ran out of operations to fail
                w.close()
                break
            w.close()
        check_store(d, [str(i) for i in range(7)])
        assert not (SoftLabelWriter(d, vocab_size=V)._stale_manifest)
    else:
        pytest.fail("flush/close never ran out of operations to fail")
    assert k > 10


# ----------------------------------------------------------------- SIGKILL

def _child(path, wfd, seed):
    """A producer: adds the keys the store lacks, flushes often, reports each flushed key."""
    rng = random.Random(seed)
    w = SoftLabelWriter(path, vocab_size=V, shard_bytes=rng.choice([30, 80, 200]))
    os.write(wfd, b"ready\n")
    unreported = []
    for i in range(N_KEYS):
        if i in w:
            continue
        w.add(i, labels(i), aug=[float(i)])
        unreported.append(i)
        if rng.random() < 0.4:
            w.flush()  # durable now: tell the parent
            os.write(wfd, "".join(f"{k}\n" for k in unreported).encode())
            unreported.clear()
    w.close()
    os.write(wfd, "".join(f"{k}\n" for k in unreported).encode() + b"closed\n")


def _read_line(fd, timeout):
    buf = b""
    end = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return buf
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and SIGKILL")
def test_writer_killed_at_random_points(tmp_path):
    """20 producers, each resuming the last one's directory, killed with SIGKILL after a
    random delay (some before the writer has even opened). After each, a reader and a
    writer open the directory at once (the dead writer's flock is gone) and every key
    the dead producers saw flushed is there exactly once. (A forked child, not a fresh
    interpreter: importing torch 20 times would take most of a minute.)"""
    rng = random.Random(1234)
    durable: set[str] = set()
    path = str(tmp_path / "store")
    for trial in range(20):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 0
            try:
                os.close(r)
                _child(path, wfd, seed=trial)
            except BaseException:
                os.write(wfd, traceback.format_exc().encode())
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        status = None
        try:
            if trial % 5 == 4:  # kill while it may still be opening (resuming) the writer
                time.sleep(rng.uniform(0, 0.05))
            else:
                line = _read_line(r, timeout=30)
                assert line == b"ready\n", f"trial {trial}: the writer did not open: {line!r}"
                time.sleep(rng.uniform(0, 0.3))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            out = b""
            while chunk := os.read(r, 65536):
                out += chunk
        finally:
            os.close(r)
            if status is None:  # the test failed before the kill: leave no child behind
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert b"Traceback" not in out, out.decode()
        assert b"closed" not in out, "the child finished before the kill: raise N_KEYS"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        lines = out.decode().split("\n")
        # a partial last line is a report cut by the kill (its flush had returned: keep the
        # whole keys only)
        durable.update(x for x in lines[:-1] if x.isdigit())

        t0 = time.monotonic()
        try:
            store = check_store(path, durable, exact=False, crashed=True)
        except (ValueError, FileNotFoundError) as e:  # killed before its first shard landed
            assert not durable, e
            assert not os.path.exists(path) or "no finished soft-label shards" in str(e)
            continue
        if trial % 2:  # a writer opens it too, now (the dead one's lock is gone)
            w = SoftLabelWriter(path, vocab_size=V)
            assert len(w) == len(store) and all(k in w for k in store)
            w.close()
        assert time.monotonic() - t0 < 10
    assert len(durable) > 20

    with SoftLabelWriter(path, vocab_size=V, shard_bytes=10**6) as w:  # the last producer
        for i in range(N_KEYS):
            if i not in w:
                w.add(i, labels(i), aug=[float(i)])
    check_store(path, [str(i) for i in range(N_KEYS)])
