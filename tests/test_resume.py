"""`ckpt_path=last` resumes an interrupted run to the same result as an uninterrupted one,
whether it was killed between epochs or right after a mid-epoch checkpoint."""

import json

import pytest
import torch

import kdlab.train
from tests.helpers import Interrupted, RecordFinalWeights

COMMON = [
    "trainer.max_epochs=2",
    "+callbacks.record._target_=tests.helpers.RecordFinalWeights",
]
# Killed between epoch 0 (checkpoint written) and epoch 1. Dropout is on in the student, so
# the RNG states kept in the checkpoint matter as well as the data order.
BETWEEN_EPOCHS = [
    "+callbacks.interrupt._target_=tests.helpers.StopAfterEpoch",
    "+callbacks.interrupt.epoch=0",
]
# 6 batches an epoch: validation, and so both checkpoints, after batches 3 and 6.
MID_EPOCH_VALIDATION = ["trainer.val_check_interval=0.5"]


def _stop_at_step(step: int) -> list[str]:
    return [
        "+callbacks.interrupt._target_=tests.helpers.StopAtStep",
        f"+callbacks.interrupt.step={step}",
    ]


def _comparable(metrics: dict) -> dict:
    return {
        role: {k: v for k, v in (metrics[role] or {}).items() if k.startswith("val")}
        for role in ("student", "teacher")
    }


def _global_step(checkpoint) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def _interrupt_then_resume(make_cfg, tmp_path, extra: list[str], interrupt: list[str]):
    """Metrics of an uninterrupted run and of the same run interrupted, then resumed with
    ``ckpt_path=last``; checks the interruption left an unfinished run behind."""
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = kdlab.train.run(make_cfg(method="kd", extra=[*COMMON, *extra], run_dir=full_dir))
    with pytest.raises(Interrupted):
        kdlab.train.run(make_cfg(method="kd", extra=[*COMMON, *extra, *interrupt], run_dir=cut_dir))
    assert not (cut_dir / "metrics.json").exists()
    assert str(cut_dir) not in RecordFinalWeights.weights
    interrupted_at = _global_step(cut_dir / "checkpoints" / "last.ckpt")
    resumed = kdlab.train.run(
        make_cfg(method="kd", extra=[*COMMON, *extra, "ckpt_path=last"], run_dir=cut_dir)
    )
    assert json.loads((cut_dir / "metrics.json").read_text()) == resumed
    assert _global_step(cut_dir / "checkpoints" / "last.ckpt") == 12
    return full, resumed, interrupted_at


def _assert_same_final_weights(tmp_path) -> None:
    a = RecordFinalWeights.weights[str(tmp_path / "full")]
    b = RecordFinalWeights.weights[str(tmp_path / "cut")]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_from_last_matches_uninterrupted(make_cfg, tmp_path):
    full, resumed, interrupted_at = _interrupt_then_resume(make_cfg, tmp_path, [], BETWEEN_EPOCHS)
    assert interrupted_at == 6
    assert _comparable(resumed) == _comparable(full)
    _assert_same_final_weights(tmp_path)


# Step 3: mid-epoch 0, the resumed run crosses an epoch boundary; step 9: mid-epoch 1.
# A step-limited run: Lightning restarts it differently (it always counts as restarting).
@pytest.mark.parametrize(
    "limit", [[], ["trainer.max_epochs=-1", "trainer.max_steps=12"]], ids=["epochs", "steps"]
)
@pytest.mark.parametrize("step", [3, 9])
def test_resume_mid_epoch_matches_uninterrupted(make_cfg, tmp_path, step, limit):
    full, resumed, interrupted_at = _interrupt_then_resume(
        make_cfg, tmp_path, [*MID_EPOCH_VALIDATION, *limit], _stop_at_step(step)
    )
    assert interrupted_at == step
    assert _comparable(resumed) == _comparable(full)
    _assert_same_final_weights(tmp_path)


def test_mid_epoch_checkpoint_holds_the_training_loader_position(make_cfg, tmp_path):
    with pytest.raises(Interrupted):
        kdlab.train.run(make_cfg(extra=[*MID_EPOCH_VALIDATION, *_stop_at_step(3)]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["_num_yielded"] == 3


def test_last_checkpoint_follows_every_epoch(make_cfg, tmp_path):
    # lr = 1e-30 (0 is refused): fp32 weights do not change, so epoch 2 cannot improve on
    # epoch 1's metric.
    kdlab.train.run(make_cfg(method="finetune", extra=["trainer.max_epochs=2", "optim.lr=1e-30"]))
    assert _global_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 12
    assert _global_step(tmp_path / "run" / "checkpoints" / "best.ckpt") == 6
