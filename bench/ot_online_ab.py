"""The online cpp sinkhorn_divergence (N=M=4096, d=64, ε=0.05, 100 iterations,
fwd+bwd), median of 3 runs after a warm-up, at whatever fastdistill is first on
sys.path: run it at two commits in alternating fresh processes to compare them,
e.g. `git worktree add /tmp/old REV`, then
`(cd /tmp/old && PYTHONPATH=/tmp/old python bench/ot_online_ab.py old)` and
`python bench/ot_online_ab.py new` here (bench/RESULTS.md, 2026-12-04)."""
import inspect, statistics, sys, time
import torch
import fastdistill as fd
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(4096, 64, generator=g); y = torch.randn(4096, 64, generator=g) + 0.3
kw = dict(epsilon=0.05, n_iters=100, backend="cpp")
if "mode" in inspect.signature(fd.ot.sinkhorn_divergence).parameters:
    kw["mode"] = "online"
times = []
for i in range(4):
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    t0 = time.perf_counter()
    s = fd.ot.sinkhorn_divergence(xx, yy, **kw)
    s.backward()
    dt = time.perf_counter() - t0
    if i: times.append(dt)
print(sys.argv[1], fd.__file__, "S=%.6f" % s.item(), "median %.3f s" % statistics.median(times), ["%.2f" % t for t in times])
