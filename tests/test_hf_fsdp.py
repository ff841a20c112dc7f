"""KDTrainer under FSDP1 and FSDP2 on 2 gloo ranks (CPU), HF's own FSDP path
(switched on for CPU by tests/_kd_fsdp_worker.py's test-only ``FSDPOnCPU``):
full ``train()`` + ``evaluate()`` against one process on the same global batch.
FSDP2 with HF's default wrapping, the head in the root unit and as its own
unit, FSDP1 (use_orig_params=True, and False: the head's weight a view of its
unit's FlatParameter) with the head in the root unit and as its own unit, fused and unfused, gradient accumulation 2,
on-policy batches, the teacher sharded and replicated. The logged losses and
evaluate()'s eval_ce / eval_kl_to_teacher agree to float32 reduction order
(1e-5 relative), the final weights after three plain-SGD steps at lr 0.5 (where
a wrong gradient scale shows at once) to 2e-5 relative. One torchrun launch
runs every case (the CI budget), one plain process every reference."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.fsdp")

WORKER = Path(__file__).with_name("_kd_fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WORKER.parent))
try:
    import _kd_fsdp_worker as worker
finally:
    sys.path.remove(str(WORKER.parent))


def _launch(tmp, nproc):
    out = tmp / f"w{nproc}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable] + ([] if nproc == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    res = subprocess.run(cmd + [str(WORKER), str(out)], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == nproc
    return got["results"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return _launch(tmp, 1), _launch(tmp, 2)


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_sharded_ranks_equal_one_process(runs, case):
    one_all, two_all = runs
    one, two = one_all[worker.reference_key(case)], two_all[case]
    engine, layout, fused, accum, lmbda, sharding = worker.CASES[case]
    assert two["is_fsdp"]  # HF/accelerate really ran FSDP, not a DDP fallback
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5), (one["losses"], two["losses"])
    for key in ("eval_ce", "eval_kl_to_teacher"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key
    assert one["weights"].keys() == two["weights"].keys()
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=2e-5, atol=1e-6, msg=k)
    head = "lm_head.weight" if layout == "head" else "model.embed_tokens.weight"  # or tied
    assert head in two["weights"]
    assert not torch.equal(two["weights"][head], worker.llama(0).state_dict()[head])
    # the teacher: each rank stores half of it ("shard"), or all of it ("replicate")
    assert len(two["teacher_numel"]) == 2
    for local, whole in two["teacher_numel"]:
        share = local / whole
        assert (0.45 < share < 0.55) if sharding == "shard" else share == 1.0, \
            two["teacher_numel"]
    if sharding == "shard":  # the teacher: fully_shard / an FSDP1 unit, its head in the root
        assert two["teacher_type"] == ("FSDPLlamaForCausalLM" if engine == "fsdp2"
                                       else "FullyShardedDataParallel"), two["teacher_type"]
        assert two["teacher_head"] == "Linear"
    else:
        assert two["teacher_type"] == "LlamaForCausalLM"
    if engine == "fsdp2" and layout != "root":  # sharded before KDTrainer: still sharded after
        assert two["params_after_init"] == ["DTensor"], two["params_after_init"]
    # the student's head: its own unit (FSDP2's FSDPLinear / an FSDP1 wrapper) or not
    assert two["student_head"] == {
        ("fsdp2", "root"): "FSDPLinear", ("fsdp2", "rootunit"): "Linear",
        ("fsdp2", "head"): "FSDPLinear", ("fsdp1", "root"): "Linear",
        ("fsdp1", "head"): "FullyShardedDataParallel"}[engine, layout]

