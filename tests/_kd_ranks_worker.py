"""One KDTrainer run on tiny Llamas, under ``torchrun`` (gloo, CPU) or as one
process: tests/test_hf_distributed.py runs it both ways on the same global
batch and compares what rank 0 writes (logged losses, evaluate()'s metrics,
the final weights).

    python tests/_kd_ranks_worker.py OUT.pt GLOBAL_BATCH FUSED_HEAD ACCUM [MODE [STORE]]

MODE: "teacher" (one online teacher, the default), "teachers" (a mixture of two,
weights 1:3) or "store" (no teacher: the soft-label store STORE, which
``label_store`` fills beforehand, every example keyed by its example_id).
"""
import os
import sys

import torch
import transformers

from fastdistill import TAIDSchedule
from fastdistill.hf import KDConfig, KDTrainer

V, SEQ = 61, 11


def llama(seed, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def examples(n, seed, keyed=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (SEQ,), generator=g)
        labels = ids.clone()
        labels[:3] = -100                      # a prompt
        out.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                    "labels": labels})
        if keyed:
            out[-1]["example_id"] = f"s{seed}-{i}"
    return out


def label_store(path):
    """The store mode's soft labels: teacher llama(1) at T=2, top-16, 16-bit, for the
    training and the eval examples."""
    from fastdistill.softlabels import SoftLabelWriter, label_tokens

    with SoftLabelWriter(path, vocab_size=V) as writer:
        for n, seed in ((24, 0), (7, 1)):
            ex = examples(n, seed, keyed=True)
            label_tokens(llama(1), [torch.stack([e["input_ids"] for e in ex])], writer, k=16,
                         value_bits=16, temperature=2.0, keys=[e["example_id"] for e in ex],
                         progress=False)


def collate(feats):
    return {k: torch.stack([f[k] for f in feats]) for k in feats[0]}


def main():
    out, global_batch, fused, accum = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", \
        int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "teacher"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    args = KDConfig(output_dir=os.path.dirname(out) + f"/run{world}", max_steps=3,
                    per_device_train_batch_size=global_batch // (world * accum),
                    per_device_eval_batch_size=2, gradient_accumulation_steps=accum,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                    weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                    dataloader_pin_memory=False, fused_head=fused,
                    divergence="taid" if mode == "taid" else "jsd", temperature=2.0,
                    hard_weight=0.25,
                    # a schedule whose t moves with the loss (alpha 0.5), not only the ramp
                    taid=TAIDSchedule(1000, alpha=0.5) if mode == "taid" else False,
                    teacher_weights=[1.0, 3.0] if mode == "teachers" else None)
    student = llama(0)
    keyed = mode == "store"
    if mode == "store":
        from fastdistill.softlabels import SoftLabelStore

        teachers, store = None, SoftLabelStore(sys.argv[6])
    else:
        teachers, store = ([llama(1), llama(2)] if mode == "teachers" else llama(1)), None
    trainer = KDTrainer(model=student, teacher_model=teachers, soft_labels=store, args=args,
                        data_collator=collate, train_dataset=examples(24, 0, keyed),
                        eval_dataset=examples(7, 1, keyed))
    trainer.train()
    metrics = trainer.evaluate()
    taid_t = None if trainer.taid is None else trainer.taid.t
    every_t = [taid_t]
    if world > 1:  # every rank's TAID t
        every_t = [None] * world
        torch.distributed.all_gather_object(every_t, taid_t)
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.save({"losses": losses, "metrics": metrics, "world": world,
                    "taid_t": every_t,
                    "weights": {k: v.detach().clone() for k, v in
                                trainer.accelerator.unwrap_model(trainer.model).state_dict()
                                .items()}}, out)


if __name__ == "__main__":
    main()
