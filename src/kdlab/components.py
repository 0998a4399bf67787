"""The components of a run: what a run builds, how each is built, and how the whole config
is checked first.

Every component is a config node with a ``_target_`` (a class or builder function) and is
built by ``hydra.utils.instantiate``. :data:`PLAN` lists them in build order, each with the
keyword arguments the run passes it itself (the objects only the run has: models,
tokenizer, split metrics); :func:`plan` is the part of it one config builds, which
:func:`validate` checks and :func:`kdlab.train.assemble` builds. Adding a method is one
module and one YAML file; adding a model builder is one function and one YAML file.

:func:`validate` checks the composed config before any model or data loads: missing
(``???``) values, then every component against its target's signature
(:func:`kdlab.validation.check_node`), then each target's ``check_config(cfg)`` rules across
keys (a classmethod, or a builder function's :func:`kdlab.validation.with_config_check`),
then the trainer's and the root's keys, the devices (every run, not only one with a global
batch) and the global batch (:mod:`kdlab.batching`).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kdlab.batching import accumulate_grad_batches, device_count
from kdlab.errors import ConfigError
from kdlab.validation import NonNegativeInt, check_node, check_value, closest, missing_keys


@dataclass(frozen=True)
class Step:
    """One component a run builds.

    Args:
        key: its config key (``task``; ``callbacks.lr_monitor`` in :func:`plan`).
        runtime: the keyword arguments the run passes it itself, besides its config (the
            config check leaves them out of the component's keys).
        when: whether a run config builds it (default: always).
        each: the key is a group of components, one per entry that is not null.
    """

    key: str
    runtime: tuple[str, ...] = ()
    when: Callable[[DictConfig], bool] = lambda cfg: True
    each: bool = False

    @property
    def group(self) -> str:
        """The config group of the component (``callbacks`` for ``callbacks.lr_monitor``)."""
        return self.key.split(".")[0]


# What a run builds, in build order: what fails cheaply (the data is read and checked) comes
# before the models, which the method and then the trainer take.
PLAN: tuple[Step, ...] = (
    Step("optim"),
    Step("task", ("tokenizer", "teacher_tokenizer", "seed")),
    Step(
        "teacher",
        ("head", "labels", "task", "needs_head", "hint"),
        when=lambda cfg: target_of(cfg, "method").traits.requires_teacher,
    ),
    Step("model", ("head", "labels")),
    Step("pruning", ("model",), when=lambda cfg: cfg.get("pruning") is not None),
    Step("method", ("student", "teacher", "head", "split_metrics", "optim")),
    Step("logger", when=lambda cfg: bool(cfg.get("logger"))),
    Step("callbacks", each=True),
    Step("trainer", ("logger", "callbacks", "default_root_dir")),
)
# What a run that deploys instead of training (``deploy=onnx``) builds: its task (the data its
# dev metrics and vocabulary come from), the optim its evaluation module takes, and the
# deploy component (kdlab.deploy.stage.DeployStage).
DEPLOY_PLAN: tuple[Step, ...] = (*PLAN[:2], Step("deploy"))


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


def plan(cfg: DictConfig) -> list[Step]:
    """The steps of :data:`PLAN` (:data:`DEPLOY_PLAN` for a config with a ``deploy``) this
    config builds, in build order; a group of components (``callbacks``) gives one step per
    entry that is not null."""
    steps = []
    for step in DEPLOY_PLAN if cfg.get("deploy") is not None else PLAN:
        if not step.when(cfg):
            continue
        if step.each:
            entries = cfg.get(step.key) or {}
            steps.extend(
                dataclasses.replace(step, key=f"{step.key}.{name}", each=False)
                for name, node in entries.items()
                if node is not None
            )
        else:
            steps.append(step)
    return steps


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
    steps = plan(cfg)
    groups = {step.group for step in steps}
    missing = [k for k in missing_keys(cfg) if k.split(".")[0] in groups]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (???): set "
            f"{'it' if len(missing) == 1 else 'them'} on the command line, e.g. "
            f"`{missing[0]}=<value>`."
        )
    for step in steps:
        target = target_of(cfg, step.key)
        check_node(
            OmegaConf.select(cfg, step.key),
            step.key,
            target,
            step.runtime,
            check_files=check_files,
        )
    # The method's rules first: a task it cannot do is the most basic mismatch.
    for step in sorted(steps, key=lambda s: s.key != "method"):
        check = getattr(target_of(cfg, step.key), "check_config", None)
        if check is not None:
            check(cfg)
    _check_trainer(cfg.trainer)
    device_count(cfg.trainer)  # Lightning would refuse these only after the models load
    accumulate_grad_batches(cfg)  # a global batch the devices do not divide fails here


def _check_root(cfg: DictConfig) -> None:
    schema = RootOptions.__annotations__
    groups = {step.key for step in (*PLAN, *DEPLOY_PLAN)}
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
