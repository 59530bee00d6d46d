"""Keras callbacks of the two-stage schedule, tclf.training.schedule (imported only to train)."""

from __future__ import annotations

import threading
import time

import keras
import numpy as np

from tclf import faults, storage


class EarlyStoppingAfter(keras.callbacks.EarlyStopping):
    """EarlyStopping that never stops before ``min_epochs`` epochs have run, and that a
    resumed stage can start from a saved state (:meth:`resume_from`)."""

    def __init__(self, min_epochs: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.min_epochs = min_epochs
        self._resume = None

    def resume_from(self, state: dict, best_weights=None) -> None:
        """Continue from ``state`` (wait, best, best_epoch, stopped_epoch, as
        tclf.training.checkpoints saves them) instead of starting afresh at the next fit."""
        self._resume = (state, best_weights)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # Resets the state for a new fit...
        if self._resume:  # ...unless this fit continues an interrupted one.
            state, self.best_weights = self._resume
            self.wait, self.best = state["wait"], state["best"]
            self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
            self._resume = None

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and epoch + 1 < self.min_epochs:
            self.model.stop_training = False
            self.stopped_epoch = 0


class ProgressFile(keras.callbacks.Callback):
    """One line per epoch in training_progress.txt, rewritten as training runs.

    ``lines`` is shared by the stages' callbacks, so that the file holds both stages.
    """

    def __init__(self, path: str, stage: str, lines: list):
        super().__init__()
        self.path, self.stage, self.lines = path, stage, lines

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        learning_rate = float(np.asarray(self.model.optimizer.learning_rate))
        self.lines.append(
            f"{self.stage} epoch {epoch + 1:3d}  "
            f"accuracy {logs.get('accuracy', float('nan')):.4f}  "
            f"loss {logs.get('loss', float('nan')):.4f}  "
            f"val_accuracy {logs.get('val_accuracy', float('nan')):.4f}  "
            f"val_loss {logs.get('val_loss', float('nan')):.4f}  "
            f"lr {learning_rate:.3e}  seconds {time.perf_counter() - self.started:.1f}")
        storage.write_atomic(self.path, "\n".join(self.lines) + "\n")


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, record the stage in the run's checkpoint (tclf.training.checkpoints).

    Listed after the early stopping and the progress file, so that it saves their state
    after this epoch. ``state`` is the stage's StageState, updated in place.
    """

    def __init__(self, checkpoint, stage: str, stopper, state, progress: list, epochs: int):
        super().__init__()
        self.checkpoint, self.stage, self.stopper = checkpoint, stage, stopper
        self.state, self.progress, self.epochs = state, progress, epochs

    def on_train_begin(self, logs=None):
        self.fit_started, self.seconds_before = time.time(), self.state.seconds

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.state.history.setdefault(key, []).append(float(value))
        self.state.epochs_done = epoch + 1
        self.state.finished = bool(self.model.stop_training) or epoch + 1 >= self.epochs
        self.state.seconds = self.seconds_before + time.time() - self.fit_started
        self.checkpoint.save_epoch(self.stage, self.model, self.stopper, self.state,
                                   self.progress)
        faults.point("train.epoch_end")


class StageTensorBoard(keras.callbacks.TensorBoard):
    """TensorBoard logs of one stage on the run's single epoch axis.

    Each stage is its own fit, whose epochs Keras counts from 0; this one logs epoch e at
    step e + ``epoch_offset`` (stage 2: the epochs stage 1 ran), so that both stages
    follow each other as in accuracy.png, and logs ``epoch_stage`` (1 or 2) beside the
    metrics, from which the boundary can be read back.
    """

    def __init__(self, log_dir: str, stage: int, epoch_offset: int = 0):
        super().__init__(log_dir, write_graph=False)
        self.stage, self.epoch_offset = stage, epoch_offset

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + self.epoch_offset, {**(logs or {}), "stage": self.stage})


class OffsetEpochs(keras.callbacks.Callback):
    """Another callback, told epoch e + ``offset`` for epoch e: stage 2's epochs numbered
    after stage 1's, for callbacks that span both stages (a tuner's)."""

    def __init__(self, callback, offset: int):
        super().__init__()
        self.callback, self.offset = callback, offset

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.callback.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.callback.on_epoch_begin(epoch + self.offset, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.callback.on_epoch_end(epoch + self.offset, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.callback.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.callback.on_train_batch_end(batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self.callback.on_test_batch_end(batch, logs)


class StallWatch(keras.callbacks.Callback):
    """Calls ``on_stall(message)`` from a thread when no batch (training or validation) has
    ended for ``seconds`` while the model trains: a bounded wait for an input that may never
    come (a stopped tf.data service). Epoch ends count as progress too."""

    def __init__(self, seconds: float, on_stall, message: str):
        super().__init__()
        self.seconds, self.on_stall, self.message = seconds, on_stall, message
        self._last, self._stop = time.monotonic(), threading.Event()
        self._thread = None

    def _progress(self, *_, **__) -> None:
        self._last = time.monotonic()

    on_train_batch_end = on_test_batch_end = on_epoch_begin = on_epoch_end = _progress

    def on_train_begin(self, logs=None) -> None:
        self._progress()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="tclf-stall-watch",
                                        daemon=True)
        self._thread.start()

    def on_train_end(self, logs=None) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            if time.monotonic() - self._last > self.seconds:
                self.on_stall(self.message)
                return
