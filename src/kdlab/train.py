"""``python -m kdlab.train``: compose → build → fit → evaluate → export.

Examples::

    python -m kdlab.train method=kd model=bert3 task=sst2 teacher.path=<fine-tuned teacher>
    python -m kdlab.train -m method=finetune,kd task=sst2,rte seed=1,2,3
    python -m kdlab.train experiment=demo

Each run directory holds the composed ``config.yaml``, ``checkpoints/`` (``last.ckpt`` and
the best by the task's main metric, teacher weights excluded), ``metrics.json``,
``student/`` (``save_pretrained`` output that stock ``transformers`` loads) and the
student's per-example outputs where the task has them (SQuAD: ``predictions.json``, and
``null_odds.json`` for v2.0).
"""

import json
import logging
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from kdlab import resolvers
from kdlab.errors import ConfigError, NonFiniteLossError
from kdlab.evaluation import evaluate, evaluation_trainer, time_inference
from kdlab.methods import FineTune
from kdlab.methods.base import BaseMethod
from kdlab.models import build_student, build_teacher, count_parameters
from kdlab.pipeline import run_pipeline
from kdlab.report import summary_table
from kdlab.rundir import RunDir

log = logging.getLogger("kdlab")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

resolvers.register()
# The frozen teacher is in eval mode on purpose; the evaluation trainer restores weights
# only, so the checkpoint callbacks it warns about are not needed.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")

# Method-config keys that describe the method rather than parametrise its module.
_METHOD_META = ("_target_", "name")


def run(cfg: DictConfig) -> dict:
    """Train one configuration and write its run directory; returns ``metrics.json``'s dict."""
    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    files = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, files.config, resolve=True)
    L.seed_everything(cfg.seed, workers=True)

    method_cls = get_class(cfg.method._target_)
    # Fail before models and data are loaded when the method cannot handle the task.
    method_cls.check_head(cfg.task.head)
    teacher, teacher_tokenizer = (None, None)
    if method_cls.requires_teacher:
        teacher, teacher_tokenizer = build_teacher(
            cfg,
            cfg.task,
            require_trained_head=method_cls.needs_teacher_head(cfg.method),
            hint=method_cls.teacher_head_hint,
        )
    student, tokenizer = build_student(cfg, cfg.task, teacher_tokenizer)
    datamodule = get_class(cfg.task.datamodule)(
        cfg.task,
        tokenizer,
        batch_size=cfg.task.batch_size,
        eval_batch_size=cfg.task.eval_batch_size,
        num_workers=cfg.task.num_workers,
        seed=cfg.seed,
        cache_dir=cfg.task.cache_dir,
    )
    task_args = {"head": cfg.task.head, "optim": cfg.optim}
    module = _build_method(
        method_cls,
        cfg.method,
        student,
        teacher,
        {**task_args, "evaluators": datamodule.evaluators(), "pruning": cfg.get("pruning")},
    )
    params = {"student": count_parameters(student)}
    if teacher is not None:
        params["teacher"] = count_parameters(teacher)

    trainer = _build_trainer(cfg)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "params": params}
        )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except NonFiniteLossError:
        log.error(
            "Training stopped on a non-finite loss; checkpoints kept in %s", files.checkpoints
        )
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Rank 0 evaluates alone from here on; a live process group would make torchmetrics
        # wait at compute() for ranks that have already returned.
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {}

    # A pruned student is evaluated as training left it: its earlier (possibly "best")
    # checkpoints are wider than the target.
    best = None if module.pruner is not None else _best_checkpoint(trainer)
    evaluator = evaluation_trainer(cfg.trainer)
    student_metrics = evaluate(evaluator, module, datamodule, ckpt_path=best)
    for name, content in module.evaluation_files().items():
        (run_dir / name).write_text(json.dumps(content, indent=1))
    student_dir = files.student
    # A pruned student is exported compacted (a smaller stock model); others as they are.
    exported = module.export_model()
    exported.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    params["student"] = count_parameters(exported)
    metrics = {
        "task": cfg.task.name,
        "method": cfg.method.name,
        "main_metric": cfg.task.main_metric,
        "best_checkpoint": best,
        "student": {
            "name": cfg.model.name,
            "path": str(student_dir),
            "params": params["student"],
            **student_metrics,
        },
        "teacher": None,
    }
    if teacher is not None:
        teacher_module = FineTune(teacher, **task_args, evaluators=datamodule.evaluators())
        teacher_metrics = evaluate(evaluator, teacher_module, datamodule)
        metrics["teacher"] = {
            "name": cfg.teacher.name,
            "path": str(cfg.teacher.path),
            "params": params["teacher"],
            **teacher_metrics,
        }
        if cfg.eval.speed_batches > 0:
            timing = time_inference(
                {"teacher": teacher, "student": exported},
                datamodule.val_dataloader()[0],
                cfg.eval.speed_batches,
            )
            timing["speedup"] = timing["teacher_ms_per_batch"] / timing["student_ms_per_batch"]
            timing["device"] = str(next(exported.parameters()).device)
            metrics["inference"] = timing
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    files.metrics.write_text(json.dumps(metrics, indent=2))
    if trainer.logger is not None:
        flat = {f"best/{k}": v for k, v in student_metrics.items()}
        if metrics["teacher"]:
            flat.update({f"teacher/{k}": v for k, v in teacher_metrics.items()})
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        trainer.logger.finalize("success")
    log.info("Run finished in %.0f s: %s", metrics["wall_time_s"], run_dir)
    return metrics


def _build_method(
    method_cls, method_cfg: DictConfig, student, teacher, task_args: dict
) -> BaseMethod:
    kwargs = {k: v for k, v in method_cfg.items() if k not in _METHOD_META}
    try:
        return method_cls(student, teacher, **task_args, **kwargs)
    except TypeError as err:
        raise ConfigError(f"method={method_cfg.name}: {err}. Check the method.* keys.") from err


def _build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    return L.Trainer(
        **cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=cfg.run_dir
    )


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return callback.best_model_path or callback.last_model_path or None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the main validation metric (for sweepers)."""
    if cfg.get("pipeline"):
        results = run_pipeline(cfg, run)
    else:
        results = [(cfg.method.name, run(cfg))]
    console = Console()
    for name, metrics in results:
        if metrics:
            console.print(summary_table(name, metrics))
    last = results[-1][1]
    return last.get("student", {}).get(f"val/{last.get('main_metric')}") if last else None


if __name__ == "__main__":
    main()
