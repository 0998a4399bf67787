"""A run that deploys instead of training (``deploy=onnx``): the last stage of a pipeline.

``python -m kdlab.train deploy=onnx deploy.model=<run>/student`` (or a pipeline stage
``[deploy=onnx, "deploy.model=${stage:student}/student"]``) runs :func:`kdlab.deploy.deploy`
on a model into the run directory's ``deploy/``, with the run's own ``task`` config for the
dev metrics (``deploy.eval``) and the vocabulary (``deploy.prune_vocab``), and writes a
``metrics.json`` as a training run does, so that a pipeline skips it once finished and its
tables show the deployed model: the run's "student" is the int8 ONNX model (the fp32 one
without ``deploy.int8``), its "teacher" the PyTorch reference, timed side by side.
"""

from typing import Annotated

from omegaconf import DictConfig

from kdlab.deploy.deployment import deploy
from kdlab.models.build import ModelSource
from kdlab.rundir import RunDir
from kdlab.validation import NonNegativeInt, PositiveInt

# The latency figure a stage's tables show: a batch of this size on every core.
SHOWN_BATCH, SHOWN_THREADS = 32, "all"


class DeployStage:
    """The ``deploy`` config group's component: what :meth:`run` deploys and how.

    Args:
        model: the ``save_pretrained`` model to deploy (``${stage:student}/student``).
        reference: a model deployed and timed alongside (the teacher), or None.
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
        per_channel: bool = False,
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
            latency=self.latency,
            runs=self.runs,
            warmup=self.warmup,
        )
        return stage_metrics(cfg, record, run_dir)


def stage_metrics(cfg: DictConfig, record: dict, run_dir: RunDir) -> dict:
    """``metrics.json`` of a deploy run, shaped as a training run's so that the pipeline's and
    the report's tables read it: the student is the deployed ONNX file (int8 where written),
    the teacher the reference's PyTorch model, ``inference`` their latency at batch
    :data:`SHOWN_BATCH` on every core, ``deployed`` the file, its size and latency.

    Args:
        cfg: the run's config (its task, its ``model.name`` naming the deployed model).
        record: what :func:`kdlab.deploy.deploy` returned (``deploy.json``).
        run_dir: the run directory.
    """
    model = record["model"]
    runtime = "onnx_int8" if "onnx_int8" in model["files"] else "onnx_fp32"
    latency = {
        (row["model"], row["runtime"]): row["ms"]
        for row in (record.get("latency") or {}).get("rows", [])
        if row["batch"] == SHOWN_BATCH and row["threads"] == SHOWN_THREADS
    }
    path = run_dir.deploy / model["files"][runtime]
    metrics = {
        "task": cfg.task.name,
        "method": "deploy",
        "main_metric": cfg.task.main_metric,
        "best_checkpoint": None,
        "student": {
            "name": f"{cfg.model.name} ({runtime.replace('_', ' ')})",
            "path": str(path),
            "params": model["parameters"],
            **((model["eval"] or {}).get(runtime) or {}),
        },
        "teacher": None,
        "deployed": {
            "runtime": runtime,
            "bytes": model["bytes"][runtime],
            "ms": latency.get(("model", runtime)),
            "batch": SHOWN_BATCH,
            "threads": SHOWN_THREADS,
        },
    }
    reference = record.get("reference")
    if reference is not None:
        metrics["teacher"] = {
            "name": "reference (pytorch)",
            "path": reference["source"],
            "params": reference["parameters"],
            **((reference["eval"] or {}).get("pytorch") or {}),
        }
        teacher_ms, student_ms = latency.get(("reference", "pytorch")), metrics["deployed"]["ms"]
        if teacher_ms and student_ms:
            metrics["inference"] = {
                "teacher_ms_per_batch": teacher_ms,
                "student_ms_per_batch": student_ms,
                "speedup": teacher_ms / student_ms,
                "device": "cpu",
            }
    return metrics
