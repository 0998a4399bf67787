"""``python -m kdlab.train``: compose → validate → build → fit → evaluate → export.

Examples::

    python -m kdlab.train method=kd model=bert3 task=sst2 teacher.path=<fine-tuned teacher>
    python -m kdlab.train -m method=finetune,kd task=sst2,rte seed=1,2,3
    python -m kdlab.train experiment=demo

Each run directory (:class:`kdlab.rundir.RunDir`) holds the composed ``config.yaml``,
``run_id.txt`` (the run's id, its W&B run id, kept when it resumes), ``checkpoints/``
(``last.ckpt`` and the best by the task's main metric, teacher weights excluded),
``metrics.json``, ``student/`` (``save_pretrained`` output that stock ``transformers``
loads), the logger's files (``wandb/``, one W&B run per training run, or ``csv/``) and the
student's per-example outputs where the task has them (SQuAD: ``predictions.json``, and
``null_odds.json`` for v2.0).
"""

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab import resolvers
from kdlab.batching import accumulate_grad_batches
from kdlab.callbacks import RestoreLoaderPosition
from kdlab.components import Step, build, plan, target_of, validate
from kdlab.data import TokenizedDataModule
from kdlab.errors import NonFiniteLossError
from kdlab.final_evaluation import (
    TeacherEvaluation,
    evaluate,
    evaluation_trainer,
    time_inference,
)
from kdlab.launch import every_rank_runs
from kdlab.loggers import logger_run
from kdlab.methods import BaseMethod
from kdlab.methods.traits import teacher_cache_for, teacher_tokenizer_for
from kdlab.models.build import TASK_ATTRIBUTE, count_parameters, load_tokenizer
from kdlab.models.heads import teacher_inputs
from kdlab.pipeline import run_pipeline
from kdlab.pruning import Pruner, compacted_copy
from kdlab.pruning.callback import PruningCallback
from kdlab.rundir import (
    JobRecord,
    RunDir,
    claim_run_dir,
    holds_anything,
    write_whole,
    written_whole,
)
from kdlab.summary import pipeline_table, summary_table, table_console
from kdlab.validation import source_key

log = logging.getLogger("kdlab")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

resolvers.register()
# The frozen teacher is in eval mode on purpose; the evaluation trainer restores weights
# only, so the checkpoint callbacks it warns about are not needed.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")
# torchdata's StatefulDataLoader still calls an API newer torch releases deprecate.
warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated")


@dataclass
class Assembly:
    """Everything a run builds from its config, ready to fit."""

    tokenizer: PreTrainedTokenizerBase
    datamodule: TokenizedDataModule
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    pruner: Pruner | None
    method: BaseMethod
    trainer: L.Trainer


def assemble(cfg: DictConfig) -> Assembly:
    """Build every component of a validated config, in the order of its plan
    (:func:`kdlab.components.plan`), each given the runtime arguments its step names.

    The tokenizers load first (a teacher tokenising differently is refused there where the
    method or head needs one tokenisation) and the data is read and checked as soon as it
    is built, before any model loads: what fails cheaply fails first.
    """
    method_cls = target_of(cfg, "method")
    tokenizer = load_tokenizer(cfg.model.tokenizer, source_key(cfg, "model.tokenizer"))
    built = _build(
        cfg,
        plan(cfg),
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer_for(cfg, method_cls, tokenizer),
        seed=cfg.seed,
        task=cfg.task.name,
        needs_head=method_cls.needs_teacher_head(cfg.method),
        hint=method_cls.traits.teacher_head_hint,
    )
    return Assembly(
        tokenizer=tokenizer,
        datamodule=built["task"],
        teacher=built.get("teacher"),
        student=built["model"],
        pruner=built.get("pruning"),
        method=built["method"],
        trainer=built["trainer"],
    )


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The run's ``lightning.Trainer`` alone (benchmarks pair it with models of their own):
    the plan's logger, callbacks and trainer steps, with ``extra_callbacks`` last."""
    steps = [step for step in plan(cfg) if step.group in ("logger", "callbacks", "trainer")]
    return _build(cfg, steps, extra_callbacks=list(extra_callbacks))["trainer"]


def _build(cfg: DictConfig, steps: list[Step], **given: Any) -> dict[str, Any]:
    """Build ``steps`` in order, each with the runtime arguments its step names.

    Args:
        cfg: the run's config.
        steps: steps of its plan.
        **given: the run's own objects by runtime-argument name. Each component built adds
            what later steps take from it (the datamodule its head, labels and split metrics;
            the student model is the method's ``student`` and the pruner's ``model``).

    Returns:
        The components by config key.
    """
    run_path = RunDir(cfg.run_dir).path
    given = {"teacher": None, "logger": False, "callbacks": [], "extra_callbacks": [], **given}
    given["default_root_dir"] = str(run_path)
    built: dict[str, Any] = {}
    for step in steps:
        if step.key == "trainer":
            # kdlab's own callbacks follow the configured ones: the mid-epoch resume fix,
            # then the pruning callback where there is one.
            given["callbacks"] += [RestoreLoaderPosition(), *given["extra_callbacks"]]
        component = build(cfg, step.key, **{name: given[name] for name in step.runtime})
        built[step.key] = component
        match step.group:
            case "task":
                component.setup("fit")  # data errors surface here, before any model loads
                given["head"], given["labels"] = component.head, component.labels
                given["split_metrics"] = component.split_metrics()
            case "model":
                given["student"] = given["model"] = component
            case "method":
                component.teacher_cache = teacher_cache_for(cfg, given["teacher"], built["task"])
                if "pruning" in built:
                    # Drawn after the models are built: a loader's iterator draws from the
                    # global RNG, which must not change their initial weights.
                    fixed_batch = next(iter(built["task"].val_dataloader(by_length=False)[0]))
                    callback = PruningCallback(built["pruning"], fixed_batch, run_path)
                    given["extra_callbacks"].append(callback)
            case "callbacks":
                given["callbacks"].append(component)
            case _:  # optim, teacher, pruning, logger, trainer
                given[step.group] = component
    return built


def run(cfg: DictConfig, on_claim: Callable[[], None] | None = None) -> dict:
    """Train one configuration (or deploy a model: ``deploy=onnx``, :mod:`kdlab.deploy.stage`)
    and write its run directory; returns ``metrics.json``'s dict.

    Args:
        cfg: the run's config.
        on_claim: called once the run has claimed its directory (:func:`claim_run_dir`),
            before anything loads.

    Raises:
        ConfigError: before anything loads, for a config that cannot run.
        DataFormatError: before any model loads, for a malformed data file.
    """
    start = time.perf_counter()
    validate(cfg)
    # Derived before config.yaml is written, so that it records what the trainer does.
    cfg.trainer.accumulate_grad_batches = accumulate_grad_batches(cfg)
    run_dir = RunDir(cfg.run_dir)
    ckpt_path = claim_run_dir(cfg, run_dir, rank_zero=rank_zero_only.rank == 0)
    if on_claim is not None:
        on_claim()
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("deploy") is not None:
        # Rank 0 alone deploys (the other ranks of a pipeline wait for its metrics.json).
        metrics = build(cfg, "deploy").run(cfg, run_dir) if rank_zero_only.rank == 0 else {}
    else:
        parts = assemble(cfg)
        # The logger's run (W&B) ends with this block, failed if it raises: a later run in
        # the same process (the next sweep job or pipeline stage) must not log into it.
        with logger_run(parts.trainer.logger):
            metrics = _fit_and_export(cfg, parts, run_dir, ckpt_path)
    if metrics:
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        text = json.dumps(metrics, indent=2)
        write_whole(run_dir.metrics, lambda partial: partial.write_text(text))
        log.info("Run finished in %.0f s: %s", metrics["wall_time_s"], run_dir.path)
    return metrics


def _fit_and_export(
    cfg: DictConfig, parts: Assembly, run_dir: RunDir, ckpt_path: str | None
) -> dict:
    """Log the config, fit, then (rank zero) evaluate, export and log the best metrics.

    Returns:
        ``metrics.json``'s content but the wall time; empty on ranks other than zero.
    """
    trainer = parts.trainer
    if trainer.logger is not None:
        params = {"student": count_parameters(parts.student)}
        if parts.teacher is not None:
            params["teacher"] = count_parameters(parts.teacher)
        trainer.logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "params": params}
        )
    try:
        with every_rank_runs(run_dir, trainer):
            trainer.fit(parts.method, datamodule=parts.datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError:
        last = run_dir.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint yet"
        log.error("Training stopped on a non-finite loss; %s (logs in %s).", kept, run_dir.path)
        raise
    finally:
        # Rank 0 evaluates alone from here on (a live group would make torchmetrics wait at
        # compute() for ranks that have returned), and the next run in this process (a sweep
        # job, a pipeline stage), also after a failed fit, must set up a group of its own:
        # Lightning skips the setup while one is alive.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {}
    metrics = evaluate_and_export(cfg, parts, run_dir)
    if trainer.logger is not None:
        # Logged last, these are the values W&B keeps in the run's summary.
        flat = {f"best/{k}": v for k, v in metrics["student"].items() if "/" in k}
        if metrics["teacher"]:
            flat.update({f"teacher/{k}": v for k, v in metrics["teacher"].items() if "/" in k})
        trainer.logger.log_metrics(flat, step=trainer.global_step)
    return metrics


def evaluate_and_export(cfg: DictConfig, parts: Assembly, run_dir: RunDir) -> dict:
    """Evaluate the trained student (and the teacher, and their speed) and export it.

    Returns:
        The content of ``metrics.json`` but the wall time.
    """
    datamodule, teacher, pruner = parts.datamodule, parts.teacher, parts.pruner
    # A pruned student is evaluated as training left it: its earlier (possibly "best")
    # checkpoints are wider than the target.
    best = None if pruner is not None else _best_checkpoint(parts.trainer)
    device = parts.trainer.strategy.root_device
    if pruner is not None:
        # Not a submodule of the method: the evaluation trainer moves the student only.
        pruner.to(device)
    eval_trainer = evaluation_trainer(cfg.trainer, device)
    student_metrics = evaluate(eval_trainer, parts.method, datamodule, ckpt_path=best)
    for name, content in parts.method.evaluation_files().items():
        text = json.dumps(content, indent=1)
        write_whole(run_dir.path / name, lambda partial, text=text: partial.write_text(text))
    # A pruned student is exported compacted (a smaller stock model); others as they are.
    exported = parts.student if pruner is None else compacted_copy(parts.student, pruner.masks)
    setattr(exported.config, TASK_ATTRIBUTE, cfg.task.name)
    with written_whole(run_dir.student) as partial:
        exported.save_pretrained(partial)
        parts.tokenizer.save_pretrained(partial)
    metrics = {
        "task": cfg.task.name,
        "method": cfg.method.name,
        "main_metric": cfg.task.main_metric,
        "best_checkpoint": best,
        "student": {
            "name": cfg.model.name,
            "path": str(run_dir.student),
            "params": count_parameters(exported),
            **student_metrics,
        },
        "teacher": None,
    }
    if teacher is None:
        return metrics
    # Teacher compute during training, in passes over the training set (0 with a reused
    # cache, 1 with one built, one per epoch without).
    metrics["teacher_passes"] = parts.method.teacher_passes
    cache = parts.method.teacher_cache
    metrics["teacher_cache"] = None if cache is None else cache.summary()
    teacher_module = TeacherEvaluation(
        name="teacher",
        student=teacher,
        head=datamodule.head,
        split_metrics=datamodule.split_metrics(),
        optim=parts.method.optim,
    )
    metrics["teacher"] = {
        "name": cfg.teacher.name,
        "path": str(cfg.teacher.path),
        "params": count_parameters(teacher),
        **evaluate(eval_trainer, teacher_module, datamodule),
    }
    if cfg.eval.speed_batches > 0:
        timing = time_inference(
            {"teacher": teacher, "student": exported},
            # In dataset order: the first batches of a sorted one are the longest.
            datamodule.val_dataloader(by_length=False)[0],
            cfg.eval.speed_batches,
            views={"teacher": teacher_inputs},
        )
        timing["speedup"] = timing["teacher_ms_per_batch"] / timing["student_ms_per_batch"]
        timing["device"] = str(next(exported.parameters()).device)
        metrics["inference"] = timing
    return metrics


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.best_model_path or callback.last_model_path or None


def objective(results: list[tuple[str, dict]]) -> float | None:
    """What a sweeper optimises: the student's ``val/<main_metric>`` of the last run (a
    pipeline's last stage); None in the processes of ranks other than 0, which evaluate
    nothing."""
    last = results[-1][1]
    if not last:
        return None
    value = last["student"].get(f"val/{last['main_metric']}")
    return None if value is None else float(value)


class JobFiles:
    """This Hydra job's record (``.hydra/``, :class:`kdlab.rundir.JobRecord`) and log
    (``train.log``), which ``conf/hydra/default.yaml`` keeps out of the job directory until
    the run has claimed it: a command refused before (a run it may not replace) leaves the
    directory as it was. What is logged before goes to the console.

    Args:
        cfg: the job's config, as Hydra passed it (the record is taken before the run
            changes it).
        hydra_cfg: Hydra's config of the job (``HydraConfig.get()``).
    """

    def __init__(self, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
        self.hydra_cfg = hydra_cfg
        self.record = JobRecord.of_job(cfg)
        self.job_dir = RunDir(hydra_cfg.runtime.output_dir)
        self.held = holds_anything(self.job_dir)  # a run, or the user's files
        self.written = False

    def write(self) -> None:
        """Rank 0 drops an earlier attempt's ``error.txt`` and writes the record; every rank
        opens its job log (SLURM's other ranks: ``train_ddp_process_<rank>.log``)."""
        if self.written:
            return
        self.written = True
        if rank_zero_only.rank == 0:
            self.job_dir.error.unlink(missing_ok=True)
            self.record.write(self.job_dir)
        attach_job_log(self.hydra_cfg)


def attach_job_log(hydra_cfg: DictConfig) -> None:
    """Adds Hydra's job log file (``hydra.job_logging.handlers.file``) to the root logger,
    unless it is open already (the DDP processes Lightning starts: their Hydra opens it)."""
    spec = OmegaConf.select(hydra_cfg, "job_logging.handlers.file")
    if spec is None:
        return
    path = Path(spec.filename).absolute()
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return
    handler = logging.FileHandler(path, mode=spec.get("mode", "a"), encoding="utf-8")
    formatter = hydra_cfg.job_logging.formatters[spec.formatter]
    handler.setFormatter(logging.Formatter(formatter.format, formatter.get("datefmt")))
    root.addHandler(handler)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns :func:`objective` (for sweepers) on rank 0, None on the
    ranks a cluster started beside it."""
    hydra_cfg = HydraConfig.get()
    job = JobFiles(cfg, hydra_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.run_group is None:
        # The jobs of a sweep are one group of W&B runs.
        cfg.run_group = Path(hydra_cfg.sweep.dir).name
    try:
        if cfg.get("pipeline"):
            job.write()  # its directory holds its stages, each claimed by its own run
            results = run_pipeline(cfg, run)
        else:
            results = [(cfg.method.name, run(cfg, on_claim=job.write))]
    except BaseException:
        if not job.held:  # a new job directory records the failed job
            # (unless it cannot be written: the error that says so is the one to see)
            with contextlib.suppress(OSError):
                job.write()
        raise
    if rank_zero_only.rank != 0:
        return None  # a rank started by the cluster (SLURM): rank 0 reports the run
    console = table_console()
    for name, metrics in results:
        if metrics:
            console.print(summary_table(name, metrics))
    summary = RunDir(cfg.run_dir).pipeline_summary
    if cfg.get("pipeline") and summary.is_file():
        console.print(pipeline_table(f"pipeline {cfg.run_dir}", json.loads(summary.read_text())))
    return objective(results)


if __name__ == "__main__":
    main()
