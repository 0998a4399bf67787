"""task.global_batch_size derives trainer.accumulate_grad_batches from the per-device batch,
the devices (resolved as Lightning resolves them) and the nodes."""

import pytest
from omegaconf import OmegaConf

from kdlab.batching import accumulate_grad_batches, device_count
from kdlab.errors import ConfigError


def _cfg(global_batch, batch=8, accumulate=1, **trainer):
    return OmegaConf.create(
        {
            "task": {"batch_size": batch, "global_batch_size": global_batch},
            "trainer": {
                "accelerator": "cpu",
                "devices": 1,
                "accumulate_grad_batches": accumulate,
                **trainer,
            },
        }
    )


@pytest.mark.parametrize(
    ("accelerator", "devices", "count"),
    [("auto", "auto", 1), ("cpu", "auto", 1), ("cpu", 3, 3), ("cpu", "2", 2), ("auto", 1, 1)],
)
def test_device_count_on_cpu_follows_lightning(accelerator, devices, count):
    # No GPU in the test environment: `auto` is the CPU, and `devices=auto` one process.
    trainer = OmegaConf.create({"accelerator": accelerator, "devices": devices})
    assert device_count(trainer) == count


def test_an_accelerator_that_is_not_there_names_the_keys():
    with pytest.raises(ConfigError, match="trainer.accelerator=tpu trainer.devices=8"):
        device_count(OmegaConf.create({"accelerator": "tpu", "devices": 8}))


@pytest.mark.parametrize(
    ("cfg", "accumulation"),
    [
        (_cfg(None, accumulate=3), 3),  # no global batch: the trainer's own value
        (_cfg(64), 8),
        (_cfg(64, devices=2), 4),
        (_cfg(64, devices=2, num_nodes=2), 2),
        (_cfg(8), 1),
        (_cfg(64, accumulate=8), 8),  # set to the derived value as well: no conflict
    ],
)
def test_accumulation_from_the_global_batch(cfg, accumulation):
    assert accumulate_grad_batches(cfg) == accumulation


def test_a_global_batch_the_devices_do_not_divide_names_every_factor():
    with pytest.raises(ConfigError) as err:
        accumulate_grad_batches(_cfg(100, batch=8, devices=3))
    assert str(err.value).startswith(
        "task.global_batch_size=100 is not a multiple of task.batch_size (8) × devices (3, "
        "from trainer.devices=3) × trainer.num_nodes (1) = 24"
    )


def test_an_accumulation_set_beside_the_global_batch_must_agree():
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=2 contradicts"):
        accumulate_grad_batches(_cfg(64, accumulate=2))
