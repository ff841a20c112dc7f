"""KDTrainer across processes: 2 gloo ranks under torchrun (DDP, as the HF
Trainer sets it up on CPU) against one process on the same global batch. The
logged losses, evaluate()'s own metrics (eval_ce, eval_kl_to_teacher: summed
over the ranks, the last batch's padding copies dropped) and the final weights
agree to float32 reduction order (loss and metrics 1e-5 relative, weights
2e-5 relative after three plain-SGD steps, where a wrong gradient scale shows
at once)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("_kd_ranks_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, nproc: int, fused: bool, accum: int, mode: str = "teacher") -> dict:
    out = tmp_path / f"w{nproc}-{int(fused)}-{accum}-{mode}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
               f"--nproc_per_node={nproc}", str(WORKER)]
    cmd += [str(out), "8", "1" if fused else "0", str(accum), mode, str(tmp_path / "store")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("fused,accum,mode", [
    (True, 1, "teacher"), (False, 1, "teacher"), (True, 2, "teacher"),
    (True, 1, "teachers"), (True, 1, "store"), (False, 1, "store"), (True, 2, "taid")],
    ids=["fused", "unfused", "fused-accum2", "two-teachers", "store", "store-unfused", "taid"])
def test_two_ranks_equal_one_process(tmp_path, fused, accum, mode):
    """Each rank reads its own batches' entries of one store (opened read-only by
    both at once); a mixture of two teachers is formed on each rank; TAID's t
    is the same on every rank and equals one process's."""
    if mode == "store":
        sys.path.insert(0, str(WORKER.parent))
        try:
            import _kd_ranks_worker
        finally:
            sys.path.remove(str(WORKER.parent))
        _kd_ranks_worker.label_store(str(tmp_path / "store"))
    one = _run(tmp_path, 1, fused, accum, mode)
    two = _run(tmp_path, 2, fused, accum, mode)
    assert two["world"] == 2 and one["world"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5), (one["losses"], two["losses"])
    for key in ("eval_ce", "eval_ppl", "eval_kl_to_teacher"):  # token means over the whole set
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5,
                                                    nan_ok=True), key
    if mode == "taid":  # every rank steps t on the global loss: one t, one process's
        (t_one,) = one["taid_t"]
        assert t_one != 0.4 and len(two["taid_t"]) == 2  # t moved past its start
        for t_rank in two["taid_t"]:
            assert t_rank == pytest.approx(t_one, rel=1e-9, abs=0), (one["taid_t"], two["taid_t"])
    if mode == "store":  # labelled at T=2: no KL at T=1 to report, the CE is there
        assert two["metrics"]["eval_kl_to_teacher"] != two["metrics"]["eval_kl_to_teacher"]
        assert 0 < two["metrics"]["eval_ce"] < 10
    # HF's eval_loss is the example-weighted mean of each batch's token mean: the batches of
    # 2 ranks hold other examples than one process's (and the padded last batch), so it is
    # close, not equal
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=3e-3)
    assert one["weights"].keys() == two["weights"].keys()
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=2e-5, atol=1e-6, msg=k)
    moved = [k for k in one["weights"] if "lm_head" in k or "embed" in k]
    assert moved  # the weights compared include the (tied) head that the loss trains


FSDP2_WORKER = Path(__file__).with_name("_kd_fsdp2_worker.py")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_fsdp2_with_the_head_as_its_own_unit(tmp_path, fused):
    """fully_shard on the layers, the LM head and the root; 2 gloo ranks, each on
    half of the batch: the gradients FSDP reduces into the shards equal one
    unsharded student's on the whole batch. With fused_head=True the loss runs
    inside the head's forward, where FSDP has gathered its weight."""
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "fsdp2.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(FSDP2_WORKER), str(out), "1" if fused else "0"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2 and got["head_sharded"] == "DTensor"  # the head really is sharded
    assert len(got["diffs"]) == 21 and "lm_head.weight" in got["diffs"]
    worst = max(got["diffs"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst  # relative to each gradient's largest entry
