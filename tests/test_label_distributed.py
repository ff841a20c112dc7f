"""Labelling on several ranks (fastdistill.softlabels.parallel, `fastdistill label` under
torchrun): 2 gloo ranks on CPU write one store whose entries equal one process's bit for
bit; a rank SIGKILLed while labelling, or rank 0 while merging, leaves a store that a
rerun (on 1 process, or on 2) finishes, again equal to one process's; an error on one
rank fails every rank at once; readers see one consistent store throughout."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdistill.softlabels import CorruptShardError, SoftLabelStore, SoftLabelWriter  # noqa: E402
from fastdistill.softlabels import label_tokens, parallel  # noqa: E402

WORKER = Path(__file__).with_name("_label_ranks_worker.py")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WORKER.parent))
import _label_ranks_worker as worker  # noqa: E402

sys.path.remove(str(WORKER.parent))

LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    for name in LAUNCH_ENV:
        env.pop(name, None)
    return env


def torchrun(tmp_path, *args, nproc=2, module=False, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *(["-m"] if module else []), *map(str, args)]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def results(res) -> dict:
    """{rank: label_windows' result} from the worker's RESULT lines."""
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            _, rank, payload = line.split(" ", 2)
            out[int(rank)] = json.loads(payload)
    return out


@pytest.fixture
def one_thread(monkeypatch):
    """The workers' thread settings in this process too, and no launcher in its env."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process's store of the worker's windows, as {key: packed rows}, and its key order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("ref") / "one"
        assert worker.label(worker.teacher(), path) == {"stored_before": 0,
                                                        "labelled": worker.N}
    finally:
        torch.set_num_threads(threads)
    store = SoftLabelStore(path)
    return {key: store[key].labels.data.clone() for key in store}, store.keys()


def assert_equal_to(reference, path):
    want, order = reference
    store = SoftLabelStore(path)
    store.verify()
    assert sorted(store.keys(), key=int) == order
    for key, data in want.items():
        assert torch.equal(store[key].labels.data, data), key
    assert not os.path.exists(os.path.join(path, parallel.STAGING_DIR))  # merged, removed
    return store


class Reader(threading.Thread):
    """Opens the store over and over while the ranks run; every entry it sees must be the
    reference's (an empty or absent store is the only error allowed)."""

    def __init__(self, path, reference):
        super().__init__(daemon=True)
        self.path, self.want = path, reference[0]
        self.stop, self.opened, self.sizes, self.failure = threading.Event(), 0, set(), None

    def run(self):
        while not self.stop.is_set():
            try:
                store = SoftLabelStore(self.path)
            except FileNotFoundError:
                pass
            except ValueError as e:
                if "holds no finished soft-label shards" not in str(e):
                    self.failure = e
                    return
            else:
                self.opened += 1
                self.sizes.add(len(store))
                for key in store:
                    if not torch.equal(store[key].labels.data, self.want[key]):
                        self.failure = AssertionError(f"reader saw another entry {key}")
                        return
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.join(10)
        assert self.failure is None, self.failure


def staged_keys(out, rank):
    path = os.path.join(out, parallel.STAGING_DIR, f"rank-{rank}")
    return set(SoftLabelStore(path).keys())


def windows_of(batches):
    B = worker.BATCH
    return {str(i) for b in batches for i in range(b * B, min(worker.N, (b + 1) * B))}


class Counting(torch.nn.Module):
    """The teacher, recording the batch size of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.shape[0])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_two_ranks_write_one_store_equal_to_one_process(tmp_path, reference):
    out = tmp_path / "two"
    reader = Reader(out, reference)
    reader.start()
    res = torchrun(tmp_path, WORKER, out)
    reader.finish()
    assert res.returncode == 0, res.stderr[-4000:]
    assert results(res) == {r: {"stored_before": 0, "labelled": worker.N} for r in (0, 1)}, (res.stdout, res.stderr[-2000:])
    store = assert_equal_to(reference, out)
    assert store.keys() == reference[1]  # merged in window order: one process's order too
    assert reader.opened >= 1 and reader.sizes <= {worker.N} | set(range(0, worker.N, 2))


def test_a_rank_killed_while_labelling_resumes_on_one_process(tmp_path, reference, one_thread):
    out = tmp_path / "store"
    res = torchrun(tmp_path, WORKER, out, "kill-rank1")
    assert res.returncode != 0
    assert "RESULT" not in res.stdout
    # the split: rank 0 labels batches 0, 2, 4 and rank 1 batches 1, 3, 5, each into its
    # own store; rank 1 died right after its first flush (windows 4 and 5)
    assert staged_keys(out, 0) <= windows_of([0, 2, 4])
    assert staged_keys(out, 1) == {"4", "5"}
    with pytest.raises(ValueError, match="holds no finished soft-label shards"):
        SoftLabelStore(out)  # readers see the store itself, which nothing was merged into yet
    flushed = staged_keys(out, 0) | staged_keys(out, 1)
    teacher = Counting(worker.teacher())
    # the rerun, on one process: merges what both ranks flushed, labels the rest
    assert worker.label(teacher, out, vocab_size=worker.V) == {"stored_before": 0,
                                                               "labelled": worker.N}
    # only the batches holding a missing window ran, each whole
    redo = [b for b in range(6) if windows_of([b]) - flushed]
    assert 1 in redo and teacher.calls == [len(windows_of([b])) for b in redo]
    assert_equal_to(reference, out)
    teacher.calls.clear()
    assert worker.label(teacher, out, vocab_size=worker.V) == {"stored_before": worker.N,
                                                               "labelled": 0}
    assert teacher.calls == []


def test_rank0_killed_while_merging_resumes_on_two_ranks(tmp_path, reference):
    out = tmp_path / "store"
    res = torchrun(tmp_path, WORKER, out, "kill-merge")
    assert res.returncode != 0
    # both ranks had labelled all of their windows; rank 0 died after the store's first shard
    assert staged_keys(out, 0) == windows_of([0, 2, 4])
    assert staged_keys(out, 1) == windows_of([1, 3, 5])
    partial = SoftLabelStore(out)
    assert partial.keys() == ["0", "1"]
    for key in partial:
        assert torch.equal(partial[key].labels.data, reference[0][key])
    reader = Reader(out, reference)
    reader.start()
    res = torchrun(tmp_path, WORKER, out)
    reader.finish()
    assert res.returncode == 0, res.stderr[-4000:]
    assert results(res) == {r: {"stored_before": 2, "labelled": worker.N - 2} for r in (0, 1)}
    store = assert_equal_to(reference, out)
    assert store.keys() == reference[1]
    assert reader.opened >= 1


def test_an_error_on_one_rank_fails_every_rank_at_once(tmp_path):
    out = tmp_path / "store"
    start = time.monotonic()
    res = torchrun(tmp_path, WORKER, out, "error-rank1", timeout=worker.TIMEOUT_S - 20)
    assert res.returncode != 0
    assert time.monotonic() - start < worker.TIMEOUT_S - 20  # no rank waited for a timeout
    assert ("[rank0]: RuntimeError: labelling failed on 1 of 2 ranks (rank 1: RuntimeError: "
            "rank 1's teacher broke); what every rank flushed is kept") in res.stderr
    assert "[rank1]: RuntimeError: rank 1's teacher broke" in res.stderr
    assert staged_keys(out, 0) == windows_of([0, 2, 4])  # rank 0's share is kept for a rerun


def test_the_label_job_under_torchrun_equals_one_process(tmp_path, one_thread):
    pytest.importorskip("accelerate")
    pytest.importorskip("gguf")
    from fastdistill.hf import defaults, jobs

    try:
        tok = defaults.load_tokenizer()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    ).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    common = dict(teacher=str(teacher), data="kjv", sequences=7, seq_len=12, k=8, batch=2)
    assert jobs.label(out=str(tmp_path / "one"), progress=False, **common) == {
        "stored_before": 0, "labelled": 7}
    res = torchrun(tmp_path, "fastdistill.cli", "label", "--teacher", teacher, "--data", "kjv",
                   "--sequences", 7, "--seq-len", 12, "--k", 8, "--batch", 2, "--out",
                   tmp_path / "two", "--quiet", module=True)
    assert res.returncode == 0, res.stderr[-4000:]
    # rank 0 alone prints the summary
    assert res.stdout.count("0 already stored, 7 labelled now: 7 of 7 sequences") == 1
    one, two = SoftLabelStore(tmp_path / "one"), SoftLabelStore(tmp_path / "two")
    assert one.keys() == two.keys() == [str(i) for i in range(7)]
    for key in one:
        assert torch.equal(one[key].labels.data, two[key].labels.data), key
    assert jobs.read_label_settings(tmp_path / "two") == jobs.read_label_settings(
        tmp_path / "one")
    # the store is `kd --soft-labels`-ready, and a rerun resumes (nothing left to label)
    jobs.check_store_for_kd(str(tmp_path / "two"), teacher=str(teacher), data="kjv",
                            sequences=7, seq_len=12, temperature=1.0)
    assert jobs.label(out=str(tmp_path / "two"), progress=False, **common) == {
        "stored_before": 7, "labelled": 0}


# ------------------------------------------------------------ in one process, no launcher

def test_bad_arguments_and_environment(tmp_path, one_thread, monkeypatch):
    model, ids = worker.teacher(), worker.windows()
    out = tmp_path / "s"
    with pytest.raises(TypeError, match="windows must be a torch.Tensor"):
        parallel.label_windows(model, ids.tolist(), out)
    with pytest.raises(TypeError, match="windows must be an integer tensor"):
        parallel.label_windows(model, ids.float(), out)
    with pytest.raises(ValueError, match=r"windows must have shape \(N, T\)"):
        parallel.label_windows(model, ids[0], out)
    with pytest.raises(TypeError, match="batch must be an int"):
        parallel.label_windows(model, ids, out, batch="4")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        parallel.label_windows(model, ids, out, batch=0)
    with pytest.raises(ValueError, match="timeout must be in"):
        parallel.label_windows(model, ids, out, timeout=0)
    with pytest.raises(TypeError, match="prepare must be callable"):
        parallel.label_windows(model, ids, out, prepare="settings.json")
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        parallel.label_windows(model, ids, out, vocab_size=61.0)
    with pytest.raises(TypeError, match="model must be a causal LM"):
        parallel.label_windows(lambda **kw: None, ids, out)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE must be an integer"):
        parallel.label_windows(model, ids, out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        parallel.label_windows(model, ids, out)
    assert not out.exists()  # nothing was created by a refused call


def test_leftover_staging_stores_are_checked(tmp_path, reference, one_thread):
    """A staging store with a key that is no window of this run, one a live writer holds,
    and one with a corrupt shard are errors naming it; the store is left as it was."""
    out = tmp_path / "s"
    teacher = worker.teacher()
    alien = out / parallel.STAGING_DIR / "rank-3"
    with SoftLabelWriter(alien, vocab_size=worker.V, shard_bytes=worker.SHARD_BYTES) as w:
        label_tokens(teacher, [worker.windows()[:2]], w, keys=["0", "x"], progress=False,
                     **worker.OPTIONS)
    with pytest.raises(ValueError, match=r"rank-3 holds key 'x', not a window index"):
        worker.label(teacher, out)
    os.rename(alien, tmp_path / "moved")

    held = out / parallel.STAGING_DIR / "rank-1"
    with SoftLabelWriter(held, vocab_size=worker.V):
        with pytest.raises(RuntimeError, match="another SoftLabelWriter has .*rank-1 open"):
            worker.label(teacher, out)

    bad = out / parallel.STAGING_DIR / "rank-0"
    with SoftLabelWriter(bad, vocab_size=worker.V) as w:
        label_tokens(teacher, [worker.windows()[:2]], w, progress=False, **worker.OPTIONS)
    shard = bad / "shard-000000.fdsl"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # a bit flip in the payload
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match=r"rank-0/shard-000000\.fdsl.*payload checksum"):
        worker.label(teacher, out)
    assert shard.exists()  # nothing was deleted


def test_whole_batches_runs_a_partly_stored_batch_whole(tmp_path, reference, one_thread):
    """label_tokens(whole_batches=True): a batch with one window missing runs whole, only the
    missing entry is added, and it equals the uninterrupted run's bit for bit."""
    ids = worker.windows()[:4]
    want, _ = reference
    with SoftLabelWriter(tmp_path, vocab_size=worker.V) as w:
        label_tokens(worker.teacher(), [ids[[0, 1, 3]]], w, keys=[0, 1, 3], progress=False,
                     **worker.OPTIONS)
        counting = Counting(worker.teacher())
        assert label_tokens(counting, [ids], w, progress=False, whole_batches=True,
                            **worker.OPTIONS) == 1
        assert counting.calls == [4]
    store = SoftLabelStore(tmp_path)
    assert store.keys() == ["0", "1", "3", "2"]
    assert torch.equal(store["2"].labels.data, want["2"])
    with pytest.raises(TypeError, match="whole_batches must be a bool"):
        label_tokens(counting, [ids], w, whole_batches=1)
