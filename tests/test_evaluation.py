"""Where the final evaluation runs."""

import lightning as L
import lightning.fabric.accelerators.cuda
import lightning.pytorch.accelerators.cuda
import pytest
import torch
from omegaconf import OmegaConf

from kdlab.final_evaluation import evaluation_trainer

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture
def two_gpus(monkeypatch):
    """Lightning counts two CUDA devices; nothing runs on them, trainers are only built."""
    for module in (lightning.fabric.accelerators.cuda, lightning.pytorch.accelerators.cuda):
        monkeypatch.setattr(module, "num_cuda_devices", lambda: 2)


@pytest.mark.parametrize("accelerator", ["gpu", "auto"])
def test_evaluation_runs_on_the_training_gpu_not_the_first(two_gpus, accelerator):
    # trainer.devices=[1]: the second GPU of a shared node, whose first is another job's.
    cfg = OmegaConf.create({"accelerator": accelerator, "devices": [1], "precision": "32-true"})
    training = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, **QUIET)
    assert training.strategy.root_device == torch.device("cuda", 1)
    evaluation = evaluation_trainer(cfg, training.strategy.root_device)
    assert evaluation.strategy.root_device == torch.device("cuda", 1)
    assert evaluation.num_devices == 1


def test_evaluation_on_cpu():
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 2, "precision": "32-true"})
    evaluation = evaluation_trainer(cfg, torch.device("cpu"))
    assert evaluation.strategy.root_device == torch.device("cpu")
    assert evaluation.num_devices == 1
