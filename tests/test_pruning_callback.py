"""Pruning is a component beside the method: the callback prunes any method's student."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForMaskedLM

import kdlab.train
from kdlab.pruning import Pruner
from kdlab.pruning.callback import PruningCallback
from kdlab.rundir import RunDir
from tests.helpers import MatchLogits
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
    files = RunDir(tmp_path)
    state = torch.load(files.last_checkpoint, weights_only=True)["callbacks"]["PruningCallback"]
    masks = state["masks"]
    assert int(masks["hidden"].sum()) == 16
    assert (masks["heads"].sum(1) == 2).all() and (masks["ffn"].sum(1) == 32).all()
    student = AutoModelForMaskedLM.from_pretrained(files.student)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)
    assert metrics["student"]["params"] == sum(p.numel() for p in student.parameters())
    history = json.loads(files.pruning_history.read_text())
    assert [row["step"] for row in history][:3] == [0, 2, 4]
    assert history[-1]["remaining"] < 1 and history[0]["kl"] == 0.0  # the copy starts equal
    assert files.pruning_plot.is_file()


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
    accumulate, update = PruningCallback.on_before_optimizer_step, Pruner.update

    def counting_accumulate(self, *args):
        calls["accumulate"] += 1
        return accumulate(self, *args)

    def recording_update(self, step, total):
        calls["update"].append((step, total))
        return update(self, step, total)

    monkeypatch.setattr(PruningCallback, "on_before_optimizer_step", counting_accumulate)
    monkeypatch.setattr(Pruner, "update", recording_update)
    pruned_run(data, tmp_path, accumulation)
    assert OmegaConf.load(RunDir(tmp_path).config).trainer.accumulate_grad_batches == 2
    assert calls["accumulate"] == 4
    assert calls["update"] == [(1, 4), (2, 4), (3, 4), (4, 4)]


# (16-mixed falls back to bf16-mixed on CPU; its grad-scaler overflows are unit-tested.)
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_pruning_in_reduced_precision_reaches_the_exact_target(data, tmp_path, precision):  # noqa: F811
    pruned_run(data, tmp_path, f"trainer.precision={precision}")
    files = RunDir(tmp_path)
    state = torch.load(files.last_checkpoint, weights_only=True)["callbacks"]["PruningCallback"]
    assert state["masks"]["ffn"].dtype == torch.float32
    assert int(state["masks"]["hidden"].sum()) == 16
    c = AutoModelForMaskedLM.from_pretrained(files.student).config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)
