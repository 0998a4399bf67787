"""A loss that turns NaN stops the run and leaves the last good checkpoint."""

import pytest
import torch

import kdlab.train
from kdlab.errors import NonFiniteLossError


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(make_cfg, tmp_path, caplog):
    # 48 examples / batch 8 = 6 steps per epoch; the loss turns NaN at step 8 (epoch 2),
    # after epoch 1's checkpoints were written.
    cfg = make_cfg(
        method="finetune",
        extra=[
            "method._target_=tests.helpers.NaNAfter",
            "+method.nan_step=8",
            "trainer.max_epochs=3",
        ],
    )
    with pytest.raises(NonFiniteLossError, match="step 8"):
        kdlab.train.run(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 0
    assert f"the last good checkpoint is {last}" in caplog.text
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("student.")]
    assert weights and all(torch.isfinite(v).all() for v in weights if v.is_floating_point())
    for state in ckpt["optimizer_states"][0]["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def test_nan_in_monkeypatched_kd_loss_stops_before_the_optimizer_step(
    make_cfg, captured, monkeypatch, caplog
):
    from kdlab.methods import KnowledgeDistillation

    original = KnowledgeDistillation.compute_losses

    def nan_at_step_2(self, batch):
        losses = original(self, batch)
        if self.global_step == 2:
            losses["loss"] = losses["loss"] + float("inf")
        return losses

    monkeypatch.setattr(KnowledgeDistillation, "compute_losses", nan_at_step_2)
    with pytest.raises(NonFiniteLossError, match="inf"):
        kdlab.train.run(make_cfg(method="kd"))
    student = captured["module"].student
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert "no checkpoint yet" in caplog.text  # stopped in the first epoch
