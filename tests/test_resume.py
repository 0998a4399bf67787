"""`ckpt_path=last` resumes an interrupted run to the same result as an uninterrupted one,
whether it was killed between epochs or right after a mid-epoch checkpoint."""

import json
import logging
import random

import numpy as np
import pytest
import torch

import kdlab.train
from kdlab.rng import collect_rng_states, restore_rng_states
from tests.conftest import fast_overrides, run_cli
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


# A step-limited run restarted from an end-of-epoch checkpoint: Lightning's count of
# processed epochs, which it sets the sampler's epoch from, runs one ahead of current_epoch.
@pytest.mark.parametrize(
    "limit", [[], ["trainer.max_epochs=-1", "trainer.max_steps=12"]], ids=["epochs", "steps"]
)
def test_resume_from_last_matches_uninterrupted(make_cfg, tmp_path, limit):
    full, resumed, interrupted_at = _interrupt_then_resume(
        make_cfg, tmp_path, limit, BETWEEN_EPOCHS
    )
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


# Several processes for tens of seconds: in the slow suite, as the other cluster checks.
@pytest.mark.slow
def test_every_ddp_rank_resumes_its_own_dropout_masks(tmp_path, glue_root, teacher_dir):
    """2 gloo processes, 3 steps an epoch, killed after epoch 0, resumed: each rank draws the
    dropout masks of the uninterrupted run. (Rank 0's states restored on every rank made rank
    1 draw other masks.)"""

    def train(name: str, extra: list[str]):
        run_dir = tmp_path / name
        overrides = fast_overrides(tmp_path, glue_root, teacher_dir, run_dir=run_dir)
        return run_cli(
            [
                *overrides,
                f"hydra.run.dir={run_dir}",
                "trainer.max_epochs=2",
                "trainer.devices=2",
                "trainer.strategy=ddp",
                "trainer.precision=32-true",
                "eval.speed_batches=0",
                "+callbacks.dropout._target_=tests.helpers.RecordDropout",
                *extra,
            ]
        )

    full = train("full", [])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = train("cut", BETWEEN_EPOCHS)
    assert cut.returncode != 0 and "simulated interruption" in cut.stdout + cut.stderr
    resumed = train("cut", ["ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = {}
    for rank in (0, 1):
        before = torch.load(tmp_path / "full" / f"dropout_rank{rank}.pt", weights_only=True)
        after = torch.load(tmp_path / "cut" / f"dropout_rank{rank}.pt", weights_only=True)
        assert sorted(before) == list(range(6)) and sorted(after) == [3, 4, 5]
        for step in after:
            assert torch.equal(after[step]["mask"], before[step]["mask"]), (rank, step)
            assert torch.equal(after[step]["rng"], before[step]["rng"]), (rank, step)
        ranks[rank] = before
    # The ranks draw from generators of their own: restoring one rank's states on both
    # would have changed rank 1's masks.
    assert not torch.equal(ranks[0][3]["rng"], ranks[1][3]["rng"])


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), torch.rand(1).item()]


def test_a_rank_restores_its_own_states_and_one_without_keeps_its_own(caplog):
    torch.manual_seed(0)
    saved = []
    for _ in range(2):  # two ranks' generators, at different points
        saved.append(collect_rng_states())
        _draws()
    expected = []
    for rank in (0, 1):
        restore_rng_states(saved, rank)
        expected.append(_draws())
    assert expected[0] != expected[1]
    restore_rng_states(saved, 1)
    assert _draws() == expected[1]

    # Resumed on more processes than saved the checkpoint: rank 2 keeps its generators.
    state = collect_rng_states()
    untouched = _draws()
    restore_rng_states([state], 0)
    with caplog.at_level(logging.WARNING, logger="kdlab.rng"):
        restore_rng_states(saved, 2)
    assert _draws() == untouched
    assert "states of 2 rank(s), none for rank 2" in caplog.text
