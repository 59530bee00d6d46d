"""The HyperModel: a trial is tclf-train's model and schedule with the trial's options.

``build`` maps the trial's hyperparameters onto TrainConfig and builds the model as
tclf-train does; ``fit`` runs the same two stages, then scores the model on the validation
split at segment and at track level. Stage 1 trains on the backbone outputs the search
computed once (:meth:`tclf.training.session.Session.shared_stage1`).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import keras_tuner
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from tclf import faults, storage
from tclf.data import reader
from tclf.evaluation.evaluate import evaluate_records
from tclf.model import backbone_of
from tclf.training.config import TrainConfig
from tclf.training.schedule import two_stages
from tclf.training.session import Session, make_datasets, model_for, seed_everything
from tclf.tune import compat
from tclf.tune.space import OBJECTIVES, declare, tidy


@dataclasses.dataclass
class Shared:
    """What every trial of a search process shares: the session (devices, precision, pack),
    a scratch folder and, with the stage-1 cache, the backbone's weights and outputs."""

    session: Session
    scratch: str
    backbone_weights: list | None = None
    outputs: object = None


class TclfHyperModel(keras_tuner.HyperModel):
    """build: tclf.model.build_model with the trial's TrainConfig; fit: the two stages."""

    def __init__(self, base: TrainConfig, space: dict, shared: Shared, logs_dir: str):
        super().__init__()
        self.base, self.space, self.shared, self.logs_dir = base, space, shared, logs_dir

    def trial_config(self, hp) -> TrainConfig:
        return self.base.replace(**{name: tidy(hp.get(name)) for name in self.space})

    def build(self, hp):
        declare(hp, self.space)
        config = self.trial_config(hp)
        config.validate()
        shared = self.shared
        keras.mixed_precision.set_global_policy(shared.session.precision)
        seed_everything(config)
        with shared.session.strategy.scope():
            # The outputs' backbone replaces this one's: no need to calibrate it.
            model = model_for(config, shared.session.pack,
                              calibrate=shared.backbone_weights is None)
        if shared.backbone_weights is not None:  # The backbone the outputs came from.
            backbone_of(model).set_weights(shared.backbone_weights)
        return model

    def fit(self, hp, model, *args, callbacks=(), trial_id="", **kwargs):
        return fit_trial(self.trial_config(hp), model, self.shared, list(callbacks),
                         storage.join(self.logs_dir, trial_id))


class SpaceOnly(keras_tuner.HyperModel):
    """The chief's hypermodel: it declares the space (Keras Tuner builds it once at the
    start); the chief runs no trial, so it needs no data, devices or backbone."""

    def __init__(self, space: dict):
        super().__init__()
        self.space = space

    def build(self, hp):
        declare(hp, self.space)
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])


def fit_trial(config: TrainConfig, model, shared: Shared, callbacks: list,
              logs_dir: str) -> dict:
    """The two stages on ``model`` (as tclf-train runs them), then the validation scores."""
    pack = shared.session.pack
    stages = []
    data = make_datasets(config, pack)
    try:
        with shared.session.strategy.scope(), reader.naming_corrupt_shards(pack):
            stages = two_stages(
                model, data, config, pack, logs_dir=logs_dir,
                callbacks=[keras.callbacks.TerminateOnNaN(), *callbacks],
                outputs=shared.outputs, scratch=shared.scratch, stages=stages,
                after_stage1=lambda: (_check_finite(stages[-1]),
                                      faults.point("tune.stage1_done")))
            _check_finite(stages[-1])
            evaluation = evaluate_records(model, list(pack.classes), pack, "val",
                                          config.batch_size)  # As tclf-train's run.
    except tf.errors.ResourceExhaustedError as error:
        raise keras_tuner.errors.FailedTrialError(
            f"out of memory: {error.message.strip().splitlines()[0]}") from None
    # Stage 2's losses; stage 1's where stage 2 was skipped (a random backbone).
    best = next((s.history["val_loss"] for s in reversed(stages) if s.history.get("val_loss")),
                [])
    return {"val_track_accuracy": evaluation.track_accuracy,
            "val_track_macro_f1": evaluation.track_macro_f1,
            "val_accuracy": evaluation.segment_accuracy,
            "val_loss": float(min(best)) if best else float("nan"),
            "epochs": float(sum(s.epochs_run for s in stages))}


def _check_finite(stage) -> None:
    """A stage whose loss became NaN or infinite fails the trial (TerminateOnNaN stopped it)."""
    losses = stage.history.get("loss", []) + stage.history.get("val_loss", [])
    if not all(math.isfinite(v) for v in losses):
        raise keras_tuner.errors.FailedTrialError(
            f"the loss became NaN or infinite in {stage.name}")


def write_hparams(logs_dir: str, trial) -> None:
    """The trial's hyperparameters for TensorBoard's HParams view (at the root of the trial's
    logs; its train/ and validation/ runs hold the metrics)."""
    writer = tf.summary.create_file_writer(logs_dir)
    with writer.as_default():
        hparams_api.hparams(compat.tensorboard_hparams(trial.hyperparameters, hparams_api),
                            trial_id=trial.trial_id)
    writer.close()


def write_scores(logs_dir: str, metrics: dict) -> None:
    """The trial's scores as scalars at the root of its logs, for the HParams view."""
    writer = tf.summary.create_file_writer(logs_dir)
    with writer.as_default():
        for name in OBJECTIVES:
            tf.summary.scalar(name, metrics[name], step=0)
    writer.close()
