"""The teacher stays frozen through real training steps and stays out of checkpoints."""

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification

import kdlab.train


class ModeProbe(L.Callback):
    """Records teacher/student modes at every training batch and the optimizer's params."""

    seen: list = []
    optimizer_params: set = set()

    def on_train_start(self, trainer, pl_module):
        type(self).optimizer_params = {
            id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        type(self).seen.append((pl_module.teacher.training, pl_module.student.training))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        type(self).seen.append((pl_module.teacher.training, pl_module.student.training))


def test_teacher_frozen_student_trained(make_cfg, captured, teacher_dir, tmp_path):
    ModeProbe.seen = []
    cfg = make_cfg(
        method="kd",
        extra=[
            "trainer.max_epochs=2",
            "+callbacks.probe._target_=tests.test_teacher_frozen.ModeProbe",
        ],
    )
    kdlab.train.run(cfg)
    module = captured["module"]

    # bit-identical to the teacher on disk, no gradients, not optimised
    reference = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    ref_state = reference.state_dict()
    for name, param in module.teacher.state_dict().items():
        assert torch.equal(param, ref_state[name]), name
    for param in module.teacher.parameters():
        assert param.grad is None and not param.requires_grad
    assert not {id(p) for p in module.teacher.parameters()} & ModeProbe.optimizer_params
    assert {id(p) for p in module.student.parameters()} <= ModeProbe.optimizer_params

    # 48 examples / batch 8 = 6 steps per epoch, 2 epochs, checked before and after each
    assert len(ModeProbe.seen) == 2 * 12
    assert all(mode == (False, True) for mode in ModeProbe.seen), ModeProbe.seen

    changed = [
        k
        for k, v in module.student.state_dict().items()
        if not torch.equal(v, captured["initial_student"][k])
    ]
    assert len(changed) > len(captured["initial_student"]) // 2

    # checkpoints carry no teacher weights, and still load into a module with a teacher
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(
            tmp_path / "run" / "checkpoints" / name, map_location="cpu", weights_only=True
        )
        assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
        assert any(k.startswith("student.") for k in ckpt["state_dict"])
        assert len(ckpt["kdlab_rng_states_by_rank"]) == 1  # one process: one rank's states
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    module.on_load_checkpoint(last)
    module.load_state_dict(last["state_dict"], strict=True)
    for name, param in module.teacher.state_dict().items():
        assert torch.equal(param, ref_state[name]), name
    for key, value in last["state_dict"].items():
        if key.startswith("student."):
            assert torch.equal(module.state_dict()[key], value)
