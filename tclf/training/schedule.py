"""The fixed two-stage schedule, as tclf-train and every tclf-tune trial run it.

Stage 1 trains the heads on a frozen backbone (on its outputs computed once, with
--stage1-cache); stage 2 fine-tunes the backbone's last layers (BatchNormalization kept
frozen) at a lower rate. Both are :func:`run_stage` with a different :class:`Stage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import keras

from tclf.model import freeze_backbone, heads_model, is_random, unfreeze_top
from tclf.training import augment
from tclf.training.backbone_cache import backbone_outputs
from tclf.training.callbacks import (EarlyStoppingAfter, EpochCheckpoint, OffsetEpochs,
                                     ProgressFile, StageTensorBoard)
from tclf.training.checkpoints import StageState
from tclf.training.cluster import barrier
from tclf.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage, as data: its schedule, early stopping and training step."""

    name: str
    learning_rate: float
    epochs: int
    steps_per_epoch: int
    warmup_epochs: float = 1.0
    patience: int = 3
    min_epochs: int = 0  # Early stopping never stops before.
    min_delta: float = 0.0  # A smaller fall of val_loss is no improvement.
    unfrozen: int = 0  # The backbone's last layers trained (stage 2).
    class_weight: dict | None = None
    mixup: float = 0.0  # Its Beta alpha; 0: off.
    label_smoothing: float = 0.0
    seed: int | None = None
    verbose: int = 1


@dataclasses.dataclass
class StageResult:
    name: str
    history: dict
    epochs_run: int
    stop_reason: str
    started: float
    seconds: float  # Includes prepare_seconds.
    prepare_seconds: float = 0.0  # Stage 1: computing the backbone outputs.


def class_weights(counts: dict, classes) -> dict[int, float]:
    """Balanced weights n / (k * n_c) from the training counts (sklearn's "balanced")."""
    present = [c for c in classes if counts.get(c, 0) > 0]
    total = sum(counts[c] for c in present)
    return {i: (total / (len(present) * counts[c]) if counts.get(c, 0) > 0 else 1.0)
            for i, c in enumerate(classes)}


def stages_of(config: TrainConfig, pack) -> tuple[Stage, Stage]:
    """config's two stages, with the steps and class weights of ``pack``'s training split."""
    train = pack.split("train")
    common = dict(steps_per_epoch=math.ceil(train.records / config.batch_size),
                  class_weight=class_weights(train.counts, pack.classes), mixup=config.mixup,
                  label_smoothing=config.label_smoothing, seed=config.seed,
                  verbose=config.verbose)
    return (Stage("stage1", config.stage1_lr, config.stage1_epochs,
                  warmup_epochs=config.stage1_warmup_epochs, patience=config.stage1_patience,
                  **common),
            Stage("stage2", config.stage2_lr, config.stage2_max_epochs,
                  warmup_epochs=config.stage2_warmup_epochs, patience=config.stage2_patience,
                  min_epochs=config.stage2_min_epochs, min_delta=config.stage2_min_delta,
                  unfrozen=config.stage2_layers, **common))


def learning_rate_schedule(peak: float, steps_per_epoch: int, epochs: int,
                           warmup_epochs: float = 1.0):
    """Linear warm-up from 0 to ``peak`` over warmup_epochs, then cosine decay to 0 at the
    end of ``epochs``."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(min(total - 1, round(warmup_epochs * steps_per_epoch)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=max(1, total - warmup),
        alpha=0.0, warmup_target=peak if warmup else None, warmup_steps=warmup)


def run_stage(model, data, stage: Stage, *, callbacks=(), checkpoint=None,
              progress: list | None = None) -> StageResult:
    """Compile with Adam on the stage's schedule and fit on ``data`` (training, validation),
    with early stopping on val_loss that restores the best epoch's weights.

    With a ``checkpoint`` (tclf.training.checkpoints) every epoch is recorded in it, and a
    stage it already holds continues after its last epoch with its weights, optimizer and
    early-stopping state; ``progress`` is the training_progress.txt lines saved with it.
    Mixup and label smoothing act on the training steps only (tclf.training.augment).
    """
    schedule = learning_rate_schedule(stage.learning_rate, stage.steps_per_epoch, stage.epochs,
                                      stage.warmup_epochs)
    classes = model.outputs[0].shape[-1]
    loss, accuracy = ((keras.losses.SparseCategoricalCrossentropy(), "accuracy")
                      if not (stage.mixup or stage.label_smoothing)
                      else augment.loss_and_accuracy(classes, stage.label_smoothing))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=[accuracy])
    stopper = EarlyStoppingAfter(min_epochs=stage.min_epochs, monitor="val_loss",
                                 patience=stage.patience, min_delta=stage.min_delta,
                                 restore_best_weights=True)
    state = ((checkpoint.stage(stage.name) if checkpoint else None)
             or StageState(started=time.time()))
    best_weights = (checkpoint.load_best_weights(state.best_weights)
                    if state.epochs_done and state.best_weights else None)
    if state.finished:  # Interrupted after the stage's last epoch: nothing left to run.
        if best_weights is not None:
            model.set_weights(best_weights)
        else:
            checkpoint.restore_weights(model, state.weights)
    else:
        _fit(model, data, stage, state, stopper, best_weights, callbacks, checkpoint, progress,
             classes)
    return StageResult(stage.name, state.history, state.epochs_done, _stop_reason(stage, state),
                       state.started, state.seconds)


def _fit(model, data, stage, state, stopper, best_weights, callbacks, checkpoint, progress,
         classes) -> None:
    """Fit from where ``state`` is, keeping the stage's state up to date."""
    if state.epochs_done:
        checkpoint.restore_weights(model, state.weights)
        checkpoint.restore_optimizer(model, state.optimizer)
        stopper.resume_from(state.stopper, best_weights)
    if checkpoint:
        callbacks = [*callbacks, EpochCheckpoint(checkpoint, stage.name, stopper, state,
                                                 progress if progress is not None else [],
                                                 stage.epochs)]
    train_data, val_data = data
    with augment.mixup(model, stage.mixup, classes, stage.seed):
        history = model.fit(train_data, validation_data=val_data, epochs=stage.epochs,
                            initial_epoch=state.epochs_done,
                            steps_per_epoch=stage.steps_per_epoch,
                            class_weight=stage.class_weight, shuffle=False,
                            callbacks=[stopper, *callbacks], verbose=stage.verbose)
    stopped = {"stopped_epoch": stopper.stopped_epoch, "best_epoch": stopper.best_epoch}
    if not checkpoint:  # (With one, EpochCheckpoint has kept the state.)
        state.history = dict(history.history)
        state.epochs_done = len(state.history.get("loss", []))
        state.seconds = time.time() - state.started
        state.stopper = stopped
    else:
        state.stopper = {**state.stopper, **stopped}


def _stop_reason(stage: Stage, state) -> str:
    stopped, best = state.stopper.get("stopped_epoch", 0), state.stopper.get("best_epoch", 0)
    if stopped > 0:
        by = f" by more than {stage.min_delta:g}" if stage.min_delta else ""
        return (f"early stopping: val_loss did not improve{by} for {stage.patience} epochs; "
                f"restored the best epoch, {best + 1}")
    restored = f"; restored the best epoch, {best + 1}" if state.epochs_done else ""
    return f"reached the maximum of {stage.epochs} epochs{restored}"


def two_stages(model, data, config: TrainConfig, pack, *, logs_dir: str,
               progress_path: str | None = None, callbacks=(), checkpoint=None, outputs=None,
               scratch: str | None = None, stages: list | None = None, after_stage1=None,
               workers: tuple[int, int] | None = None) -> list[StageResult]:
    """Stage 1, then stage 2, on ``data`` (training, validation datasets of ``pack``).

    - Stage 1 trains on the backbone's outputs with config.stage1_cache: ``outputs`` if
      given (a search computes them once), else computed here, scratch files in ``scratch``.
    - Each epoch goes to TensorBoard in ``logs_dir`` on one epoch axis over both stages, and
      to ``progress_path``. ``callbacks`` go to both stages, numbered on that axis too.
    - ``workers`` (count, index): a multi-worker run; each worker computes its own outputs.
    Returns ``stages`` with the two StageResults appended.
    """
    stages = [] if stages is None else stages
    lines = checkpoint.progress if checkpoint else []

    def hooks(number: int, offset: int) -> dict:
        own = [StageTensorBoard(logs_dir, stage=number, epoch_offset=offset)]
        if progress_path:
            own.insert(0, ProgressFile(progress_path, f"stage{number}", lines))
        return dict(callbacks=[*own, *(OffsetEpochs(c, offset) if offset else c
                                       for c in callbacks)],
                    checkpoint=checkpoint, progress=lines)

    first, second = stages_of(config, pack)
    if config.stage1_cache:
        stages.append(_cached_stage1(model, config, pack, first, hooks(1, 0), checkpoint,
                                     outputs, scratch, workers))
    else:
        freeze_backbone(model)
        stages.append(run_stage(model, data, first, **hooks(1, 0)))
    if after_stage1:
        after_stage1()
    if is_random(config.weights) and not config.stage2_random_backbone:
        stages.append(StageResult("stage2", {}, 0, "skipped: the backbone is random (--weights "
                                  "none); --stage2-random-backbone runs it", time.time(), 0.0))
        return stages
    unfreeze_top(model, second.unfrozen)
    stages.append(run_stage(model, data, second, **hooks(2, stages[-1].epochs_run)))
    return stages


def _cached_stage1(model, config: TrainConfig, pack, stage: Stage, hooks: dict, checkpoint,
                   outputs, scratch: str | None, workers=None) -> StageResult:
    """Stage 1 on the backbone's outputs (tclf.training.backbone_cache): ``outputs`` if
    given, else computed here, and then stage 1's time includes the pass. A resumed run whose
    stage 1 had finished skips the pass."""
    freeze_backbone(model)
    heads = heads_model(model)
    saved = checkpoint.stage("stage1") if checkpoint else None
    if saved and saved.finished:
        return run_stage(heads, (None, None), stage, **hooks)
    with contextlib.ExitStack() as stack:
        cached = outputs or stack.enter_context(backbone_outputs(
            model, pack, config.batch_size, config.image_size, scratch, config.stage1_cache_mb,
            progress=config.verbose > 0, workers=workers))
        if outputs is None and workers and workers[0] > 1:  # Each worker's pass took its time.
            barrier("tclf-stage1-pass")
        result = run_stage(heads, (cached.train.dataset(config.batch_size, True, config.seed),
                                   cached.val.dataset(config.batch_size)), stage, **hooks)
    if outputs is not None:
        return result
    return dataclasses.replace(result, started=min(result.started, cached.started),
                               seconds=result.seconds + cached.seconds,
                               prepare_seconds=cached.seconds)
