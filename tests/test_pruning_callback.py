"""Pruning is a component beside the method: the callback prunes any method's student."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForMaskedLM

import kdlab.train
from kdlab.pruning import Pruner
from kdlab.rundir import RunDir
from tests.helpers import MatchLogits, RecordPlatonInputs
from tests.test_homodistil import COMMON, HALF, compose, corpus_args, data  # noqa: F401


def pruned_run(data, run_dir, *extra: str) -> dict:  # noqa: F811
    overrides = [
        *COMMON,
        *corpus_args(data),
        "method=finetune",  # a method config without keys, retargeted below
        "method._target_=tests.helpers.MatchLogits",
        "method.name=match_logits",
        "pruning=homotopic",
        *HALF,
        "trainer.max_epochs=2",
        "pruning.update_interval=1",
        "pruning.track_interval=2",
        f"run_dir={run_dir}",
        *extra,
    ]
    return kdlab.train.run(compose(overrides))


def test_a_method_without_pruning_code_is_pruned_and_exported_compact(data, tmp_path):  # noqa: F811
    assert not any("prun" in name for name in vars(MatchLogits))
    metrics = pruned_run(data, tmp_path)
    run_dir = RunDir(tmp_path)
    state = torch.load(run_dir.last_checkpoint, weights_only=True)["callbacks"]["PruningCallback"]
    masks = state["masks"]
    assert int(masks["hidden"].sum()) == 16
    assert (masks["heads"].sum(1) == 2).all() and (masks["ffn"].sum(1) == 32).all()
    student = AutoModelForMaskedLM.from_pretrained(run_dir.student)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)
    assert metrics["student"]["params"] == sum(p.numel() for p in student.parameters())
    history = json.loads(run_dir.pruning_history.read_text())
    assert [row["step"] for row in history][:3] == [0, 2, 4]
    assert history[-1]["remaining"] < 1 and history[0]["kl"] == 0.0  # the copy starts equal
    assert run_dir.pruning_plot.is_file()


def test_no_tracking_with_track_interval_zero(data, tmp_path):  # noqa: F811
    pruned_run(data, tmp_path, "pruning.track_interval=0")
    assert not RunDir(tmp_path).pruning_history.exists()
    header = next((tmp_path / "csv").glob("**/metrics.csv")).read_text().splitlines()[0]
    assert "prune/kl" not in header


# A global batch of 16 on one CPU device with batch 8 derives the same accumulation of 2.
@pytest.mark.parametrize(
    "accumulation", ["trainer.accumulate_grad_batches=2", "task.global_batch_size=16"]
)
def test_masks_update_once_per_optimizer_step_under_accumulation(
    data,  # noqa: F811
    tmp_path,
    monkeypatch,
    accumulation,
):
    # 32 chunks / batch 8 = 4 micro-batches an epoch, accumulated by 2: 2 optimizer steps an
    # epoch, 4 in all. Importance and mask updates follow the optimizer steps.
    calls = {"accumulate": 0, "update": []}
    accumulate, update = Pruner.accumulate, Pruner.update

    def counting_accumulate(self, *args):
        calls["accumulate"] += 1
        return accumulate(self, *args)

    def recording_update(self, step, total):
        calls["update"].append((step, total))
        return update(self, step, total)

    monkeypatch.setattr(Pruner, "accumulate", counting_accumulate)
    monkeypatch.setattr(Pruner, "update", recording_update)
    pruned_run(data, tmp_path, accumulation)
    assert OmegaConf.load(RunDir(tmp_path).config).trainer.accumulate_grad_batches == 2
    assert calls["accumulate"] == 4
    assert calls["update"] == [(1, 4), (2, 4), (3, 4), (4, 4)]


# (16-mixed falls back to bf16-mixed on CPU; its grad-scaler overflows are unit-tested.)
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_pruning_in_reduced_precision_reaches_the_exact_target(data, tmp_path, precision):  # noqa: F811
    pruned_run(data, tmp_path, f"trainer.precision={precision}")
    run_dir = RunDir(tmp_path)
    state = torch.load(run_dir.last_checkpoint, weights_only=True)["callbacks"]["PruningCallback"]
    assert state["masks"]["ffn"].dtype == torch.float32
    assert int(state["masks"]["hidden"].sum()) == 16
    c = AutoModelForMaskedLM.from_pretrained(run_dir.student).config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)


def test_importance_is_scored_on_the_clipped_gradients_after_the_step(data, tmp_path):  # noqa: F811
    # Two optimizer steps, both scored (pruning starts after step 1 and ends at step 2, after
    # its scoring), with a clipping threshold well below the gradients' norm.
    clip = 1e-3
    pruned_run(
        data,
        tmp_path,
        "trainer.max_steps=2",
        f"trainer.gradient_clip_val={clip}",
        "pruning.initial_warmup=0.5",
        "pruning.final_warmup=0",
        "+callbacks.record._target_=tests.helpers.RecordPlatonInputs",
    )
    record = RecordPlatonInputs.records[str(tmp_path)]
    assert len(record["grads"]) == len(record["weights"]) == 2
    beta1, beta2 = 0.85, 0.95  # pruning=homotopic's
    ema_i, ema_u = {}, {}
    for grads, weights in zip(record["grads"], record["weights"], strict=True):
        # Lightning's clipping (torch's clip_grad_norm_) over all the optimizer's gradients.
        norm = torch.cat([g.double().flatten() for g in grads.values()]).norm()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 0.1  # clipping is active
        for name in record["sensitivity"]:
            s = (weights[name].double() * grads[name].double() * factor).abs()
            ema_i[name] = beta1 * ema_i.get(name, 0) + (1 - beta1) * s
            ema_u[name] = beta2 * ema_u.get(name, 0) + (1 - beta2) * (s - ema_i[name]).abs()
    assert set(record["sensitivity"]) and set(ema_i) == set(record["sensitivity"])
    for name, expected in ema_i.items():
        for got, want in [
            (record["sensitivity"][name], expected),
            (record["uncertainty"][name], ema_u[name]),
        ]:
            tolerance = 1e-5 * float(want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=tolerance)
