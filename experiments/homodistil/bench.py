"""Benchmarks of the pruning component on CPU (figures in README.md next to this file).

1. Step overhead: the same HomoDistil training step (teacher forward, student forward and
   backward, AdamW step) with and without pruning (masks in the forward pass, a PLATON update
   every step, a mask update every ``--interval`` steps), alternated step by step in one
   process so that machine load affects both alike. Reports the ratio of median step times.
2. Inference: the teacher against its compacted half-width copy (BertModel forward), timed
   alternately, next to the ratio of their forward FLOPs.

Usage: python experiments/homodistil/bench.py [--steps 12] [--batch 16] [--seq 64]
"""

import argparse
import json
import statistics
import time

import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForMaskedLM, BertModel

from kdlab.methods import HomoDistil
from kdlab.pruning import compact

MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
HALF = {"hidden_size": 192, "num_attention_heads": 6, "intermediate_size": 768}
OPTIM = OmegaConf.create(
    dict(
        lr=1e-4,
        weight_decay=0.01,
        betas=[0.9, 0.999],
        eps=1e-8,
        scheduler="constant",
        warmup_ratio=0.0,
        warmup_steps=0,
    )
)


def encoder_flops(config: BertConfig, seq: int) -> int:
    """Forward multiply-adds × 2 of a BERT encoder for one sequence (projections, FFN and
    the two attention products; embeddings, softmax and LayerNorm are negligible)."""
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h
    return config.num_hidden_layers * per_layer


def method(student, teacher, pruning):
    return HomoDistil(
        student,
        teacher,
        num_labels=2,
        metrics=["perplexity"],
        optim=OPTIM,
        head="masked_lm",
        pruning=pruning,
    )


def step_overhead(args) -> dict:
    torch.manual_seed(0)
    config = BertConfig(**MINILM, attn_implementation="eager")
    teacher = BertForMaskedLM(config).eval()
    pruning = OmegaConf.create(
        dict(
            target=HALF,
            schedule="cubic",
            initial_warmup=0.0,
            final_warmup=0.0,
            update_interval=args.interval,
            track_interval=0,
        )
    )
    pruned = method(BertForMaskedLM(config), teacher, pruning)
    # Baseline: the same loss on a student without masks in its forward pass, no importance
    # and no mask updates (its pruner's masks stay all ones, so the loss selects every dim).
    plain = method(BertForMaskedLM(config), teacher, pruning)
    plain.student = BertForMaskedLM(config)
    # The pruned run's masks never finish within the benchmark: the total is set beyond it.
    total = 10 * args.steps
    ids = torch.randint(1000, 30000, (args.batch, args.seq))
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape) < 0.15
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    optimizers = {}
    for name, module in (("plain", plain), ("pruned", pruned)):
        module.student.train()
        params = [p for _, p in module.trainable_parameters()]
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4)
    times = {"plain": [], "pruned": []}
    for step in range(1, args.steps + 2):
        for name, module in (("plain", plain), ("pruned", pruned)):
            opt = optimizers[name]
            start = time.perf_counter()
            loss = module.compute_losses(batch)["loss"]
            loss.backward()
            if name == "pruned":
                module.pruner.accumulate()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if name == "pruned":
                module.pruner.update(step, total)
            if step > 1:  # the first step warms up allocations
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_s": medians["plain"],
        "pruned_s": medians["pruned"],
        "ratio": medians["pruned"] / medians["plain"],
        "final_counts": pruned.pruner.masks.counts(),
        "steps": args.steps,
        "batch": [args.batch, args.seq],
    }


@torch.no_grad()
def inference(args) -> dict:
    torch.manual_seed(0)
    config = BertConfig(**MINILM)
    teacher = BertModel(config, add_pooling_layer=False).eval()
    masked = BertForMaskedLM(config)
    pruner_method = method(
        masked,
        BertForMaskedLM(config).eval(),
        OmegaConf.create(dict(target=HALF, track_interval=0)),
    )
    pruner = pruner_method.pruner
    pruner.structure_scores = lambda: {
        "hidden": torch.rand(384),
        "heads": torch.rand(6, 12),
        "ffn": torch.rand(6, 1536),
    }
    pruner.update(step=10**6, total=10**6)  # straight to the target shape
    student = compact(masked, pruner.masks).bert.eval()
    ids = torch.randint(1000, 30000, (args.infer_batch, args.infer_seq))
    times = {"teacher": [], "student": []}
    for i in range(args.infer_rounds + 1):
        for name, model in (("teacher", teacher), ("student", student)):
            start = time.perf_counter()
            model(input_ids=ids)
            if i:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    flops_t = encoder_flops(teacher.config, args.infer_seq)
    flops_s = encoder_flops(student.config, args.infer_seq)
    return {
        "teacher_ms": 1000 * medians["teacher"],
        "student_ms": 1000 * medians["student"],
        "speedup": medians["teacher"] / medians["student"],
        "flops_ratio": flops_t / flops_s,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "batch": [args.infer_batch, args.infer_seq],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--infer-seq", type=int, default=128)
    parser.add_argument("--infer-rounds", type=int, default=10)
    args = parser.parse_args()
    results = {
        "threads": torch.get_num_threads(),
        "step": step_overhead(args),
        "inference": inference(args),
    }
    print(json.dumps(results, indent=2))  # noqa: T201 - a script's report


if __name__ == "__main__":
    main()
