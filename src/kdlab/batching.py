"""The global batch: ``task.global_batch_size`` examples per optimizer step, on any devices.

``task.batch_size`` is the batch of one device (one forward pass); with
``task.global_batch_size`` set, ``trainer.accumulate_grad_batches`` is derived so that
``batch_size × devices × trainer.num_nodes × accumulate_grad_batches`` equals it. A recipe
then states the paper's batch once and runs unchanged on one GPU or eight.
"""

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from kdlab.errors import ConfigError


def device_count(trainer: DictConfig) -> int:
    """The number of devices a ``lightning.Trainer`` built from ``trainer`` trains on.

    Resolved as the Trainer resolves ``accelerator`` and ``devices``: ``auto`` picks the
    available accelerator (CPU when there is none), and ``devices=auto`` then means all of
    its devices (one on CPU); ``-1``, a count, a list or a ``"0,1"`` string are parsed by
    that accelerator.

    Raises:
        ConfigError: for an accelerator or device setting Lightning would refuse.
    """
    accelerator, devices = trainer.accelerator, trainer.devices
    try:
        if accelerator == "auto":
            accelerator = _AcceleratorConnector._choose_auto_accelerator()
        elif accelerator == "gpu":
            accelerator = _AcceleratorConnector._choose_gpu_accelerator_backend()
        accelerator_cls = AcceleratorRegistry[accelerator]["accelerator"]
        if not accelerator_cls.is_available():
            raise MisconfigurationException(f"no {accelerator} device is available")
        if devices == "auto":
            devices = accelerator_cls.auto_device_count()
        parsed = accelerator_cls.parse_devices(devices)
        return len(accelerator_cls.get_parallel_devices(parsed))
    except (KeyError, TypeError, ValueError, MisconfigurationException) as err:
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} trainer.devices={trainer.devices}: "
            f"Lightning cannot use them here ({err})."
        ) from None


def accumulate_grad_batches(cfg: DictConfig) -> int:
    """``trainer.accumulate_grad_batches`` for this run: derived from
    ``task.global_batch_size`` where it is set, else the trainer's own value.

    Raises:
        ConfigError: for a global batch that the per-device batch × devices × nodes does not
            divide, or an ``accumulate_grad_batches`` set to something else beside it.
    """
    trainer, task = cfg.trainer, cfg.task
    configured = int(trainer.get("accumulate_grad_batches", 1))
    global_batch = task.get("global_batch_size")
    if global_batch is None:
        return configured
    devices = device_count(trainer)
    nodes = int(trainer.get("num_nodes", 1))
    per_step = int(task.batch_size) * devices * nodes
    product = (
        f"task.batch_size ({task.batch_size}) × devices ({devices}, from trainer.devices="
        f"{trainer.devices}) × trainer.num_nodes ({nodes}) = {per_step}"
    )
    if global_batch % per_step:
        raise ConfigError(
            f"task.global_batch_size={global_batch} is not a multiple of {product}: change "
            "task.global_batch_size or task.batch_size so that it is."
        )
    derived = global_batch // per_step
    if configured not in (1, derived):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={configured} contradicts task.global_batch_size="
            f"{global_batch}, which derives {derived} from {product}: unset one of them."
        )
    return derived
