"""Test session setup: Triton runs through its CPU interpreter (set before
anything imports triton), and the C++ extension is built once, up front."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastdistill._backend as _backend  # noqa: E402


def pytest_configure(config):
    torch.manual_seed(0)
    _backend.load_extension()


def fused_backends():
    """The fast backends available here, each a pytest param (unavailable -> skipped)."""
    status = _backend.backend_status()
    out = []
    for name in ("cpp", "triton"):
        ok, why = status[name]
        out.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why), id=name))
    return out


def inplace_kd_loss(op, z, t, backend):
    """kd_loss, sparse_kd_loss (top-5) or softlabels.kd_loss (top-5 packed) of logits z
    against teacher logits t, with inplace_backward=True."""
    import fastdistill as fd
    from fastdistill import softlabels as sl

    if op == "kd":
        return fd.kd_loss(z, t, inplace_backward=True, backend=backend)
    if op == "sparse":
        lp, ids = torch.log_softmax(t, -1).topk(5, -1)
        return fd.sparse_kd_loss(z, ids, lp, inplace_backward=True, backend=backend)
    return sl.kd_loss(z, sl.encode(t, k=5), inplace_backward=True, backend=backend)
