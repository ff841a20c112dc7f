"""KDTrainer under DeepSpeed ZeRO-3 (examples/zero3.json, every parameter
partitioned): 2 gloo ranks on CPU (``DS_ACCELERATOR=cpu``) against one plain
process without DeepSpeed, on the same global batch of 8, 3 steps of torch SGD
at lr 0.5 without clipping. The cases run in one launch
(tests/_kd_zero3_worker.py): fused head with tied and untied embeddings,
unfused; the teacher partitioned by its own inference engine ("shard") and
whole on each rank ("replicate"); gradient accumulation 2; a student built
under ``deepspeed.zero.Init``. Logged losses, evaluate()'s eval_ce and
eval_kl_to_teacher agree to 1e-5 relative, the final weights (gathered as HF
saves them) to 2e-5 relative (float32 reduction order: the ranks' partial
sums are added in another order). A gradient that reached the partitions
twice, or was averaged over the wrong count, would move the weights by a
multiple of an lr-0.5 step."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

HERE = Path(__file__).parent
WORKER = HERE / "_kd_zero3_worker.py"
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:
    from _kd_ranks_worker import V, llama
    from _kd_zero3_worker import CASES
finally:
    sys.path.remove(str(HERE))

H = 32  # the tiny Llamas' hidden size
CUDA = os.environ.get("FASTDISTILL_TEST_DEVICE") == "cuda"
# ranks of the ZeRO-3 launch: 2 on CPU; 1 on a GPU (bench/gpu_check.sh: one GPU, and NCCL
# takes one rank per GPU); FASTDISTILL_ZERO3_NPROC overrides
NPROC = int(os.environ.get("FASTDISTILL_ZERO3_NPROC", "1" if CUDA else "2"))


def _launch(tmp_path, mode: str) -> dict:
    out = tmp_path / f"{mode}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if not CUDA:
        env["DS_ACCELERATOR"] = "cpu"
        env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, str(WORKER), mode, str(out)]
    if mode == "zero3":
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stderr[-6000:]
    print(f"{mode}: {time.time() - t0:.1f} s")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if CUDA and not torch.cuda.is_available():
        pytest.fail("FASTDISTILL_TEST_DEVICE=cuda but torch sees no CUDA device")
    tmp = tmp_path_factory.mktemp("zero3")
    return _launch(tmp, "plain"), _launch(tmp, "zero3")


@pytest.mark.parametrize("case", list(CASES))
def test_zero3_two_ranks_equal_one_process(runs, case):
    one, two = runs[0][case], runs[1][case]
    fused, tie, sharding, accum, init = CASES[case]
    assert one["world"] == 1 and two["world"] == NPROC
    assert len(one["losses"]) == len(two["losses"]) == 3
    for a, b in zip(one["losses"], two["losses"]):
        assert b == pytest.approx(a, rel=1e-5), (one["losses"], two["losses"])
    for key in ("eval_ce", "eval_ppl", "eval_kl_to_teacher"):  # token means over the whole set
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key
    # HF's eval_loss: the mean of per-batch means over other batches (see test_hf_distributed)
    assert two["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=3e-3)
    # ZeRO-3 really partitioned the student: its head is empty on each rank between steps
    assert two["student_head"] == [[0, V * H]] * 3, two["student_head"]
    assert one["student_head"] == [[V * H, V * H]] * 3
    # the teacher: 'shard' partitioned by its own engine, 'replicate' whole on each rank
    want_teacher = [0, V * H] if sharding == "shard" else [V * H, V * H]
    assert two["teacher_head"] == want_teacher
    assert one["weights"].keys() == two["weights"].keys()
    start = llama(0, tie).state_dict()
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=2e-5, atol=1e-6, msg=k)
    head = "lm_head.weight"
    assert head in one["weights"]
    moved = float((one["weights"][head] - start[head]).abs().max())
    assert moved > 1e-3, moved  # the head the fused loss trains did move (3 SGD steps)
    if tie:  # one parameter: the head and the embedding end up equal
        embed = two["weights"]["model.embed_tokens.weight"]
        torch.testing.assert_close(two["weights"][head], embed, rtol=0, atol=0)


def test_zero3_refuses_a_partitioned_teacher_to_replicate(runs):
    msg = runs[1]["bad_input"]["replicate_partitioned_teacher"]
    assert "zero.Init" in msg and "teacher_sharding='replicate'" in msg
    assert "teacher_sharding='shard'" in msg  # the way out


def test_shipped_config_is_zero3():
    """examples/zero3.json (what the worker loads) is a ZeRO-3 config HF fills in."""
    cfg = json.loads((ROOT / "examples" / "zero3.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert "optimizer" not in cfg  # HF's optimizer (args.optim) is the one used
    assert cfg["train_micro_batch_size_per_gpu"] == "auto"
    yaml = (ROOT / "examples" / "accelerate_zero3.yaml").read_text()
    assert "distributed_type: DEEPSPEED" in yaml
    assert "deepspeed_config_file: examples/zero3.json" in yaml


def test_teacher_zero_section_fills_auto_from_its_hidden_size():
    from types import SimpleNamespace

    from fastdistill.hf import zero

    ds = SimpleNamespace(config={"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 7}})
    zo = zero._zero_section(SimpleNamespace(deepspeed="ds.json", hf_deepspeed_config=ds),
                            llama(1))
    assert zo == {"stage": 3, "reduce_bucket_size": H * H,
                  "stage3_param_persistence_threshold": 10 * H, "stage3_max_live_parameters": 7}


def test_check_state_refuses_ranks_accelerate_does_not_see(monkeypatch):
    from types import SimpleNamespace

    from fastdistill.hf import zero

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = {"zero_optimization": {"stage": 3}}
    hf_form = SimpleNamespace(deepspeed=cfg, hf_deepspeed_config=SimpleNamespace(config=cfg))
    # `accelerate launch` with a DeepSpeed config: HF leaves args.deepspeed empty
    launch_form = SimpleNamespace(deepspeed=None,
                                  deepspeed_plugin=SimpleNamespace(deepspeed_config=cfg))
    for args in (hf_form, launch_form):
        assert zero.is_zero3(args) and zero.deepspeed_config(args) is cfg
        with pytest.raises(ValueError, match="init_cpu_state"):
            zero.check_state(args, SimpleNamespace(num_processes=1))
        zero.check_state(args, SimpleNamespace(num_processes=2))  # seen: fine
    stage2 = SimpleNamespace(deepspeed=None, deepspeed_plugin=SimpleNamespace(
        deepspeed_config={"zero_optimization": {"stage": 2}}))
    assert not zero.is_zero3(stage2) and not zero.is_zero3(SimpleNamespace())
