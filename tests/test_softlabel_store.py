"""The on-disk soft-label store: round trips over several shards, a producer
killed with SIGKILL and resumed, corrupt files, bad input, and a DataLoader
with worker processes over the store."""
import functools
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from fastdistill.softlabels.codec import SoftLabels, encode
from fastdistill.softlabels.dataset import SoftLabelDataset, collate_soft_labels
from fastdistill.softlabels import store as store_mod
from fastdistill.softlabels.store import (CorruptShardError, SoftLabelStore, SoftLabelWriter,
                                          shard_name)

V = 1000


@functools.lru_cache(maxsize=None)
def make(i: int, T=3, **kw) -> SoftLabels:
    """Deterministic soft labels for entry i (the kill test's child makes the same)."""
    g = torch.Generator().manual_seed(i)
    kw = kw or {"k": 8, "value_bits": 8}
    return encode(torch.randn(T, V, generator=g) * 3, **kw)


def assert_same(got: SoftLabels, want: SoftLabels):
    assert got.codec == want.codec
    assert got.shape == want.shape
    assert torch.equal(got.data, want.data)
    if got.num_rows == 0:  # nothing to decode (and codec.unpack_bits cannot reshape 0 rows)
        return
    # decoded side by side: SoftLabels.decode() of a single row (shape () or (1,)) fails
    # in codec._float_field (a (1, 4) byte slice with row stride 22 cannot be viewed as float)
    both = SoftLabels(got.codec, torch.stack([got.data, want.data]))
    (gi, wi), (gl, wl) = both.decode()
    assert gi.shape == (*got.shape, got.codec.k)
    assert torch.equal(gi, wi) and torch.equal(gl, wl)
    gt, wt = both.tail_mass()
    assert torch.equal(gt, wt)


def flip_bit(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def write_store(path, n=30, shard_bytes=300, **kw):
    want = {}
    with SoftLabelWriter(path, vocab_size=V, shard_bytes=shard_bytes) as w:
        for i in range(n):
            want[str(i)] = make(i, **kw)
            w.add(i, want[str(i)])
    return want


# ----------------------------------------------------------------- round trips

@pytest.mark.parametrize("codec_kw", [{"k": 8, "value_bits": 8}, {"k": 16, "value_bits": 16},
                                      {"method": "sampled", "n_samples": 12, "seed": 1}],
                         ids=["topk8", "topk16", "sampled"])
def test_roundtrip_over_several_shards(tmp_path, codec_kw):
    shapes = [(5,), (), (2, 3), (0,), (1,), (7,)]
    want, augs, order = {}, {}, []
    with SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=400) as w:
        for i in range(24):
            shape = shapes[i % len(shapes)]
            logits = torch.randn(*shape, V, generator=torch.Generator().manual_seed(i)) * 4
            key = f"img/{i:03d}" if i % 2 else i
            aug = None if i % 3 == 0 else ([] if i % 3 == 1 else [i / 7, 0.25, 1.0, float(i % 2)])
            sl = encode(logits, **codec_kw)
            w.add(key, sl, aug=aug)
            order.append(str(key))
            want[str(key)], augs[str(key)] = sl, aug
        assert len(w) == 24 and w.num_shards >= 3  # full shards are written while adding
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".fdsl"))
    assert len(files) >= 4 and files[0] == shard_name(0)

    store = SoftLabelStore(tmp_path)
    assert len(store) == 24
    assert list(store) == order == store.keys()
    assert store.codec == want[order[0]].codec and store.vocab_size == V
    assert store.nbytes == sum(sl.nbytes for sl in want.values())
    for key in order:
        entry = store[key]
        assert_same(entry.labels, want[key])
        if augs[key] is None:
            assert entry.aug is None
        else:
            assert entry.aug.dtype == torch.float32
            assert torch.equal(entry.aug, torch.tensor(augs[key], dtype=torch.float32))
    store.verify()


def test_int_and_str_keys_are_one_entry(tmp_path):
    with SoftLabelWriter(tmp_path, vocab_size=V) as w:
        w.add(3, make(3))
        assert 3 in w and "3" in w and "03" not in w
        with pytest.raises(ValueError, match="'3' is already in the store"):
            w.add("3", make(4))
        w.add("03", make(5))
        assert len(w) == 2
    store = SoftLabelStore(tmp_path)
    assert store.keys() == ["3", "03"]
    assert torch.equal(store[3].labels.data, store["3"].labels.data)
    assert_same(store["3"].labels, make(3))
    assert_same(store["03"].labels, make(5))
    with pytest.raises(KeyError):
        store[4]
    with pytest.raises(TypeError, match="key must be a str or an int"):
        store[3.0]


def test_entries_are_views_into_the_mapped_shard(tmp_path):
    write_store(tmp_path, n=40, shard_bytes=9000, T=40)
    store = SoftLabelStore(tmp_path)
    a, b = store["7"].labels.data, store["8"].labels.data
    shard = store.shard_of("7")
    assert store.shard_of("8") == shard
    # the views' storage is the whole mapped file, not a copy of the entry
    assert a.untyped_storage().nbytes() == os.path.getsize(shard)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.data_ptr() - a.data_ptr() == a.numel()  # back to back in the payload
    assert store["7"].labels.data.data_ptr() == a.data_ptr()

    # a pickled store (for DataLoader workers) carries no payload and reopens lazily
    blob = pickle.dumps(store)
    assert len(blob) < store.nbytes / 2
    again = pickle.loads(blob)
    for key in store:
        assert torch.equal(again[key].labels.data, store[key].labels.data)


# ----------------------------------------------------------------- killed producer

CHILD = textwrap.dedent("""
    import sys, time, torch
    from fastdistill.softlabels.codec import encode
    from fastdistill.softlabels.store import SoftLabelWriter

    def make(i):
        g = torch.Generator().manual_seed(i)
        return encode(torch.randn(3, {V}, generator=g) * 3, k=8, value_bits=8)

    w = SoftLabelWriter(sys.argv[1], vocab_size={V}, shard_bytes=300)
    announced = False
    for i in range({N}):
        w.add(i, make(i), aug=[float(i), 0.5])
        if w.num_shards >= 3 and not announced:
            print("three shards", flush=True)
            announced = True
        if announced:
            time.sleep(0.01)
    w.close()
    print("done", flush=True)
""")


def test_producer_killed_mid_stream_then_resumed(tmp_path):
    N = 150
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(V=V, N=N), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "three shards\n", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # what a killed writer may leave: an unfinished temporary shard
    stale = tmp_path / ".shard-000999.fdsl.tmp"
    stale.write_bytes(b"FDSLSHRD half a shard")
    store = SoftLabelStore(tmp_path)  # the temporary file is never seen
    done = len(store)
    assert 3 * (300 // 66) <= done < N  # 3 full shards of 4 entries (3 rows of 22 bytes)
    for key in store:
        entry = store[key]
        assert_same(entry.labels, make(int(key)))
        assert entry.aug.tolist() == [float(key), 0.5]

    with SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=300) as w:
        assert len(w) == done and all(k in w for k in store)
        assert not stale.exists()
        for i in range(N):
            if i not in w:
                w.add(i, make(i), aug=[float(i), 0.5])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    final = SoftLabelStore(tmp_path)
    assert len(final) == N and sorted(final, key=int) == [str(i) for i in range(N)]
    assert final.keys()[:done] == store.keys()
    for i in range(N):
        assert_same(final[i].labels, make(i))
        assert final[i].aug.tolist() == [float(i), 0.5]
    final.verify()


# ----------------------------------------------------------------- corrupt files

def test_truncated_shard_is_named(tmp_path):
    write_store(tmp_path)
    path = tmp_path / shard_name(1)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 50):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptShardError, match=r"shard 1 \(.*shard-000001\.fdsl\).*truncated"):
            SoftLabelStore(tmp_path)
        with pytest.raises(ValueError, match="shard-000001.fdsl"):  # resuming checks too
            SoftLabelWriter(tmp_path, vocab_size=V)
    path.write_bytes(data + b"\0")
    with pytest.raises(CorruptShardError, match="shard-000001.fdsl.*trailing bytes"):
        SoftLabelStore(tmp_path)


def test_payload_bit_flip_is_caught_by_verify_and_on_first_read(tmp_path):
    want = write_store(tmp_path)
    store = SoftLabelStore(tmp_path)
    bad = store.shard_files[2]
    in_bad = [k for k in store if store.shard_of(k) == bad]
    elsewhere = [k for k in store if store.shard_of(k) != bad]
    flip_bit(bad, os.path.getsize(bad) - 5, bit=3)

    opened = SoftLabelStore(tmp_path)  # the header is fine: opening works
    with pytest.raises(CorruptShardError, match=r"shard 2 \(.*shard-000002\.fdsl\).*payload checksum"):
        opened.verify()
    fresh = SoftLabelStore(tmp_path)
    assert_same(fresh[elsewhere[0]].labels, want[elsewhere[0]])
    for _ in range(2):  # every read of the bad shard fails, not only the first
        with pytest.raises(CorruptShardError, match="shard-000002.fdsl.*payload checksum"):
            fresh[in_bad[-1]]


@pytest.mark.parametrize("offset,message", [
    (0, "not a soft-label shard"),
    (8, "version"),
    (33, "header checksum"),         # the entry count
    (69, "header checksum"),         # the payload checksum itself
    (90, "codec/index checksum"),    # inside the codec JSON
])
def test_header_bit_flip_fails_on_open(tmp_path, offset, message):
    write_store(tmp_path)
    flip_bit(tmp_path / shard_name(0), offset, bit=1)
    with pytest.raises(CorruptShardError, match=rf"shard 0 \(.*shard-000000\.fdsl\).*{message}"):
        SoftLabelStore(tmp_path)


def test_shards_of_different_codecs_are_refused(tmp_path):
    write_store(tmp_path / "a", n=3)  # one shard
    write_store(tmp_path / "b", n=6, k=16, value_bits=8)
    os.replace(tmp_path / "b" / shard_name(1), tmp_path / "a" / shard_name(1))
    with pytest.raises(CorruptShardError, match="shard-000001.fdsl is not listed in the manifest"):
        SoftLabelStore(tmp_path / "a")
    # even a manifest that lists it (crafted here) does not get a second codec in
    a = tmp_path / "a"
    metas = [store_mod._read_shard_meta(str(a / shard_name(n)), n) for n in (0, 1)]
    (a / store_mod.MANIFEST_NAME).write_bytes(
        store_mod._manifest_bytes([store_mod._record_of(m) for m in metas], None))
    with pytest.raises(CorruptShardError, match="shard-000001.fdsl.*differs from the codec"):
        SoftLabelStore(a)


# ----------------------------------------------------------------- bad input

def test_writer_rejects_bad_input(tmp_path):
    for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="shard_bytes"):
            SoftLabelWriter(tmp_path / "x", vocab_size=V, shard_bytes=bad)
    with pytest.raises(ValueError, match="vocab_size"):
        SoftLabelWriter(tmp_path / "x", vocab_size=0)

    w = SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=200)
    w.add("a", make(0))
    with pytest.raises(ValueError, match="one codec"):  # k=8 then k=16
        w.add("b", make(1, k=16, value_bits=8))
    with pytest.raises(ValueError, match="one codec"):  # 8 then 16 bits
        w.add("b", make(1, k=8, value_bits=16))
    small_vocab = encode(torch.randn(3, 500), k=8, value_bits=8)
    with pytest.raises(ValueError, match="vocab size 500.*vocab_size is 1000"):
        w.add("b", small_vocab)
    for i in range(1, 12):  # some shards committed, some entries pending
        w.add(i, make(i))
    assert w.num_shards >= 1
    for key in ("a", 1, "11"):
        with pytest.raises(ValueError, match="already in the store"):
            w.add(key, make(0))
    for key in (3.0, None, b"a", True, ("a",)):
        with pytest.raises(TypeError, match="key must be a str or an int"):
            w.add(key, make(0))
    with pytest.raises(TypeError, match="soft_labels must be SoftLabels"):
        w.add("t", make(0).data)
    for aug, exc, msg in ((torch.zeros(2, 2), ValueError, "1-D"), (torch.tensor(1.0), ValueError, "1-D"),
                          ([[1.0, 2.0]], TypeError, "real numbers"), (["x"], TypeError, "real numbers"),
                          ("abc", TypeError, "aug"), (3.0, TypeError, "aug"),
                          (torch.tensor([1j]), TypeError, "real numbers"),
                          ([float("nan")], ValueError, "finite"), ([1e39], ValueError, "finite")):
        with pytest.raises(exc, match=msg):
            w.add("z", make(0), aug=aug)
    assert "z" not in w and len(w) == 12  # nothing half-added
    with pytest.raises(RuntimeError, match="another SoftLabelWriter"):
        SoftLabelWriter(tmp_path, vocab_size=V)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add("late", make(0))
    with pytest.raises(ValueError, match="vocab_size=2000.*vocab size 1000"):
        SoftLabelWriter(tmp_path, vocab_size=2000)
    with SoftLabelWriter(tmp_path, vocab_size=V) as again:  # the resumed codec is enforced too
        with pytest.raises(ValueError, match="one codec"):
            again.add("new", make(1, k=16, value_bits=16))
    store = SoftLabelStore(tmp_path)
    assert len(store) == 12 and store.codec == make(0).codec


def test_store_rejects_missing_or_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        SoftLabelStore(tmp_path / "nope")
    SoftLabelWriter(tmp_path, vocab_size=V).close()
    with pytest.raises(ValueError, match="no finished soft-label shards"):
        SoftLabelStore(tmp_path)


# ----------------------------------------------------------------- the dataset

def test_dataloader_with_workers_sees_every_key_once(tmp_path):
    n = 45
    want = {}
    with SoftLabelWriter(tmp_path, vocab_size=V, shard_bytes=500) as w:
        for i in range(n):
            want[i] = make(i, T=4)
            w.add(i, want[i], aug=[float(i), 1.0])
    store = SoftLabelStore(tmp_path)
    inputs = {str(i): torch.full((2,), float(i)) for i in range(n)}
    ds = SoftLabelDataset(store, inputs, with_aug=True)
    loader = DataLoader(ds, batch_size=8, sampler=RandomSampler(ds), num_workers=2,
                        collate_fn=collate_soft_labels)
    seen = []
    for x, labels, aug in loader:
        ids = x[:, 0].long().tolist()
        assert isinstance(labels, SoftLabels) and labels.shape == (len(ids), 4)
        assert aug[:, 0].long().tolist() == ids
        expect = SoftLabels(store.codec, torch.stack([want[i].data for i in ids]))
        assert_same(labels, expect)
        seen += ids
    assert sorted(seen) == list(range(n))
    assert seen != list(range(n))  # the sampler did shuffle


def test_dataset_inputs_keys_and_items(tmp_path):
    want = write_store(tmp_path, n=10)
    store = SoftLabelStore(tmp_path)
    images = torch.arange(10) * 10
    ds = SoftLabelDataset(store, images, keys=[7, "2"])
    assert len(ds) == 2
    x, labels = ds[0]
    assert x == 70 and torch.equal(labels.data, want["7"].data)
    assert ds[1][0] == 20
    by_call = SoftLabelDataset(store, lambda key: f"img-{key}", with_aug=True)
    assert by_call[4][0] == "img-4" and by_call[4][2] is None
    alone = SoftLabelDataset(store)
    assert isinstance(alone[3], SoftLabels) and torch.equal(alone[3].data, want["3"].data)
    by_int_dict = SoftLabelDataset(store, {i: -i for i in range(10)})
    assert by_int_dict[5][0] == -5

    with pytest.raises(ValueError, match="not in the store"):
        SoftLabelDataset(store, keys=["99"])
    with pytest.raises(ValueError, match="below 5"):
        SoftLabelDataset(store, images[:5])
    with pytest.raises(ValueError, match="no entry for key '9'"):
        SoftLabelDataset(store, {i: i for i in range(9)})
    with pytest.raises(TypeError, match="store must be a SoftLabelStore"):
        SoftLabelDataset(str(tmp_path))
    with pytest.raises(TypeError, match="inputs must be"):
        SoftLabelDataset(store, 3)
    with pytest.raises(TypeError, match="with_aug"):
        SoftLabelDataset(store, with_aug=1)


def test_collate_soft_labels_errors_and_none():
    a, b = make(0), make(1)
    labels, aug, x = collate_soft_labels([(a, None, 1), (b, None, 2)])
    assert labels.shape == (2, 3) and aug is None and torch.equal(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        collate_soft_labels([a, make(2, T=4)])
    with pytest.raises(ValueError, match="codec"):
        collate_soft_labels([a, make(2, k=16, value_bits=8)])
    with pytest.raises(ValueError, match="some samples are None"):
        collate_soft_labels([(a, None), (b, torch.zeros(2))])
    with pytest.raises(ValueError, match="empty"):
        collate_soft_labels([])
