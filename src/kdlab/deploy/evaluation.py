"""A task's dev-set metrics for deployed models, computed by kdlab's own evaluation.

The task is composed from ``conf/`` as a run composes it (``task=sst2`` and any overrides), and
each model (PyTorch, or an ONNX file behind :class:`~kdlab.deploy.export.OnnxModel`) is
evaluated by :func:`kdlab.final_evaluation.evaluate` as a fine-tuning module, as
``kdlab.train`` evaluates a run's student for ``metrics.json``: the same batches, metrics and
keys (``val/accuracy``, ``val/loss``, ...). Evaluation runs on the CPU in fp32, so the PyTorch
figures equal ``metrics.json``'s for a run evaluated on the CPU; a GPU run's bf16 or TF32
figures may differ in the last digits.
"""

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from kdlab.components import build
from kdlab.data.base import TokenizedDataModule
from kdlab.errors import ConfigError
from kdlab.final_evaluation import evaluate, evaluation_trainer
from kdlab.methods.finetune import FineTune


def task_config(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (``task=sst2 task.data_dir=...``).

    Raises:
        ConfigError: for overrides Hydra cannot apply (an unknown task or key).
    """
    from kdlab.train import CONF_DIR  # registers kdlab's resolvers

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except HydraException as error:
        raise ConfigError(f"{' '.join(overrides)}: {error}") from None


def task_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> TokenizedDataModule:
    """The task's datamodule with ``tokenizer``, its data read and tokenised."""
    datamodule = build(cfg, "task", tokenizer=tokenizer, seed=cfg.seed)
    datamodule.setup("fit")
    return datamodule


def evaluate_models(
    models: dict[str, nn.Module], datamodule: TokenizedDataModule, cfg: DictConfig
) -> dict[str, dict[str, float]]:
    """Each model's metrics on the task's evaluation splits, keyed by model name.

    Args:
        models: models with the task's head (a ``transformers`` model or an ``OnnxModel``).
        datamodule: from :func:`task_datamodule`.
        cfg: the composed config (its ``trainer`` limits, its ``optim``).
    """
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"accelerator": "cpu", "precision": "32-true"})
    trainer = evaluation_trainer(trainer_cfg, torch.device("cpu"))
    optim = build(cfg, "optim")  # the module's signature wants one; evaluation never steps
    return {
        name: evaluate(
            trainer,
            FineTune(
                name=name,
                student=model,
                head=datamodule.head,
                split_metrics=datamodule.split_metrics(),
                optim=optim,
            ),
            datamodule,
        )
        for name, model in models.items()
    }
