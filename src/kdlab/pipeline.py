"""Multi-stage runs: each stage is a full training run in ``run_dir/<stage>`` (or a run that
deploys an earlier stage's model instead, ``deploy=onnx``: :mod:`kdlab.deploy.stage`).

A pipeline (the root ``pipeline`` key) maps stage names to override lists (which may nest
lists, e.g. YAML anchors of overrides shared by stages), e.g. fine-tune a teacher, then
distil it (``teacher.path=${stage:teacher}/student``). Values an experiment's stages share
live under the root ``vars`` and are referred to as ``${vars.NAME}``, so that a command line
can change them for every stage (``vars.steps=10``). The command line's overrides apply to
every stage, before the stage's own: a config group a stage chooses (``task=corpus/local``)
and a value that reads an earlier stage's output (``${stage:teacher}/student``) are the
stage's, and a command-line value of any other key that a stage sets to something else is
refused (it would not reach that stage; a recipe's budgets are its ``vars``). Every stage's
config is composed and checked before the first stage starts. A stage whose
``metrics.json`` exists is finished and skipped; one with ``checkpoints/last.ckpt`` resumes
from it; one that stopped before its first checkpoint (its directory holds its
``config.yaml`` and logs, nothing to resume from) starts again from scratch, its remains
removed. So re-running an interrupted pipeline continues at its first unfinished stage. A
finished stage is reused even where this invocation's overrides would train it otherwise: a
warning then lists the keys whose values differ from its ``config.yaml``. With
``overwrite=true`` on the command
line every stage starts afresh, finished or not.

The stages of one pipeline are one group of W&B runs (``run_group``: the pipeline's run
directory name, after the sweep's when the pipeline is a sweep job), each typed by its stage
name (``job_type``).

Where the cluster starts every rank (SLURM tasks), every rank runs the whole pipeline. Rank 0
alone evaluates and exports a stage after training, and the next stage reads what it wrote
(``${stage:NAME}/student``), so the other ranks wait for the stage's ``metrics.json``
before they go on, and stop if rank 0 records the stage's failure in its ``error.txt``
instead. They poll the files: the process group ends with each stage's training. Rank 0
alone writes ``summary.json``.
"""

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdlab.batching import accumulate_grad_batches
from kdlab.components import validate
from kdlab.errors import ConfigError
from kdlab.rundir import RunDir, record_error

log = logging.getLogger(__name__)

# How often a rank other than 0 looks for the files that end rank 0's work on a stage.
POLL_INTERVAL_S = 2.0


def run_pipeline(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> list[tuple[str, dict]]:
    """Run the stages of ``cfg.pipeline`` in order; returns ``(stage, metrics)`` pairs.

    The command line's own overrides apply to every stage, under the stage's overrides.

    Raises:
        ConfigError: before any stage starts, where the command line sets a key (not a
            config group) that a stage sets to another value (not a ``${stage:...}`` one).
    """
    stages = {
        name: list(_flatten(overrides))
        for name, overrides in OmegaConf.to_container(cfg.pipeline, resolve=False).items()
        if overrides is not None  # `pipeline.<stage>=null` leaves a stage out
    }
    root = Path(cfg.run_dir)
    dirs = {name: str(root / name) for name in stages}
    # Unresolved: a pipeline given on the command line holds ${stage:...} interpolations,
    # which only resolve inside a stage.
    user_overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    _refuse_shadowed(user_overrides, stages)
    group = "/".join(g for g in (cfg.run_group, root.name) if g)
    configs = {
        name: stage_config([*user_overrides, *overrides], dirs[name], dirs, group, name)
        for name, overrides in stages.items()
    }
    for stage_cfg in configs.values():
        # Inputs written by earlier stages do not exist yet: their paths are checked when
        # the stage starts.
        validate(stage_cfg, check_files=False)
    results, ran = [], []
    for name, stage_cfg in configs.items():
        run_dir = RunDir(dirs[name])
        if run_dir.finished and not stage_cfg.overwrite:
            _log_reuse(name, stage_cfg, run_dir)
            results.append((name, json.loads(run_dir.metrics.read_text())))
            continue
        _continue_or_restart(name, stage_cfg, run_dir)
        log.info("Stage '%s': %s", name, " ".join(stages[name]))
        results.append((name, run_stage(name, stage_cfg, run_dir, run)))
        ran.append(name)
    # Every rank runs the pipeline under SLURM: rank 0 alone writes the summary, from the
    # stages' metrics (a stand-in for the run that returns none leaves no summary).
    if rank_zero_only.rank == 0 and all(metrics for _, metrics in results):
        summary = pipeline_summary(results, ran)
        RunDir(root).pipeline_summary.write_text(json.dumps(summary, indent=2))
    return results


def run_stage(
    name: str, stage_cfg: DictConfig, run_dir: RunDir, run: Callable[[DictConfig], dict]
) -> dict:
    """``run(stage_cfg)``, stage ``name`` of a pipeline, in this process's rank.

    Rank 0 leaves the traceback in the stage's ``error.txt`` if the stage raises. The other
    ranks then wait until rank 0 has finished the stage (its ``metrics.json`` exists).

    Raises:
        RuntimeError: on a rank other than 0, if rank 0 recorded the stage's failure.
    """
    if rank_zero_only.rank != 0:
        metrics = run(stage_cfg)
        log.info("Stage '%s': waiting for rank 0 to write %s.", name, run_dir.metrics)
        while not run_dir.finished:
            if run_dir.error.is_file():
                raise RuntimeError(
                    f"Stage '{name}' failed on rank 0 (see {run_dir.error}); rank "
                    f"{rank_zero_only.rank} stops with it."
                )
            time.sleep(POLL_INTERVAL_S)
        return metrics
    run_dir.error.unlink(missing_ok=True)  # an earlier attempt's
    try:
        return run(stage_cfg)
    except BaseException as error:
        record_error(run_dir, "".join(traceback.format_exception(error)))
        raise


def pipeline_summary(results: list[tuple[str, dict]], ran: list[str]) -> list[dict]:
    """One row per stage: method, student, main metric on validation (and test),
    parameters, wall time, whether this invocation ran it or found it finished, and for a
    deploy stage (``kdlab.deploy.stage``) its ONNX file, size and latency (``deployed``)."""
    rows = []
    for name, metrics in results:
        main = metrics["main_metric"]
        student = metrics["student"]
        rows.append(
            {
                "stage": name,
                "method": metrics["method"],
                "model": student["name"],
                "main_metric": main,
                "val": student.get(f"val/{main}"),
                "test": student.get(f"test/{main}"),
                "params": student["params"],
                "wall_time_s": metrics.get("wall_time_s"),
                "ran": name in ran,
                "deployed": metrics.get("deployed"),
            }
        )
    return rows


def _flatten(overrides: list) -> Iterator[str]:
    # A stage may nest lists: YAML anchors then share groups of overrides between stages.
    for item in overrides:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


# Keys of a stage's config.yaml that differ between invocations without changing what the
# stage trains: its ids, where it and its sibling stages live, and how it was started.
_PLACEMENT_KEYS = ("run_id", "run_dir", "run_group", "stage_dirs", "ckpt_path", "overwrite")


def _log_reuse(name: str, stage_cfg: DictConfig, run_dir: RunDir) -> None:
    """Say that a finished stage is skipped, and warn when it was trained with other
    settings than this invocation's (:func:`changed_settings`): its results stay in use."""
    changes = []
    if run_dir.config.is_file():
        changes = changed_settings(OmegaConf.load(run_dir.config), stage_cfg)
    if not changes:
        log.info("Stage '%s' already finished (%s): skipping it.", name, run_dir.metrics)
        return
    log.warning(
        "Stage '%s' already finished (%s) with other settings than this run's, and its "
        "results are reused as they are: %s. To train it with this run's settings, delete "
        "%s or set overwrite=true (which retrains every stage).",
        name,
        run_dir.metrics,
        "; ".join(changes),
        run_dir.path,
    )


def changed_settings(saved: DictConfig, current: DictConfig) -> list[str]:
    """``key: old → new`` for each dotted key whose value differs between a finished
    stage's ``config.yaml`` (``saved``, resolved) and this invocation's config of the stage
    (``current``), sorted; keys that say where and how a run started
    (``_PLACEMENT_KEYS``) are left out.
    """
    old = _flat(OmegaConf.to_container(saved, resolve=True))
    new = _flat(OmegaConf.to_container(current, resolve=True))
    # config.yaml records the derived accumulation, not the configured one.
    new["trainer.accumulate_grad_batches"] = accumulate_grad_batches(current)
    unset = "<unset>"
    return [
        f"{key}: {old.get(key, unset)} → {new.get(key, unset)}"
        for key in sorted(old.keys() | new.keys())
        if key.split(".")[0] not in _PLACEMENT_KEYS and old.get(key, unset) != new.get(key, unset)
    ]


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b": value}`` for the leaves of nested dicts (lists are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _refuse_shadowed(user_overrides: list[str], stages: dict[str, list[str]]) -> None:
    """Refuse command-line values that a stage's own override of the same key would replace.

    Left to the stages, with the command line's value serving the others: their config-group
    choices (``experiment=pd task=rte``: the pretraining stage stays on its corpus) and the
    values that read an earlier stage's output (``teacher.path=${stage:teacher}/student``,
    the pipeline's wiring). Equal values are no conflict.
    """
    parser = OverridesParser.create()
    repository = GlobalHydra.instance().config_loader().repository
    user = {
        o.key_or_group: (o.value(), text)
        for o, text in zip(parser.parse_overrides(user_overrides), user_overrides, strict=True)
        if not repository.group_exists(o.key_or_group)
    }
    shadowed = []
    for name, overrides in stages.items():
        for override, text in zip(parser.parse_overrides(overrides), overrides, strict=True):
            if override.key_or_group not in user or "${stage:" in text:
                continue
            value, user_text = user[override.key_or_group]
            if value != override.value():
                shadowed.append(f"{user_text} (stage '{name}' sets {text})")
    if shadowed:
        raise ConfigError(
            "The command line sets keys that stages of this pipeline set themselves, after "
            f"it: {'; '.join(shadowed)}. Leave them out, change the recipe's vars.* where it "
            "has one for them, or give the stage's whole list (pipeline.<stage>=[...])."
        )


def _continue_or_restart(name: str, stage_cfg: DictConfig, run_dir: RunDir) -> None:
    """Set how an unfinished stage uses what an earlier attempt left in its directory."""
    if stage_cfg.overwrite or not run_dir.run_outputs:
        return
    if run_dir.last_checkpoint.is_file():
        log.info("Stage '%s' resumes from its last checkpoint.", name)
        stage_cfg.ckpt_path = "last"
    else:
        # Stopped before its first checkpoint: nothing to resume, nothing of value to keep.
        log.info("Stage '%s' left no checkpoint: it starts again from scratch.", name)
        stage_cfg.overwrite = True


def stage_config(
    overrides: list[str], run_dir: str, stage_dirs: dict[str, str], group: str, stage: str
) -> DictConfig:
    """The config of one stage: ``train.yaml`` with ``overrides``, in ``run_dir``, with
    ``${stage:NAME}`` resolving to ``stage_dirs[NAME]``, filed under ``group`` as ``stage``
    (``run_group``, ``job_type``)."""
    cfg = compose(
        config_name="train", overrides=[*overrides, "pipeline=null", f"run_dir='{run_dir}'"]
    )
    cfg.stage_dirs = stage_dirs
    cfg.run_group = group
    cfg.job_type = stage
    return cfg
