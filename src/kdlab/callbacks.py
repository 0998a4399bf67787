"""Lightning callbacks of kdlab's own."""

import time

import lightning as L


class StepTimer(L.Callback):
    """Logs the wall time of each training step (forward, backward, optimizer) as
    ``train/step_time_s``, to compare the cost of methods on the same batches.

    Add it from the command line: ``+callbacks.step_timer._target_=kdlab.callbacks.StepTimer``.
    """

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        pl_module.log("train/step_time_s", elapsed, on_step=True, on_epoch=False, batch_size=1)
