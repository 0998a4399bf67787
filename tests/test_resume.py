"""`ckpt_path=last` resumes an interrupted run to the same result as an uninterrupted one."""

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
INTERRUPT = [
    "+callbacks.interrupt._target_=tests.helpers.StopAfterEpoch",
    "+callbacks.interrupt.epoch=0",
]


def _comparable(metrics: dict) -> dict:
    return {
        role: {k: v for k, v in (metrics[role] or {}).items() if k.startswith("val")}
        for role in ("student", "teacher")
    }


def test_resume_from_last_matches_uninterrupted(make_cfg, tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = kdlab.train.run(make_cfg(method="kd", extra=COMMON, run_dir=full_dir))

    with pytest.raises(Interrupted):
        kdlab.train.run(make_cfg(method="kd", extra=[*COMMON, *INTERRUPT], run_dir=cut_dir))
    last = cut_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (cut_dir / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert str(cut_dir) not in RecordFinalWeights.weights

    resumed = kdlab.train.run(
        make_cfg(method="kd", extra=[*COMMON, "ckpt_path=last"], run_dir=cut_dir)
    )
    assert json.loads((cut_dir / "metrics.json").read_text()) == resumed
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 12
    assert _comparable(resumed) == _comparable(full)

    a = RecordFinalWeights.weights[str(full_dir)]
    b = RecordFinalWeights.weights[str(cut_dir)]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_last_checkpoint_follows_every_epoch(make_cfg, tmp_path):
    # lr = 1e-30 (0 is refused): fp32 weights do not change, so epoch 2 cannot improve on
    # epoch 1's metric.
    kdlab.train.run(make_cfg(method="finetune", extra=["trainer.max_epochs=2", "optim.lr=1e-30"]))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 6
