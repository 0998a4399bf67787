"""Multi-stage runs: each stage is a full training run in ``run_dir/<stage>``.

A pipeline (the root ``pipeline`` key) maps stage names to override lists, e.g. fine-tune a
teacher, then distil it (``teacher.path=${stage:teacher}/student``). A stage whose
``metrics.json`` exists is finished and skipped; one with ``checkpoints/last.ckpt`` resumes
from it. So re-running an interrupted pipeline continues at its first unfinished stage.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdlab.resolvers import STAGE_DIRS
from kdlab.rundir import RunDir

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> list[tuple[str, dict]]:
    """Run the stages of ``cfg.pipeline`` in order; returns ``(stage, metrics)`` pairs.

    The command line's own overrides apply to every stage, under the stage's overrides.
    """
    stages: dict[str, list[str]] = OmegaConf.to_container(cfg.pipeline, resolve=False)
    root = Path(cfg.run_dir)
    STAGE_DIRS.clear()
    STAGE_DIRS.update({name: root / name for name in stages})
    user_overrides = list(HydraConfig.get().overrides.task)
    results = []
    for name, overrides in stages.items():
        stage_dir = STAGE_DIRS[name]
        files = RunDir(stage_dir)
        if files.finished:
            log.info("Stage '%s' already finished (%s): skipping it.", name, files.metrics)
            results.append((name, json.loads(files.metrics.read_text())))
            continue
        extra = ["pipeline=null", f"run_dir='{stage_dir}'"]
        if files.last_checkpoint.is_file():
            log.info("Stage '%s' resumes from its last checkpoint.", name)
            extra.append("ckpt_path=last")
        log.info("Stage '%s': %s", name, " ".join(overrides))
        stage_cfg = compose(config_name="train", overrides=[*user_overrides, *overrides, *extra])
        results.append((name, run(stage_cfg)))
    return results
