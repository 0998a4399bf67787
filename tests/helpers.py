"""Test-only callbacks and methods, referenced from configs by ``_target_``."""

import json
import os
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from transformers import default_data_collator

from kdlab.data import CorpusDataModule
from kdlab.losses import matching_loss
from kdlab.methods import BaseMethod, FineTune
from kdlab.pruning.callback import PruningCallback


class Interrupted(RuntimeError):
    """Raised by :class:`StopAfterEpoch` and :class:`StopAtStep` to simulate a killed run."""


class StopAfterEpoch(L.Callback):
    """Raise once epoch ``epoch`` (0-based) is over and its checkpoints are written.

    Lightning runs checkpoint callbacks last and end-of-epoch validation (where
    ``ModelCheckpoint`` saves) after ``on_train_epoch_end``, so the interruption happens at
    the start of the next epoch, before its first batch: a run killed between epochs.
    """

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch + 1:
            raise Interrupted(f"simulated interruption after epoch {self.epoch}")


class StopAtStep(L.Callback):
    """Raise before the first training batch after optimizer step ``step``.

    With validation at that step (``trainer.val_check_interval``), ``ModelCheckpoint`` has
    written its checkpoints by then: a run killed right after a mid-epoch checkpoint.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"simulated interruption after step {self.step}")


class NaNAfter(FineTune):
    """Fine-tuning whose loss becomes NaN from training step ``nan_step`` (0-based) on."""

    def __init__(self, *args, nan_step: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def compute_losses(self, batch):
        losses = super().compute_losses(batch)
        if self.global_step >= self.nan_step:
            losses["loss"] = losses["loss"] * torch.tensor(float("nan"))
        return losses


class RecordFinalWeights(L.Callback):
    """Keeps a copy of the student's weights when training ends, keyed by run directory.

    ``last.ckpt`` is no witness of the final weights: Lightning 2.6 rewrites it only in an
    epoch whose top-k checkpoint was saved too.
    """

    weights: dict = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        type(self).weights[trainer.default_root_dir] = {
            k: v.detach().clone() for k, v in pl_module.student.state_dict().items()
        }


class FailWhen(L.Callback):
    """Raise as soon as training is set up when ``value`` is ``fail_value``: one job of a
    multirun sweep fails fast while the others finish (``value=${seed}`` with ``seed=1,2,3``;
    ``value=${hydra:job.num}`` for one trial of a study)."""

    def __init__(self, value: int, fail_value: int, name: str = "seed") -> None:
        self.value = value
        self.fail_value = fail_value
        self.name = name

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.value == self.fail_value:
            raise RuntimeError(f"simulated failure of the {self.name}={self.value} job")


class RecordRank(L.Callback):
    """Writes ``rank<global rank>.json`` into the run directory as training starts: the
    process id, the world size and ``seed``, i.e. which processes trained which run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {"pid": os.getpid(), "world_size": trainer.world_size, "seed": self.seed}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


class MatchLogits(BaseMethod):
    """A method that exists only in the tests: the student matches the teacher's output
    distribution (``matching_loss``) and nothing else. It has no pruning code at all, so a
    run with ``pruning=homotopic`` shows that pruning is a component beside the method."""

    def compute_losses(self, batch):
        student = self.logits(self.forward_model(self.student, batch))
        teacher = self.logits(self.teacher_outputs(batch))
        return {"loss": matching_loss(student, teacher)}


class NoDropout(L.Callback):
    """Puts the student in eval mode before every training batch: without dropout a step
    depends on its batch and weights alone, so runs on different numbers of devices can be
    compared step by step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        pl_module.student.eval()


class RecordSteps(L.Callback):
    """Writes ``steps_rank<global rank>.pt`` into the run directory as training ends: the
    student's gradients as the optimizer receives them (complete: accumulated and, under
    DDP, all-reduced) at each of the first ``steps`` optimizer steps, and its final weights."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if len(self.grads) < self.steps:
            self.grads.append(
                {
                    name: p.grad.detach().clone()
                    for name, p in pl_module.student.named_parameters()
                    if p.grad is not None
                }
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}
        path = Path(trainer.default_root_dir) / f"steps_rank{trainer.global_rank}.pt"
        torch.save({"grads": self.grads, "weights": weights}, path)


class FixedMaskCorpus(CorpusDataModule):
    """A corpus task whose training chunks are masked once, as its validation chunks are:
    every epoch and every device count then trains on the same masked inputs."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        super().setup(stage)
        self.splits["train"] = self._mask_once(self.splits["train"])
        self.collator = default_data_collator


class RecordPlatonInputs(L.Callback):
    """Keeps, keyed by run directory, what PLATON's importance is computed from by hand: the
    student's gradients before clipping at each optimizer step (Lightning clips after
    ``on_before_optimizer_step``), its weights after each step, and the pruner's importance
    averages when training ends."""

    records: dict = {}

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = pl_module.student.named_parameters()
        self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if len(self.weights) < len(self.grads):  # an optimizer step, not a micro-batch
            named = pl_module.student.named_parameters()
            self.weights.append({n: p.detach().clone() for n, p in named})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        importance = pruning.pruner.importance
        type(self).records[trainer.default_root_dir] = {
            "grads": self.grads,
            "weights": self.weights,
            "sensitivity": {k: v.clone() for k, v in importance.sensitivity.items()},
            "uncertainty": {k: v.clone() for k, v in importance.uncertainty.items()},
        }


# The tensor collectives of torch.distributed that NCCLRules checks.
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
)


class NCCLRules(DDPStrategy):
    """DDP over gloo on CPU that refuses what NCCL refuses on GPUs, and counts the
    collectives of the training hot path (``trainer.strategy={_target_: ...}``).

    NCCL communicates CUDA tensors only ("No backend type associated with device type
    cpu"). Lightning calls the module's ``setup`` before it moves the module to its device,
    so a collective there is on a CPU tensor, which gloo accepts. Here any tensor collective
    (``torch.distributed.all_reduce``, ...) raises if it comes before ``model_to_device``, or
    is on a tensor on another device than the root device.

    It also counts, by name, the collectives and barriers issued while a micro-batch trains
    (``training_step``, ``backward``, and ``optimizer_step``, which runs the
    ``on_before_optimizer_step`` hooks), and writes them with the numbers of micro-batches
    and optimizer steps to ``collectives_rank<global rank>.json`` in the run directory when
    fitting ends.
    """

    def __init__(self, **ddp) -> None:
        super().__init__(**ddp)
        self.on_device = False
        self.hot_depth = 0
        self.hot = Counter()
        self.micro_batches = 0
        self.optimizer_steps = 0
        self.originals = {}
        self.directory: Path | None = None

    def setup_environment(self) -> None:
        super().setup_environment()
        for name in (*TENSOR_COLLECTIVES, "barrier"):
            self.originals[name] = getattr(torch.distributed, name)
            setattr(torch.distributed, name, self._checked(name, self.originals[name]))

    def _checked(self, name: str, collective):
        def call(*args, **kwargs):
            if self.hot_depth:
                self.hot[name] += 1
            if name != "barrier":
                if not self.on_device:
                    raise RuntimeError(
                        f"NCCL stand-in: torch.distributed.{name} before the module is on its "
                        "device: NCCL refuses the CPU tensors there"
                    )
                values = [*args, *kwargs.values()]
                for value in values:
                    for tensor in value if isinstance(value, list | tuple) else [value]:
                        if torch.is_tensor(tensor) and tensor.device != self.root_device:
                            raise RuntimeError(
                                f"NCCL stand-in: torch.distributed.{name} on a tensor on "
                                f"{tensor.device}, not on {self.root_device}"
                            )
            return collective(*args, **kwargs)

        return call

    def setup(self, trainer: L.Trainer) -> None:
        self.directory = Path(trainer.default_root_dir)
        super().setup(trainer)

    def model_to_device(self) -> None:
        super().model_to_device()
        self.on_device = True

    @contextmanager
    def _hot_path(self):
        self.hot_depth += 1
        try:
            yield
        finally:
            self.hot_depth -= 1

    def training_step(self, *args, **kwargs):
        self.micro_batches += 1
        with self._hot_path():
            return super().training_step(*args, **kwargs)

    def backward(self, *args, **kwargs):
        with self._hot_path():
            return super().backward(*args, **kwargs)

    def optimizer_step(self, *args, **kwargs):
        self.optimizer_steps += 1
        with self._hot_path():
            return super().optimizer_step(*args, **kwargs)

    def teardown(self) -> None:
        for name, collective in self.originals.items():
            setattr(torch.distributed, name, collective)
        if self.directory is not None:
            record = {
                "hot": dict(self.hot),
                "micro_batches": self.micro_batches,
                "optimizer_steps": self.optimizer_steps,
            }
            path = self.directory / f"collectives_rank{self.global_rank}.json"
            path.write_text(json.dumps(record))
        super().teardown()


class RecordDropout(L.Callback):
    """Writes ``dropout_rank<global rank>.pt`` into the run directory as training ends: per
    global step, the mask of the student's first dropout layer (``True`` where it zeroed) and
    torch's CPU generator state as the step's batch starts (what its random draws come from)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dropout = next(m for m in pl_module.student.modules() if isinstance(m, torch.nn.Dropout))

        def record(module, inputs, output) -> None:
            if module.training:
                self.steps[trainer.global_step]["mask"] = (output == 0) & (inputs[0] != 0)

        dropout.register_forward_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.steps[trainer.global_step] = {"rng": torch.get_rng_state()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"dropout_rank{trainer.global_rank}.pt"
        torch.save(self.steps, path)


class KillOnce(L.Callback):
    """Kill this process (SIGKILL: no exception, no Python clean-up) as soon as training is
    set up when ``value`` is ``kill_value`` and ``marker`` does not exist yet; the marker is
    written first, so that the re-run of the killed job trains."""

    def __init__(self, value: int, kill_value: int, marker: str) -> None:
        self.value = value
        self.kill_value = kill_value
        self.marker = Path(marker)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.value == self.kill_value and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
