"""Final evaluation of a trained run: best-checkpoint metrics, teacher metrics, speed."""

import itertools
import time
from collections.abc import Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from kdlab.methods.base import BaseMethod
from kdlab.methods.finetune import FineTune
from kdlab.models.heads import model_inputs, teacher_inputs


class TeacherEvaluation(FineTune):
    """The teacher evaluated on its own: as ``FineTune`` evaluates its student, reading the
    teacher's own tokenisation where the batches carry one
    (:func:`~kdlab.models.heads.teacher_inputs`)."""

    def forward_model(self, model, batch, **options):
        return super().forward_model(model, teacher_inputs(batch), **options)


def evaluation_trainer(trainer_cfg: DictConfig, device: torch.device) -> L.Trainer:
    """A trainer on one device without logger or checkpoints, for evaluating on full splits.

    A fast_dev_run keeps evaluation to one batch per split, as its training did.

    Args:
        trainer_cfg: the run's ``trainer`` config.
        device: where training ran (rank 0's device): ``cuda:1`` under
            ``trainer.devices=[1]``, not the first GPU, which may be another job's.
    """
    limit = 1 if trainer_cfg.get("fast_dev_run") else trainer_cfg.get("limit_val_batches")
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        # Lightning numbers GPUs by index in a list; a CPU has no index.
        devices=1 if device.index is None else [device.index],
        precision=trainer_cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=limit,
        limit_test_batches=limit,
    )


def evaluate(
    trainer: L.Trainer,
    module: BaseMethod,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Validation metrics (and test metrics where the datamodule's ``has_test`` says so).

    With ``ckpt_path`` the module is first restored from that checkpoint (and keeps those
    weights afterwards, ready for export).
    """
    results: dict[str, float] = {}
    for per_loader in trainer.validate(
        module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False
    ):
        results.update(per_loader)
    if datamodule.has_test:
        for per_loader in trainer.test(module, datamodule=datamodule, verbose=False):
            results.update(per_loader)
    return {k: float(v) for k, v in sorted(results.items())}


@torch.no_grad()
def time_inference(
    models: Mapping[str, nn.Module],
    loader: torch.utils.data.DataLoader,
    n_batches: int,
    views: Mapping[str, Callable[[dict], dict]] | None = None,
) -> dict[str, float]:
    """Mean forward time per batch of each model on the same batches, in milliseconds.

    Models take turns on every batch, so drift in machine load affects them alike; the
    first batch is a warm-up and is not timed.

    Args:
        models: the models by name.
        loader: the batches.
        n_batches: batches timed.
        views: for a model by name, the batch as it reads it (the teacher's:
            :func:`~kdlab.models.heads.teacher_inputs`); by default the student's inputs.
    """
    views = views or {}
    # Short evaluation sets are cycled so that every model is timed on n_batches batches.
    batches = list(itertools.islice(itertools.cycle(loader), n_batches + 1))
    totals = dict.fromkeys(models, 0.0)
    for i, batch in enumerate(batches):
        for name, model in models.items():
            device = next(model.parameters()).device
            view = views.get(name, lambda b: b)(batch)
            inputs = {k: v.to(device) for k, v in model_inputs(view, model).items()}
            was_training = model.training
            model.eval()
            _synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            _synchronize(device)
            if i > 0:
                totals[name] += time.perf_counter() - start
            model.train(was_training)
    return {f"{name}_ms_per_batch": 1000 * total / n_batches for name, total in totals.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
