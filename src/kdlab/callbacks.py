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


class RestoreLoaderPosition(L.Callback):
    """Puts the training loader back where a mid-epoch checkpoint left it.

    Lightning saves the position of a stateful training loader in every checkpoint and
    loads it when it first sets up the training data after the restore. A method whose
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every kdlab
    method: the learning-rate schedule needs it) makes Lightning set that data up earlier,
    before the restore, and the saved position is then never loaded (Lightning issue
    #20550, open for 2.6). This callback loads it as training starts and rebuilds the
    iterator from it; where Lightning has loaded the position itself, nothing is pending
    and it does nothing. ``kdlab.train`` adds it to every run.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if not (fit_loop.restarting and fit_loop._combined_loader_states_to_load):
            return
        fit_loop._load_combined_loader_states()
        # The iterator built before the restore started at the epoch's first batch.
        iter(fit_loop._data_fetcher)
