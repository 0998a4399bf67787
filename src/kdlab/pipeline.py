"""Multi-stage runs: each stage is a full training run in ``run_dir/<stage>``.

A pipeline (the root ``pipeline`` key) maps stage names to override lists, e.g. fine-tune a
teacher, then distil it (``teacher.path=${stage:teacher}/student``). Every stage's config is
composed and checked before the first stage starts. A stage whose ``metrics.json`` exists is
finished and skipped; one with ``checkpoints/last.ckpt`` resumes from it; one that stopped
before its first checkpoint (its directory holds its ``config.yaml`` and logs, nothing to
resume from) starts again from scratch, its remains removed. So re-running an interrupted
pipeline continues at its first unfinished stage. With ``overwrite=true`` on the command
line every stage starts afresh, finished or not.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdlab.components import validate
from kdlab.rundir import RunDir

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> list[tuple[str, dict]]:
    """Run the stages of ``cfg.pipeline`` in order; returns ``(stage, metrics)`` pairs.

    The command line's own overrides apply to every stage, under the stage's overrides.
    """
    stages: dict[str, list[str]] = OmegaConf.to_container(cfg.pipeline, resolve=False)
    root = Path(cfg.run_dir)
    dirs = {name: str(root / name) for name in stages}
    user_overrides = list(HydraConfig.get().overrides.task)
    configs = {
        name: stage_config([*user_overrides, *overrides], dirs[name], dirs)
        for name, overrides in stages.items()
    }
    for stage_cfg in configs.values():
        # Inputs written by earlier stages do not exist yet: their paths are checked when
        # the stage starts.
        validate(stage_cfg, check_files=False)
    results = []
    for name, stage_cfg in configs.items():
        files = RunDir(dirs[name])
        if files.finished and not stage_cfg.overwrite:
            log.info("Stage '%s' already finished (%s): skipping it.", name, files.metrics)
            results.append((name, json.loads(files.metrics.read_text())))
            continue
        _continue_or_restart(name, stage_cfg, files)
        log.info("Stage '%s': %s", name, " ".join(stages[name]))
        results.append((name, run(stage_cfg)))
    return results


def _continue_or_restart(name: str, stage_cfg: DictConfig, files: RunDir) -> None:
    """Set how an unfinished stage uses what an earlier attempt left in its directory."""
    if stage_cfg.overwrite or not files.run_outputs:
        return
    if files.last_checkpoint.is_file():
        log.info("Stage '%s' resumes from its last checkpoint.", name)
        stage_cfg.ckpt_path = "last"
    else:
        # Stopped before its first checkpoint: nothing to resume, nothing of value to keep.
        log.info("Stage '%s' left no checkpoint: it starts again from scratch.", name)
        stage_cfg.overwrite = True


def stage_config(overrides: list[str], run_dir: str, stage_dirs: dict[str, str]) -> DictConfig:
    """The config of one stage: ``train.yaml`` with ``overrides``, in ``run_dir``, with
    ``${stage:NAME}`` resolving to ``stage_dirs[NAME]``."""
    cfg = compose(
        config_name="train", overrides=[*overrides, "pipeline=null", f"run_dir='{run_dir}'"]
    )
    cfg.stage_dirs = stage_dirs
    return cfg
