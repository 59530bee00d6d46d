"""models/vX/checkpoint/: what `tclf-train --resume` continues a run from.

After every epoch it records, per stage: the model's weights; the optimizer's variables (Adam's
moments, the step count that drives the learning-rate schedule, the loss scale); the
early-stopping state with the best epoch's weights; the history, seconds and
training_progress.txt lines; whether the stage is over. state.json, what a resume reads, is
written last (atomically), and only then are the files it no longer names deleted: a kill at
any instant leaves it naming complete files. Not saved: the input position and random state
(a resumed stage reshuffles) and the batch within an epoch (an interrupted epoch runs again).
Keras' BackupAndRestore has the same limits but knows nothing of two stages.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from tclf import RunError, faults, storage
from tclf.training import layout

FORMAT = 1


@dataclasses.dataclass
class StageState:
    """Where one stage stands after its last completed epoch."""

    epochs_done: int = 0
    finished: bool = False
    history: dict = dataclasses.field(default_factory=dict)
    stopper: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None  # File names in the checkpoint folder.
    optimizer: str | None = None
    best_weights: str | None = None
    started: float = 0.0
    seconds: float = 0.0


def _save_arrays(path: str, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_atomic(path, buffer.getvalue())


def _load_arrays(path: str) -> dict:
    try:
        data = storage.read_bytes(path)
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise RunError(f"{path}: unreadable checkpoint file ({error}); the run cannot be "
                       f"resumed, start a new one") from None


def _numbered(arrays: list) -> dict:
    return {f"{i:05d}": a for i, a in enumerate(arrays)}


def _in_order(store: dict) -> list:
    return [store[name] for name in sorted(store)]


class Checkpoint:
    """models/vX/checkpoint/: the state a resume needs, written after every epoch."""

    def __init__(self, run_folder: str):
        self.folder = storage.join(run_folder, layout.CHECKPOINT)
        self.state = {"format": FORMAT, "stages": {}, "progress": []}

    # --- Reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, run_folder: str) -> "Checkpoint":
        checkpoint = cls(run_folder)
        path = storage.join(checkpoint.folder, layout.CHECKPOINT_STATE)
        if not storage.exists(path):
            raise RunError(f"{run_folder} has no checkpoint ({path} is missing): it was not "
                           f"written by a tclf that can resume, or it finished")
        state = storage.read_json(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise RunError(f"{path}: not a checkpoint this tclf can resume (format "
                           f"{state.get('format') if isinstance(state, dict) else None})")
        checkpoint.state = state
        return checkpoint

    def stage(self, name: str) -> StageState | None:
        saved = self.state["stages"].get(name)
        return StageState(**saved) if saved else None

    @property
    def config(self) -> dict:
        return self.state.get("config", {})

    @property
    def progress(self) -> list[str]:
        return list(self.state.get("progress", []))

    def path(self, name: str) -> str:
        return storage.join(self.folder, name)

    # --- Writing -------------------------------------------------------------------------------

    def start(self, config: dict, precision: str, run: dict) -> None:
        """Record the run's options, resolved precision and facts (``run``: when it started,
        which pack it reads) before its first epoch; a resume reads them back."""
        storage.makedirs(self.folder)
        self.state.update(config=config, precision=precision, run=run)
        self.write_state()

    def save_epoch(self, name: str, model, stopper, state: StageState, progress: list) -> None:
        """Record ``state`` (this stage after its latest epoch) with the model's weights and
        optimizer, and the early-stopping state of ``stopper``."""
        epoch = state.epochs_done
        state.weights = f"{name}-e{epoch:04d}.weights.npz"
        _save_arrays(self.path(state.weights), _numbered(model.get_weights()))
        state.optimizer = f"{name}-e{epoch:04d}.optimizer.npz"
        optimizer_store: dict = {}
        model.optimizer.save_own_variables(optimizer_store)
        _save_arrays(self.path(state.optimizer), optimizer_store)
        best_epoch = int(stopper.best_epoch)
        if stopper.best_weights is not None:
            if best_epoch + 1 == epoch:  # The best epoch is this one: its weights are saved.
                state.best_weights = state.weights
            elif state.best_weights != f"{name}-e{best_epoch + 1:04d}.weights.npz":
                # Restored from an older checkpoint (a resume), or the weights file is gone.
                state.best_weights = f"{name}-best-e{best_epoch + 1:04d}.weights.npz"
                _save_arrays(self.path(state.best_weights), _numbered(stopper.best_weights))
        state.stopper = {"wait": int(stopper.wait), "best": _float(stopper.best),
                         "best_epoch": best_epoch, "stopped_epoch": int(stopper.stopped_epoch)}
        self.state["stages"][name] = dataclasses.asdict(state)
        self.state["progress"] = list(progress)
        faults.point("train.checkpoint_files_written")
        self.write_state()

    def write_state(self) -> None:
        """Write state.json (atomically), then delete the files it no longer names."""
        storage.write_atomic(self.path(layout.CHECKPOINT_STATE), json.dumps(self.state, indent=1))
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        keep = {layout.CHECKPOINT_STATE}
        for saved in self.state["stages"].values():
            keep.update(v for k, v in saved.items()
                        if k in ("weights", "optimizer", "best_weights") and v)
        for name in storage.listdir(self.folder):
            if name not in keep and not name.startswith("."):
                storage.remove_quietly(self.path(name))

    def remove(self) -> None:
        """Delete the checkpoint folder (the run has completed)."""
        storage.rmtree(self.folder, ignore_errors=not storage.is_remote(self.folder))

    # --- Restoring -----------------------------------------------------------------------------

    def restore_weights(self, model, name: str) -> None:
        """Set ``model``'s weights to those of checkpoint file ``name``."""
        weights = _in_order(_load_arrays(self.path(name)))
        try:
            model.set_weights(weights)
        except ValueError as error:
            raise RunError(f"{self.path(name)}: does not fit this run's model ({error})") from None

    def restore_optimizer(self, model, name: str) -> None:
        """Build ``model``'s (compiled) optimizer and load its saved variables."""
        store = _load_arrays(self.path(name))
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if len(store) != len(optimizer.variables):
            raise RunError(f"{self.path(name)}: holds {len(store)} optimizer variables, this "
                           f"run's optimizer has {len(optimizer.variables)} (another precision "
                           f"or model?); the run cannot be resumed")
        optimizer.load_own_variables(store)

    def load_best_weights(self, name: str) -> list:
        return _in_order(_load_arrays(self.path(name)))


def _float(value) -> float | None:
    return None if value is None else float(value)
