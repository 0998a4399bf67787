"""A run that deploys instead of training (``deploy=onnx``): the last stage of a pipeline.

``python -m kdlab.train deploy=onnx deploy.model=<run>/student`` (or a pipeline stage
``[deploy=onnx, "deploy.model=${stage:student}/student"]``) runs :func:`kdlab.deploy.deploy`
on a model into the run directory's ``deploy/``, with the run's own ``task`` config for the
dev metrics (``deploy.eval``) and the vocabulary (``deploy.prune_vocab``), and writes a
``metrics.json`` as a training run does, so that a pipeline skips it once finished and its
tables show the deployed model: the run's "student" is the int8 ONNX model (the fp32 one
without ``deploy.int8``), its "teacher" the PyTorch reference, timed side by side.
"""

import json
from pathlib import Path
from typing import Annotated

from omegaconf import DictConfig

from kdlab.deploy.deployment import deploy
from kdlab.models.build import ModelSource
from kdlab.rundir import RunDir, deployed_figures, shown_latency
from kdlab.validation import NonNegativeInt, PositiveInt


class DeployStage:
    """The ``deploy`` config group's component: what :meth:`run` deploys and how.

    Args:
        model: the ``save_pretrained`` model to deploy (``${stage:student}/student``).
        reference: a model deployed and timed alongside (the teacher), or None; not
            evaluated (the stage that trained it was).
        int8: also write and evaluate the int8 model.
        per_channel: int8 scales per output channel.
        prune_vocab: keep only the tokens of the run's task (training and validation inputs).
        eval: the run's task's dev metrics for PyTorch and every ONNX file.
        latency: time the models (always with a reference).
        runs: timed calls per latency figure (the median is kept).
        warmup: untimed calls before them.
    """

    def __init__(
        self,
        model: Annotated[str, ModelSource(tokenizer=True)],
        reference: Annotated[str, ModelSource(tokenizer=True)] | None = None,
        int8: bool = True,
        per_channel: bool = True,
        prune_vocab: bool = False,
        eval: bool = True,
        latency: bool = True,
        runs: PositiveInt = 5,
        warmup: NonNegativeInt = 1,
    ) -> None:
        self.model, self.reference = model, reference
        self.int8, self.per_channel, self.prune_vocab = int8, per_channel, prune_vocab
        self.eval, self.latency, self.runs, self.warmup = eval, latency, runs, warmup

    def run(self, cfg: DictConfig, run_dir: RunDir) -> dict:
        """Deploys into ``run_dir/deploy``; returns the run's ``metrics.json`` but the wall
        time (:func:`stage_metrics`)."""
        record = deploy(
            self.model,
            run_dir.deploy,
            int8=self.int8,
            per_channel=self.per_channel,
            prune_vocab=cfg if self.prune_vocab else None,
            eval_overrides=cfg if self.eval else None,
            reference=self.reference,
            eval_reference=False,
            latency=self.latency,
            runs=self.runs,
            warmup=self.warmup,
        )
        return stage_metrics(cfg, record, run_dir)


def stage_metrics(cfg: DictConfig, record: dict, run_dir: RunDir) -> dict:
    """``metrics.json`` of a deploy run, shaped as a training run's so that the pipeline's and
    the report's tables read it: the student is the deployed ONNX file (int8 where written,
    :func:`kdlab.rundir.deployed_figures`), the teacher the reference's PyTorch model (with
    the figures of the run that exported it, where there is one),
    ``inference`` their latency at batch :data:`kdlab.rundir.SHOWN_BATCH` on every core,
    ``deployed`` the file, its size and latency.

    Args:
        cfg: the run's config (its task, its ``model.name`` naming the deployed model).
        record: what :func:`kdlab.deploy.deploy` returned (``deploy.json``).
        run_dir: the run directory.
    """
    deployed = deployed_figures(record)
    runtime = deployed["runtime"]
    metrics = {
        "task": cfg.task.name,
        "method": "deploy",
        "main_metric": cfg.task.main_metric,
        "best_checkpoint": None,
        "student": {
            "name": f"{cfg.model.name}, {runtime.replace('_', ' ')}",
            "path": str(run_dir.deploy / deployed["file"]),
            "params": record["model"]["parameters"],
            **deployed.pop("metrics"),
        },
        "teacher": None,
        "deployed": deployed,
    }
    reference = record.get("reference")
    if reference is None:
        return metrics
    # The reference is not evaluated again: where it is a run's export (a pipeline's teacher
    # stage), that run's figures are its own.
    trained = RunDir(Path(reference["source"]).parent)
    figures = json.loads(trained.metrics.read_text())["student"] if trained.finished else {}
    metrics["teacher"] = {
        "name": "pytorch",
        "path": reference["source"],
        # Its figures are the trained model's: so is its size, not the vocabulary-pruned
        # copy's that was timed beside the student (same speed: the embedding is a lookup).
        "params": figures.get("params", reference["parameters"]),
        **{key: value for key, value in figures.items() if "/" in key},
    }
    teacher_ms = shown_latency(record, "reference", "pytorch")
    if teacher_ms and deployed["ms"]:
        metrics["inference"] = {
            "teacher_ms_per_batch": teacher_ms,
            "student_ms_per_batch": deployed["ms"],
            "speedup": teacher_ms / deployed["ms"],
            "device": "cpu",
        }
    return metrics
