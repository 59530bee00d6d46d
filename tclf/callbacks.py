"""Keras callbacks of the two-stage schedule (imported only when training runs)."""

from __future__ import annotations

import time

import keras
import numpy as np

from tclf import storage


class EarlyStoppingAfter(keras.callbacks.EarlyStopping):
    """EarlyStopping that never stops before ``min_epochs`` epochs have run."""

    def __init__(self, min_epochs: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.min_epochs = min_epochs

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
