"""pytest-benchmark cases for kd_loss: forward+backward of each implementation,
grouped per case so pytest-benchmark's table compares them side by side.

    pytest bench --benchmark-only [--benchmark-group-by=group]
"""
import pytest
import torch

import fastdistill as fd
from fastdistill.reference import kd as ref

N, V = 256, 32000
IMPLS = ["torch-eager", "torch-compile", "cpp", "cpp-inplace"]
_compiled = {}


def _loss_fn(impl, divergence):
    kw = {"divergence": divergence, "taid_t": 0.5 if divergence == "taid" else None}
    if impl == "torch-eager":
        return lambda s, t: ref.kd_loss(s, t, **kw)
    if impl == "torch-compile":
        key = divergence
        if key not in _compiled:
            _compiled[key] = torch.compile(lambda s, t: ref.kd_loss(s, t, **kw))
        return _compiled[key]
    if not fd.backends()["cpp"]:
        pytest.skip("cpp backend unavailable")
    inplace = impl == "cpp-inplace"
    return lambda s, t: fd.kd_loss(s, t, backend="cpp", inplace_backward=inplace, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "taid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kd_loss_fwd_bwd(benchmark, impl, divergence, dtype):
    if dtype == torch.bfloat16 and impl == "torch-compile":
        pytest.skip("compile of the bf16 reference is not part of this comparison")
    torch.manual_seed(0)
    base, teacher = (torch.randn(N, V) * 2).to(dtype), (torch.randn(N, V) * 2).to(dtype)
    loss_fn = _loss_fn(impl, divergence)
    benchmark.group = f"kd_loss {divergence} {N}x{V} {str(dtype)[6:]}"

    def setup():
        leaf = base.clone().requires_grad_()
        return (leaf, leaf.view(N, V)), {}

    def step(leaf, logits):
        loss_fn(logits, teacher).backward()

    benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=2)
