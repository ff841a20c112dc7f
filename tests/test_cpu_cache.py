"""The CPU gradient cache (fastdistill.cpu_cache): gradients of 8 MiB and over
reuse resident blocks across steps. What must hold: a reused block's stale
contents never leak into a gradient (ignored rows are zeros, values match the
reference), a live gradient's block is never handed out twice, and the limit,
emptying and the environment variable do what they say."""
import os
import subprocess
import sys

import pytest
import torch

import fastdistill as fd
from fastdistill import cpu_cache
from fastdistill import softlabels as sl

pytestmark = pytest.mark.skipif(not fd.backends()["cpp"], reason="cpp unavailable")

N, V = 40, 65537  # 10 MiB of fp32 gradient: over the 8 MiB the cache starts at


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = cpu_cache.memory_stats()["limit_bytes"]
    cpu_cache.empty_cache()
    yield
    cpu_cache.set_limit(limit)
    cpu_cache.empty_cache()


def counts(since=None):
    """(hits, misses), since an earlier counts() when given (the counters never reset)."""
    stats = cpu_cache.memory_stats()
    now = (stats["hits"], stats["misses"])
    return now if since is None else (now[0] - since[0], now[1] - since[1])


def student_grad(loss_fn, student):
    x = student.clone().requires_grad_()
    loss_fn(x).backward()
    return x.grad


def losses():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(N, V, generator=g) * 3
    lp, ids = torch.log_softmax(teacher, -1).topk(16, -1)
    packed = sl.encode(teacher, k=16)
    return {
        "kd_loss": lambda s, **kw: fd.kd_loss(s, teacher, **kw),
        "sparse_kd_loss": lambda s, **kw: fd.sparse_kd_loss(s, ids, lp, **kw),
        "softlabels.kd_loss": lambda s, **kw: sl.kd_loss(s, packed, **kw),
    }


@pytest.mark.parametrize("name", ["kd_loss", "sparse_kd_loss", "softlabels.kd_loss"])
def test_reused_block_holds_no_stale_values(name):
    loss = losses()[name]
    g = torch.Generator().manual_seed(2)
    student = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    start = counts()
    # A first step fills two blocks with gradients everywhere (the kernel's,
    # and the one backward scales it into), and frees them.
    first = student_grad(lambda s: loss(s, backend="cpp") * 1e3, student)
    ptr = first.data_ptr()
    assert (first[::3] != 0).any()
    del first
    stats = cpu_cache.memory_stats()
    assert stats["idle_blocks"] == 2 and stats["live_blocks"] == 0 and counts(start) == (0, 2)
    # The next step gets the latest freed back: its ignored rows must come out 0.
    got = student_grad(lambda s: loss(s, labels=labels, hard_weight=0.3, backend="cpp"), student)
    want = student_grad(lambda s: loss(s, labels=labels, hard_weight=0.3, backend="torch"), student)
    assert got.data_ptr() == ptr
    assert counts(start) == (1, 2)
    assert torch.equal(got[::3], torch.zeros_like(got[::3]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_live_gradient_is_never_shared():
    loss = losses()["kd_loss"]
    student = torch.randn(N, V)
    start = counts()
    a = student_grad(lambda s: loss(s, backend="cpp"), student)
    a_copy = a.clone()
    b = student_grad(lambda s: loss(s, temperature=2.0, backend="cpp"), student)
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(a, a_copy)
    stats = cpu_cache.memory_stats()
    assert stats["live_blocks"] == 2 and counts(start) == (0, 2)
    del a, b
    stats = cpu_cache.memory_stats()
    assert stats["live_blocks"] == 0 and stats["idle_blocks"] == 2
    assert stats["idle_bytes"] >= 2 * N * V * 4


def test_small_gradients_bypass_the_cache():
    start = counts()
    s = torch.randn(8, 1000, requires_grad=True)
    (2 * fd.kd_loss(s, torch.randn(8, 1000), backend="cpp")).backward()
    assert counts(start) == (0, 0)


def test_limit_and_empty():
    loss = losses()["kd_loss"]
    student = torch.randn(N, V)
    student_grad(lambda s: loss(s, backend="cpp"), student)
    assert cpu_cache.idle_bytes() >= N * V * 4
    cpu_cache.empty_cache()
    assert cpu_cache.idle_bytes() == 0
    student_grad(lambda s: loss(s, backend="cpp"), student)
    cpu_cache.set_limit(1 << 20)  # below one block: evicts it, and keeps none after
    assert cpu_cache.idle_bytes() == 0
    student_grad(lambda s: loss(s, backend="cpp"), student)
    assert cpu_cache.memory_stats()["idle_blocks"] == 0
    cpu_cache.set_limit(0)
    assert cpu_cache.memory_stats()["limit_bytes"] == 0


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_set_limit_rejects_bad_values(bad, err):
    with pytest.raises(err, match="nbytes"):
        cpu_cache.set_limit(bad)


@pytest.mark.parametrize("value, ok", [("3", True), ("0", True), ("lots", False), ("-2", False)])
def test_environment_limit(value, ok):
    code = (
        "import torch, fastdistill as fd\n"
        "s = torch.randn(40, 65537, requires_grad=True)\n"
        "fd.kd_loss(s, torch.randn(40, 65537), backend='cpp').backward()\n"
        "print(fd.cpu_cache.memory_stats()['limit_bytes'])\n"
    )
    env = dict(os.environ, FASTDISTILL_CPU_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[-1]) == int(value) << 20
    else:
        assert out.returncode != 0
        assert "FASTDISTILL_CPU_CACHE_MB" in out.stderr


def test_fused_linear_reuses_its_buffers_exactly():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(96, 64, generator=g), torch.randn(40000, 64, generator=g) / 8
    th, tw = torch.randn(96, 48, generator=g), torch.randn(40000, 48, generator=g) / 7
    labels = torch.randint(0, 40000, (96,), generator=g)
    labels[5::4] = -100

    def step():
        x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fd.fused_linear_kd_loss(x, wx, th, tw, labels=labels, chunk_size=40,
                                       divergence="jsd", backend="cpp")
        (0.5 * loss).backward()
        return loss.detach(), x.grad, wx.grad

    start = counts()
    first = step()
    assert counts(start)[1] > 0  # chunk logits and grad_weight came from the cache
    second = step()
    assert counts(start)[0] >= counts(start)[1]  # and the second step reused them
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_checks_its_size():
    with pytest.raises(ValueError, match="size must be >= 0"):
        cpu_cache.empty((3, -1))


@pytest.mark.parametrize("size, err, match", [
    ((3, -1), ValueError, "size must be >= 0"),
    (-4, ValueError, "size must be >= 0"),
    ((2**62 + 2**22,), ValueError, "size"),          # 2**64 + 2**24 bytes: wraps to 16 MiB
    ((2**31, 2**31, 4), ValueError, "size"),         # numel 2**64: wraps to 0
    ((2**63,), ValueError, "size"),                  # one dim past int64
    ((3, 2.0), TypeError, "size"),
    ((3, True), TypeError, "size"),
    ("ab", TypeError, "size"),
    (None, TypeError, "size"),
])
def test_empty_rejects_bad_and_overflowing_sizes(size, err, match):
    with pytest.raises(err, match=match):
        cpu_cache.empty(size)


def test_empty_rejects_a_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        cpu_cache.empty((4,), "float32")


def test_empty_accepts_the_edges():
    assert cpu_cache.empty(5).shape == (5,)
    assert cpu_cache.empty((0, 2**62)).shape == (0, 2**62)   # no bytes at all
    assert cpu_cache.empty(torch.Size([2, 3]), torch.float16).dtype == torch.float16
    with pytest.raises((RuntimeError, MemoryError), match="memory"):
        cpu_cache.empty((2**61 - 1,))  # fits int64 bytes (~16 EiB): refused by mmap, no crash


@pytest.mark.parametrize("op", ["empty", "kernel"])
def test_overflowing_size_never_gives_a_tensor_past_its_mapping(op):
    """Both doors to the cache, in a child process so a crash (SIGSEGV) fails
    this test instead of killing pytest: the Python wrapper, and the op itself
    (the C++ byte count is checked too, not only the wrapper's)."""
    call = ("fd.cpu_cache.empty((2**62 + 2**22,))" if op == "empty" else
            "torch.ops.fastdistill.cpu_cache_new([2**62 + 2**22], torch.float32)")
    code = (
        "import torch, fastdistill as fd\n"
        "fd.backends()\n"
        "try:\n"
        f"    t = {call}\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    print('accepted', t.shape, float(t.sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    assert "refused:" in out.stdout and "size" in out.stdout, out.stdout


@pytest.mark.parametrize("bad", [2**63, -2**63])
def test_set_limit_rejects_values_past_int64(bad):
    with pytest.raises(ValueError, match="nbytes"):
        cpu_cache.set_limit(bad)
