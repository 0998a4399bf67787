"""The components of a run: how each is built, and how the whole config is checked first.

Every component is a config node with a ``_target_`` (a class or builder function) and is
built by ``hydra.utils.instantiate``; the run passes the objects only it has (models,
tokenizer, evaluators) as keyword arguments, listed in :data:`RUNTIME`. Adding a method is
one module and one YAML file; adding a model builder is one function and one YAML file.

:func:`validate` checks the composed config before any model or data loads: missing
(``???``) values, then every component against its target's signature
(:func:`kdlab.validation.check_node`), then each target's ``check_config(cfg)`` rules across
keys (a classmethod, or a builder function's :func:`kdlab.validation.with_config_check`),
then the trainer's and the root's keys, and the global batch (:mod:`kdlab.batching`).
"""

from collections.abc import Callable, Iterator
from typing import Any, TypedDict

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kdlab.batching import accumulate_grad_batches
from kdlab.errors import ConfigError
from kdlab.validation import NonNegativeInt, check_node, check_value, closest, missing_keys

# Config key -> keyword arguments the run passes itself when it builds that component.
RUNTIME: dict[str, tuple[str, ...]] = {
    "optim": (),
    "task": ("tokenizer", "seed"),
    "teacher": ("head", "labels", "task", "needs_head", "hint"),
    "model": ("head", "labels"),
    "pruning": ("model",),
    "method": ("student", "teacher", "head", "evaluators", "optim"),
    "logger": (),
    "trainer": ("logger", "callbacks", "default_root_dir"),
}


class EvalOptions(TypedDict):
    """``eval``: the end-of-run evaluation."""

    speed_batches: NonNegativeInt  # batches timed to compare teacher and student inference


class RootOptions(TypedDict):
    """The root keys of ``conf/train.yaml`` besides the component groups."""

    seed: int
    run_dir: str
    run_id: str | None
    run_group: str | None
    job_type: str
    ckpt_path: str | None
    overwrite: bool  # replace the run already in run_dir (kdlab.rundir.claim_run_dir)
    eval: EvalOptions
    pipeline: dict[str, list[str | list[str]]] | None
    stage_dirs: dict[str, str]
    vars: dict[str, Any]  # an experiment's own values, referred to as ${vars.NAME}


def build(cfg: DictConfig, key: str, **runtime: Any) -> Any:
    """The component at ``key`` (``method``, ``callbacks.lr_monitor``, ...), instantiated
    from its ``_target_`` with the run's own objects as keyword arguments."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **runtime)
    except InstantiationException as err:
        # Errors raised by the target itself (ConfigError, DataFormatError) pass through.
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def target_of(cfg: DictConfig, key: str) -> Callable:
    """The class or function ``<key>._target_`` names."""
    node = OmegaConf.select(cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} has no _target_: it is not a buildable component.")
    try:
        return get_object(node._target_)
    except Exception as err:  # hydra raises several types for a path it cannot import
        raise ConfigError(f"{key}._target_={node._target_} cannot be imported: {err}") from None


def used_components(cfg: DictConfig) -> list[str]:
    """The component keys this configuration builds, in build order."""
    method = target_of(cfg, "method")
    keys = ["optim", "task"]
    if method.traits.requires_teacher:
        keys.append("teacher")
    keys.append("model")
    if cfg.get("pruning") is not None:
        keys.append("pruning")
    keys.append("method")
    if cfg.get("logger"):
        keys.append("logger")
    keys.extend(f"callbacks.{name}" for name in _callbacks(cfg))
    keys.append("trainer")
    return keys


def _callbacks(cfg: DictConfig) -> Iterator[str]:
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            yield name


def validate(cfg: DictConfig, *, check_files: bool = True) -> None:
    """Check the composed run config before anything is built.

    Args:
        cfg: the composed root config.
        check_files: also check that local model paths exist (off when checking a later
            pipeline stage whose inputs an earlier stage has yet to write).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    try:
        _validate(cfg, check_files)
    except InterpolationResolutionError as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        raise ConfigError(f"{err.full_key} cannot be resolved: {cause}") from None


def _validate(cfg: DictConfig, check_files: bool) -> None:
    _check_root(cfg)
    keys = used_components(cfg)
    groups = {k.split(".")[0] for k in keys}
    missing = [k for k in missing_keys(cfg) if k.split(".")[0] in groups]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (???): set "
            f"{'it' if len(missing) == 1 else 'them'} on the command line, e.g. "
            f"`{missing[0]}=<value>`."
        )
    for key in keys:
        target = target_of(cfg, key)
        check_node(
            OmegaConf.select(cfg, key),
            key,
            target,
            RUNTIME.get(key.split(".")[0], ()),
            check_files=check_files,
        )
    # The method's rules first: a task it cannot do is the most basic mismatch.
    for key in sorted(keys, key=lambda k: k != "method"):
        check = getattr(target_of(cfg, key), "check_config", None)
        if check is not None:
            check(cfg)
    _check_trainer(cfg.trainer)
    accumulate_grad_batches(cfg)  # a global batch the devices do not divide fails here


def _check_root(cfg: DictConfig) -> None:
    schema = RootOptions.__annotations__
    groups = set(RUNTIME) | {"callbacks"}
    raw = OmegaConf.to_container(cfg, resolve=False)
    for name in cfg:
        if name in groups:
            continue
        if name not in schema:
            match = closest(str(name), [*schema, *groups])
            raise ConfigError(
                f"{name} is not a setting of kdlab.train"
                + (f": did you mean `{match}`?" if match else ".")
            )
        problem = check_value(raw[name], schema[name])
        if problem:
            raise ConfigError(f"{name}={cfg[name]} {problem}.")


def _check_trainer(trainer: DictConfig) -> None:
    """Settings under which Lightning would train nothing and export an untrained student."""
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise ConfigError(
                f"trainer.{key}=0 trains nothing (the run would export an untrained student): "
                f"set trainer.{key} to a positive value"
                + (" (-1: no step limit)." if key == "max_steps" else ".")
            )
