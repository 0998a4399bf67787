"""Data loading for the GPU presets: worker processes and pinned batches."""

from types import SimpleNamespace

import pytest
import torch

from kdlab.components import validate
from tests.conftest import build_datamodule, compose
from tests.fixtures import write_tokenizer


@pytest.mark.parametrize(("preset", "workers"), [("gpu", 4), ("ddp", 4), ("cpu", 0), ("debug", 0)])
def test_gpu_presets_load_batches_in_worker_processes(tmp_path, preset, workers):
    cfg = compose([f"trainer={preset}", "task=rte", f"run_dir={tmp_path}"])
    assert cfg.task.num_workers == workers
    # The preset's trainer keys stay under trainer (its default's too), nothing at the root.
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert "accelerator" not in cfg and "num_workers" not in cfg
    cfg = compose([f"trainer={preset}", "task.num_workers=1", f"run_dir={tmp_path}"])
    assert cfg.task.num_workers == 1


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False)])
def test_loaders_pin_batches_only_for_a_cuda_trainer(glue_root, tmp_path, device, pinned):
    cfg = compose(
        ["task=sst2", f"task.data_dir={glue_root / 'SST-2'}", "task.cache_dir=null"]
        + [f"run_dir={tmp_path}"]
    )
    validate(cfg)
    datamodule = build_datamodule(cfg, write_tokenizer(tmp_path / "tok"))
    datamodule.setup()
    assert not datamodule.train_dataloader().pin_memory  # no trainer attached
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device, 0)),
        distributed_sampler_kwargs=None,
        accumulate_grad_batches=1,
    )
    loaders = [datamodule.train_dataloader(), *datamodule.val_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [pinned] * len(loaders)
