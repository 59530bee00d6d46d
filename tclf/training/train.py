"""`tclf-train`: the options and the fixed two-stage schedule (SPEC section 5).

Stage 1 trains the heads on a frozen backbone; stage 2 fine-tunes the last
20 backbone layers (BatchNormalization kept frozen) at a lower rate. Both are
:func:`run_stage` with different arguments, and :func:`train` is one readable
sequence: devices -> data -> version folder -> model -> stage 1 -> stage 2 ->
reports -> model.h5. Devices and precision live in tclf.devices, the version
folder in tclf.versions. A Keras Tuner search (tclf.tune) builds its trials with the
same :func:`tclf.model.build_model` and trains them with the same :func:`two_stages`.

A version folder models/vX/ is complete when it holds model.h5: that file is
written last, after every report, and models/latest.h5 is replaced only after
it. A failed or interrupted run leaves vX/ without model.h5 (its
training_log.txt says why) and never touches latest.h5.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
import sys
import time
import warnings

from tclf import InputError, RunError, faults, storage
from tclf.data import schema
from tclf.training.devices import PRECISIONS, configure_devices, resolve_precision
from tclf.training.versions import RunFolder, tidy_models_dir, write_report_set


def option(default, help: str, flag: str | None = None):
    """A TrainConfig field: its default, its help and (if not --name-with-dashes) its flag.
    The type is the default's; tclf-train's options, `--hparams` files and the tuner are
    all derived from these fields."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; `--hparams FILE` may override any of them."""

    records: str = option("records", "Records folder written by tclf-pack.")
    models: str = option("models", "Folder receiving the version folders vN/ and latest.h5.",
                         flag="--models-dir")
    gpus: str = option(
        "all",
        "all (every GPU; CPU if none), none (CPU), or GPU indices like 0,1. Several GPUs train "
        "with MirroredStrategy.")
    cpu_devices: int = option(
        1,
        "When training on the CPU: split it into this many logical devices and mirror over them "
        "(MirroredStrategy), to run the multi-device path without GPUs. For testing; not "
        "faster.")
    precision: str = option(
        "auto",
        "Dtype policy: auto = mixed_float16 on GPUs; on CPUs mixed_bfloat16 where the CPU has "
        "native bfloat16 (AVX512-BF16/AMX), else float32. The feature normalization and the "
        "softmax always compute in float32.")
    weights: str = option(
        "imagenet",
        "EfficientNetB0 initialization: imagenet (downloaded once to ~/.keras/models), none "
        "(random), or the path of a weights file.")
    image_size: int = option(
        299,
        "Side of the square spectrogram input; records are resized if it differs from 299.")
    batch_size: int = option(32, "Global batch size: with N GPUs each gets batch_size / N.")
    seed: int = option(0, "Seed of weights initialization and data order.")
    data_service: str = option(
        "",
        "host:port of a tf.data service dispatcher (tclf-data-service): its workers read and "
        "decode the training records instead of this process (README: Training on a cluster).")
    data_service_timeout: float = option(
        300.0,
        "With --data-service: seconds the run waits for the service (its dispatcher at the "
        "start, a batch from it while training) before it fails with one line, resumable.")
    cluster_timeout: float = option(
        600.0,
        "Multi-worker runs (TF_CONFIG): seconds a worker waits for the others (at start-up, at "
        "every step's all-reduce, at the end) before the whole run fails.")
    cache: bool = option(
        False,
        "Keep decoded training examples in memory after the first epoch (about 270 kB per "
        "segment).")
    # Model.
    image_units: int = option(128, "Units of the image branch's Dense layer.")
    gru_units: int = option(128, "Units of the first GRU (returns sequences).")
    gru2_units: int = option(64, "Units of the second GRU.")
    feature_units: int = option(64, "Units of the feature branch's Dense layer.")
    fusion_units: int = option(128, "Units of the first fusion Dense layer.")
    head_units: int = option(64, "Units of the second fusion Dense layer.")
    attention_heads: int = option(4, "Heads of the self-attention over the 10 windows.")
    dropout: float = option(0.4, "Dropout rate after the first fusion layer.")
    random_backbone_stats: int = option(
        96,
        "With --weights none: set the random backbone's BatchNormalization statistics from "
        "this many training spectrograms (one forward pass) before stage 1. Left at their "
        "initial values they shrink its outputs to ~1e-5 and silence the image branch "
        "(README: Learning from real music). 0 keeps them. No effect on pretrained weights.")
    mixup: float = option(
        0.4,
        "Mixup in both stages' training steps: each example blended with another of its "
        "batch, inputs and labels, by a weight drawn from Beta(alpha, alpha); this is alpha "
        "(0: off). Validation and prediction never mix (README: Learning from real music).")
    label_smoothing: float = option(
        0.1,
        "Training targets put 1 - this on the true style and spread this over all styles "
        "(0: off).")
    # Stage 1: frozen backbone.
    stage1_cache: bool = option(
        True,
        "Stage 1: compute the frozen backbone's outputs of every record once, then train the "
        "rest of the model on them (the weights are the same layers'). --no-stage1-cache runs "
        "the backbone on every record in every epoch, as tclf 0.1 did.")
    stage1_cache_mb: float = option(
        2048.0,
        "Stage 1 cache: above this many MB (about 7.9 kB a record) the backbone outputs go to "
        "a scratch file in the version folder instead of memory.")
    stage1_epochs: int = option(
        60,
        "Stage 1 (frozen backbone): maximum epochs, a budget for early stopping to end "
        "(README: how it was chosen). The cosine schedule spans it.")
    stage1_lr: float = option(
        1e-4,
        "Stage 1: peak learning rate (Adam, warm-up then cosine decay).")
    stage1_warmup_epochs: float = option(1.0, "Stage 1: epochs of linear warm-up.")
    stage1_patience: int = option(
        8,
        "Stage 1: early-stopping patience on val_loss (best weights restored).")
    # Stage 2: fine-tuning.
    stage2_layers: int = option(
        20,
        "Stage 2: number of last backbone layers unfrozen (BatchNorm stays frozen).")
    stage2_lr: float = option(1e-5, "Stage 2: peak learning rate.")
    stage2_warmup_epochs: float = option(1.0, "Stage 2: epochs of linear warm-up.")
    stage2_min_epochs: int = option(3, "Stage 2: minimum epochs before early stopping may stop it.")
    stage2_max_epochs: int = option(8, "Stage 2: maximum epochs.")
    stage2_patience: int = option(2, "Stage 2: early-stopping patience on val_loss.")
    stage2_random_backbone: bool = option(
        False,
        "With --weights none, run stage 2 anyway. Skipped by default: fine-tuning the top of a "
        "random backbone at stage 2's rate changed nothing on real music (README: Learning "
        "from real music) and costs a full backbone pass per epoch.")
    stage2_min_delta: float = option(
        1e-3,
        "Stage 2: the smallest fall in val_loss that counts as an improvement for early "
        "stopping (an epoch of stage 2 costs a full backbone pass; README: why).")
    calibrate: bool = option(
        True,
        "After training, fit a temperature to the validation segments so that the "
        "probabilities match how often the model is right; stored in model.h5, applied by "
        "tclf-eval and tclf-predict (README: Learning from real music).")
    deterministic: bool = option(
        False,
        "TensorFlow's op determinism (and a deterministic input pipeline): with the same "
        "--seed, records, machine and software, a run repeats bit for bit, on the CPU and on "
        "GPUs, at some cost in speed. Without it, --seed fixes the initial weights, the "
        "split of the data and its order, but parallel reading and GPU kernels still vary "
        "the results slightly. Stays on for the rest of the process.")
    verbose: int = option(
        1,
        "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.")

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with ``overrides`` (names with dashes or underscores), each value checked
        against its field's type: a JSON file's 2 is a fine float, its "299" no int."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        flags = {f.metadata["flag"].lstrip("-"): f.name for f in fields.values()
                 if f.metadata.get("flag")}
        values = {flags.get(name, name).replace("-", "_"): value
                  for name, value in overrides.items()}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"unknown option(s) {unknown}; valid: "
                             f"{sorted(n.replace('_', '-') for n in fields)}")
        for name, value in values.items():
            kind = type(fields[name].default)
            number = {int: numbers.Integral, float: numbers.Real}.get(kind)
            if number and isinstance(value, number) and not isinstance(value, bool):
                values[name] = kind(value)  # Also numpy numbers, e.g. from a tuner.
            elif type(value) is not kind:
                raise InputError(f"option {name.replace('_', '-')}: expected {kind.__name__}, "
                                 f"got {value!r}")
        return dataclasses.replace(self, **values)

    def model_options(self) -> dict:
        """The fields that are arguments of tclf.model.build_model, by name."""
        from tclf.model import build_model

        names = inspect.signature(build_model).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in names}

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stage2_min_epochs > self.stage2_max_epochs:
            raise InputError(f"stage2_min_epochs ({self.stage2_min_epochs}) must not exceed "
                             f"stage2_max_epochs ({self.stage2_max_epochs})")
        for name in ("batch_size", "stage1_epochs", "stage2_max_epochs", "cpu_devices",
                     "image_units", "gru_units", "gru2_units", "feature_units", "fusion_units",
                     "head_units", "attention_heads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        checks = [
            (self.image_size >= 32, "image_size must be >= 32 (EfficientNetB0's smallest input)"),
            (self.attention_heads <= self.gru_units,
             "attention_heads must be <= gru_units (each head gets gru_units / heads)"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.random_backbone_stats >= 0, "random_backbone_stats must be >= 0"),
            (self.mixup >= 0, "mixup (the Beta distribution's alpha) must be >= 0"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.stage1_lr > 0 and self.stage2_lr > 0, "learning rates must be > 0"),
            (min(self.stage1_warmup_epochs, self.stage2_warmup_epochs, self.stage1_patience,
                 self.stage2_patience, self.stage2_min_epochs, self.stage2_min_delta) >= 0,
             "warm-up epochs, patience, stage2_min_epochs and stage2_min_delta must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def validate_model_options(self) -> None:
        """The checks that build a backbone (so they start TensorFlow: after the devices)."""
        from tclf.model import backbone_layer_count

        if not 0 <= self.stage2_layers <= backbone_layer_count():
            raise InputError(f"stage2_layers must be 0-{backbone_layer_count()}, got "
                             f"{self.stage2_layers}")


# The tiny preset: a two-stage run in about a minute on 2 CPU cores (32x32 spectrograms, small
# layers, 1 + 1-2 epochs; stage 2 runs on its random backbone, to exercise it). For tests, smoke
# runs and benchmarks of the machinery, not of the model: TrainConfig().replace(**TINY) or
# `tclf-train --hparams` with it.
TINY = dict(weights="none", image_size=32, batch_size=8, stage1_epochs=1, stage2_min_epochs=1,
            stage2_max_epochs=2, stage2_patience=1, image_units=16, gru_units=16, gru2_units=8,
            feature_units=8, fusion_units=16, head_units=8, attention_heads=2,
            stage2_random_backbone=True)


def load_hparams(path: str) -> dict:
    """Options from a JSON object file (as the tuner writes them)."""
    values = storage.read_json(path)
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object of option: value")
    return values


# ---------------------------------------------------------------------------
# Schedule pieces.
# ---------------------------------------------------------------------------


def class_weights(counts: dict, classes) -> dict[int, float]:
    """Balanced weights n / (k * n_c) from the training counts (sklearn's "balanced")."""
    present = [c for c in classes if counts.get(c, 0) > 0]
    total = sum(counts[c] for c in present)
    return {i: (total / (len(present) * counts[c]) if counts.get(c, 0) > 0 else 1.0)
            for i, c in enumerate(classes)}


def learning_rate_schedule(peak: float, steps_per_epoch: int, epochs: int,
                           warmup_epochs: float = 1.0):
    """Linear warm-up from 0 to ``peak``, then cosine decay to 0 at the end of ``epochs``.

    1. Warm-up: the first warmup_epochs * steps_per_epoch steps.
    2. Cosine decay over the remaining steps.
    """
    import keras

    total = max(1, steps_per_epoch * epochs)
    warmup = int(min(total - 1, round(warmup_epochs * steps_per_epoch)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=max(1, total - warmup),
        alpha=0.0, warmup_target=peak if warmup else None, warmup_steps=warmup)


@dataclasses.dataclass
class StageResult:
    name: str
    history: dict
    epochs_run: int
    stop_reason: str
    started: float
    seconds: float  # Includes prepare_seconds.
    prepare_seconds: float = 0.0  # Stage 1: computing the backbone outputs.


def run_stage(model, train_data, val_data, *, name: str, learning_rate: float, epochs: int,
              steps_per_epoch: int, warmup_epochs: float = 1.0, patience: int = 3,
              min_epochs: int = 0, min_delta: float = 0.0, class_weight=None, callbacks=(),
              verbose=1, checkpoint=None, progress: list | None = None,
              mixup: float = 0.0, label_smoothing: float = 0.0, seed: int | None = None
              ) -> StageResult:
    """Compile with Adam on a warm-up + cosine schedule and fit, with early stopping.

    ``mixup`` (its Beta alpha) and ``label_smoothing`` regularize the training steps only
    (tclf.augment); both 0: Keras' sparse cross-entropy, as the spec's schedule has it.

    Early stopping watches val_loss (a fall of ``min_delta`` or less is no improvement),
    restores the best epoch's weights and never stops before ``min_epochs``. With a
    ``checkpoint`` (tclf.checkpoints) every epoch is recorded in it, and a stage it
    already holds continues after its last
    recorded epoch, with its weights, optimizer state (so the schedule too) and
    early-stopping state; ``progress`` is the training_progress.txt lines, saved with it.
    """
    import keras

    from tclf.training import augment
    from tclf.training.callbacks import EarlyStoppingAfter, EpochCheckpoint
    from tclf.training.checkpoints import StageState

    schedule = learning_rate_schedule(learning_rate, steps_per_epoch, epochs, warmup_epochs)
    classes = model.outputs[0].shape[-1]
    loss, accuracy = ((keras.losses.SparseCategoricalCrossentropy(), "accuracy")
                      if not (mixup or label_smoothing)
                      else augment.loss_and_accuracy(classes, label_smoothing))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=[accuracy])
    stopper = EarlyStoppingAfter(min_epochs=min_epochs, monitor="val_loss", patience=patience,
                                 min_delta=min_delta, restore_best_weights=True)
    state = (checkpoint.stage(name) if checkpoint else None) or StageState(started=time.time())
    best_weights = (checkpoint.load_best_weights(state.best_weights)
                    if state.epochs_done and state.best_weights else None)
    if state.finished:  # Interrupted after the stage's last epoch: nothing left to run.
        if best_weights is not None:
            model.set_weights(best_weights)
        else:
            checkpoint.restore_weights(model, state.weights)
    else:
        if state.epochs_done:
            checkpoint.restore_weights(model, state.weights)
            checkpoint.restore_optimizer(model, state.optimizer)
            stopper.resume_from(state.stopper, best_weights)
        if checkpoint:
            callbacks = [*callbacks, EpochCheckpoint(checkpoint, name, stopper, state,
                                                     progress if progress is not None else [],
                                                     epochs)]
        with augment.mixup(model, mixup, classes, seed):
            history = model.fit(train_data, validation_data=val_data, epochs=epochs,
                                initial_epoch=state.epochs_done, steps_per_epoch=steps_per_epoch,
                                class_weight=class_weight, shuffle=False,
                                callbacks=[stopper, *callbacks], verbose=verbose)
        if not checkpoint:  # (With one, EpochCheckpoint has kept the state.)
            state.history = dict(history.history)
            state.epochs_done = len(state.history.get("loss", []))
            state.seconds = time.time() - state.started
            state.stopper = {"stopped_epoch": stopper.stopped_epoch,
                             "best_epoch": stopper.best_epoch}
        else:
            state.stopper = {**state.stopper, "stopped_epoch": stopper.stopped_epoch,
                             "best_epoch": stopper.best_epoch}
    stopped, best = state.stopper.get("stopped_epoch", 0), state.stopper.get("best_epoch", 0)
    if stopped > 0:
        by = f" by more than {min_delta:g}" if min_delta else ""
        reason = (f"early stopping: val_loss did not improve{by} for {patience} epochs; "
                  f"restored the best epoch, {best + 1}")
    else:
        restored = f"; restored the best epoch, {best + 1}" if state.epochs_done else ""
        reason = f"reached the maximum of {epochs} epochs{restored}"
    return StageResult(name, state.history, state.epochs_done, reason, state.started,
                       state.seconds)


def stage1(model, train_data, val_data, *, steps_per_epoch: int, learning_rate: float = 1e-4,
           epochs: int = 60, warmup_epochs: float = 1.0, patience: int = 8, class_weight=None,
           callbacks=(), verbose=1, checkpoint=None, progress=None, **regularization
           ) -> StageResult:
    """Stage 1: backbone frozen, heads trained at ``learning_rate``.

    ``model`` is the full model with datasets of records, or its ``tclf.model.heads_model``
    with datasets of backbone outputs (``tclf.backbone_cache``): the same layers train.
    """
    from tclf.model import BACKBONE_NAME, freeze_backbone

    if any(layer.name == BACKBONE_NAME for layer in model.layers):
        freeze_backbone(model)
    return run_stage(model, train_data, val_data, name="stage1", learning_rate=learning_rate,
                     epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs,
                     patience=patience, class_weight=class_weight, callbacks=callbacks,
                     verbose=verbose, checkpoint=checkpoint, progress=progress, **regularization)


def stage2(model, train_data, val_data, *, steps_per_epoch: int, num_layers: int = 20,
           learning_rate: float = 1e-5, min_epochs: int = 3, max_epochs: int = 8,
           warmup_epochs: float = 1.0, patience: int = 2, min_delta: float = 1e-3,
           class_weight=None, callbacks=(), verbose=1, checkpoint=None,
           progress=None, **regularization) -> StageResult:
    """Stage 2: the last ``num_layers`` backbone layers trainable (BatchNorm frozen)."""
    from tclf.model import unfreeze_top

    unfreeze_top(model, num_layers)
    return run_stage(model, train_data, val_data, name="stage2", learning_rate=learning_rate,
                     epochs=max_epochs, min_epochs=min_epochs, steps_per_epoch=steps_per_epoch,
                     warmup_epochs=warmup_epochs, patience=patience, min_delta=min_delta,
                     class_weight=class_weight, callbacks=callbacks, verbose=verbose,
                     checkpoint=checkpoint, progress=progress, **regularization)


# ---------------------------------------------------------------------------
# The whole run.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    version_dir: str
    model_path: str
    evaluation: object  # reports.Evaluation
    stages: list
    seconds: float
    devices: str
    precision: str
    model: object = None  # The trained keras.Model.
    replicas: int = 1  # Devices the global batch was split over.
    cluster: object = None  # tclf.cluster.Cluster of a multi-worker run.
    fingerprint: str = ""  # weights_fingerprint of the trained model.


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run the two-stage schedule on config.records and write config.models/vX/.

    ``resume`` is the folder of an unfinished run to continue instead (see
    :func:`resume_config`, which gives the config to pass with it).

    Sets Keras' global dtype policy for the run and puts the previous one back
    when it returns or fails, so that a run in a process leaves no trace in the next.
    """
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _train(config, resume)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


# Where and how verbosely a run goes, never what it computes: `--resume` may change these
# (the precision stays the one the run resolved), and a search leaves them out of
# best_hparams.json and of the settings a resumed search must keep. --records is where this
# machine sees the pack (a cluster's workers may mount it elsewhere); a pack other than the
# run's is refused by its manifest's stamp.
PLACE_OPTIONS = ("models", "records", "gpus", "cpu_devices", "verbose", "data_service",
                 "data_service_timeout", "cluster_timeout")
RESUME_OPTIONS = PLACE_OPTIONS


def resume_config(models_dir: str, which: str | None = None,
                  **overrides) -> tuple[TrainConfig, str]:
    """The config and folder of the unfinished run ``which`` (vN, N or a folder; None: the
    newest) in models_dir, read from its checkpoint, with ``overrides`` of RESUME_OPTIONS."""
    from tclf.training.checkpoints import Checkpoint
    from tclf.training.cluster import from_env
    from tclf.training.versions import find_resumable

    if which is None and from_env():
        raise InputError("--resume in a multi-worker run (TF_CONFIG): name the run, e.g. "
                         "--resume v3, the same on every worker")
    folder = find_resumable(models_dir, which)
    checkpoint = Checkpoint.load(folder)
    config = TrainConfig().replace(**checkpoint.config)
    # Options given again with the values the run started with are fine (the same command
    # with --resume added); only a change is refused.
    fixed = {name: value for name, value in overrides.items() if name not in RESUME_OPTIONS}
    given = TrainConfig().replace(**fixed)
    changed = [field.name for field in dataclasses.fields(TrainConfig)
               if field.name in fixed and getattr(given, field.name) != getattr(config, field.name)]
    if changed:
        listed = "; ".join(f"{name.replace('_', '-')}: the run has {getattr(config, name)!r}, "
                           f"given {getattr(given, name)!r}" for name in sorted(changed))
        raise InputError(f"--resume continues {folder} with the options it started with; "
                         f"these differ: {listed} (may change: --records, --gpus, "
                         f"--cpu-devices, --models-dir, --verbose/-q, --data-service, "
                         f"--cluster-timeout)")
    overrides = {name: value for name, value in overrides.items() if name in RESUME_OPTIONS}
    # The folders as found now, not as typed when the run started (another working folder).
    where = {"models": os.path.dirname(folder.rstrip("/")) or ".",
             "records": overrides.pop("records", None) or checkpoint.state.get("run", {}).get(
                 "records_path", config.records)}
    return config.replace(**{**overrides, **where}, precision=checkpoint.state["precision"]), folder


def _train(config: TrainConfig, resume: str | None) -> TrainResult:
    from tclf.training import cluster as clusters

    cluster = clusters.from_env()
    config.validate()
    started = time.time()
    strategy, devices, on_gpu = configure_devices(config.gpus, config.cpu_devices, cluster,
                                                  config.cluster_timeout)
    if cluster is None:
        return _run(config, resume, strategy, devices, on_gpu, started, None)
    if cluster.is_chief:
        return _in_cluster(config, resume, strategy, devices, on_gpu, started, cluster)
    # A worker other than the chief trains in a private folder that nobody would take for
    # results (a resumed run: a copy of the chief's, taken before the chief goes on with it,
    # which waits for every worker in clusters.agree), and removes it at the end.
    import tempfile

    private = tempfile.mkdtemp(prefix=f"tclf-{cluster.task_type}{cluster.task_id}-")
    try:
        if resume:
            copy = os.path.join(private, os.path.basename(resume.rstrip("/")))
            # The checkpoint and the notes; not the chief's lock, logs or stage-1 scratch files.
            from tclf.training.backbone_cache import SCRATCH_NAME
            from tclf.training.versions import LOCK_NAME

            storage.copytree(resume, copy, exclude=(
                LOCK_NAME, "logs", "analysis",
                *(SCRATCH_NAME.format(split=side) for side in schema.SPLITS)))
            resume = copy
        return _in_cluster(config.replace(models=private), resume, strategy, devices, on_gpu,
                           started, cluster)
    finally:
        storage.rmtree(private, ignore_errors=True)


def _in_cluster(config: TrainConfig, resume: str | None, strategy, devices: str,
                on_gpu: bool, started: float, cluster) -> TrainResult:
    """:func:`_run` on a worker of a cluster: TensorFlow's errors after a lost worker as one
    line, and a common end, after the chief's writes."""
    import tensorflow as tf

    from tclf.training import cluster as clusters

    try:
        with warnings.catch_warnings():
            # Keras warns at the end of every validation pass of unknown length, which
            # tf.distribute's split of the validation batches between the workers makes it.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            result = _run(config, resume, strategy, devices, on_gpu, started, cluster)
    except tf.errors.OpError as error:
        if clusters.is_lost_worker(error):
            raise clusters.lost_worker(error, cluster, "starting the run", resume=(
                f"--resume {os.path.basename(resume.rstrip('/'))}" if resume else None)
            ) from error
        raise
    # Every worker waits here until the chief has written the version folder: a worker that
    # left earlier would look dead to the others.
    try:
        clusters.barrier("tclf-train-done")
    except tf.errors.OpError as error:
        if not cluster.is_chief:
            raise clusters.lost_worker(error, cluster, "waiting for the chief's last writes",
                                       resume="--resume vN if the chief's vN has no model.h5"
                                       ) from error
        warnings.warn(f"{result.version_dir} is complete, but another worker left before "
                      f"the end: {str(error).splitlines()[0][:200]}")
    return result


def _run(config: TrainConfig, resume: str | None, strategy, devices: str, on_gpu: bool,
         started: float, cluster) -> TrainResult:
    import keras
    import tensorflow as tf

    from tclf.training import cluster as clusters
    from tclf.data import reader
    from tclf.training.checkpoints import Checkpoint
    from tclf.model import save_model

    checkpoint = Checkpoint.load(resume) if resume else None
    writes = cluster is None or cluster.is_chief

    # --- Devices, precision, seeds -------------------------------------------------------------
    config.validate_model_options()
    devices += _batch_split(config.batch_size, strategy.num_replicas_in_sync)
    precision = resolve_precision(config.precision, on_gpu)
    keras.mixed_precision.set_global_policy(precision)
    seed_everything(config)

    # --- Input pipeline ------------------------------------------------------------------------
    if resume and not storage.exists(storage.join(config.records, schema.MANIFEST_NAME)):
        raise RunError(f"{config.records}: the records {resume} was trained on are not there "
                       f"(no {schema.MANIFEST_NAME}); give --records where that pack is now "
                       f"(packing again makes another pack, which a resume refuses)")
    manifest = _training_manifest(config.records)
    if config.data_service:  # A wrong address fails now, before a folder is claimed.
        reader.check_service(config.data_service, config.data_service_timeout)
    if cluster:
        clusters.agree(cluster, _what_runs(config, resume, checkpoint, manifest, precision,
                                           strategy), config.cluster_timeout)
    train_data, val_data = make_datasets(config, cluster)

    # --- Version folder ------------------------------------------------------------------------
    weights = class_weights(manifest["splits"]["train"]["counts"], manifest["classes"])
    if writes:  # What runs killed at their very end left: completed or removed first.
        for line in tidy_models_dir(config.models):
            print(f"note: {line}", file=sys.stderr)
    if checkpoint:
        run = RunFolder.reopen(resume, config, manifest, devices, precision, weights, checkpoint)
    else:
        run = RunFolder.claim(config, manifest, devices, precision, weights, started)
    try:
        # --- Model and the two stages ----------------------------------------------------------
        with strategy.scope():
            model = model_for(config, manifest)
            with reader.naming_corrupt_shards(config.records):
                run_schedule(model, train_data, val_data, config, run,
                             (cluster.workers, cluster.index) if cluster else None)
        evaluation = None
        if writes:
            # --- Reports -----------------------------------------------------------------------
            evaluation = calibrated_evaluation(model, config, manifest["classes"])
            write_report_set(run, evaluation)
            faults.point("train.reports_written")

            # --- The model last: model.h5's presence marks the run finished. A kill after it
            # leaves the publication to a later run or --resume (versions.finish_publication).
            for name in ("model.keras", "model.h5"):
                save_model(model, run.path(name), manifest["classes"], run.record(evaluation),
                           evaluation.temperature)
                faults.point(f"train.{name.replace('.', '_')}_written")
            storage.publish(run.path("model.h5"), storage.join(config.models, "latest.h5"))
            faults.point("train.latest_published")
            run.complete()
    except BaseException as error:
        if cluster and isinstance(error, tf.errors.OpError) and clusters.is_lost_worker(error):
            error = clusters.lost_worker(error, cluster, resume=(
                f"--resume {run.name}" if writes else "--resume vN (the chief's run folder)"))
            run.fail(error)
            raise error from None
        run.fail(error)
        raise
    return TrainResult(run.folder if writes else None, run.path("model.h5") if writes else None,
                       evaluation, run.stages, time.time() - started, devices, precision, model,
                       strategy.num_replicas_in_sync, cluster, weights_fingerprint(model))


def calibrated_evaluation(model, config: TrainConfig, classes):
    """The validation metrics, with config.calibrate at the temperature fitted to the
    validation segments (tclf.calibration): one pass over the split for both."""
    from tclf.evaluation.calibration import fit_temperature
    from tclf.evaluation.evaluate import evaluate_predictions, predict_records

    probabilities, labels, track_ids = predict_records(model, config.records, "val",
                                                       config.batch_size)
    temperature = fit_temperature(probabilities, labels) if config.calibrate else 1.0
    return evaluate_predictions(probabilities, labels, track_ids, classes, temperature)


def _what_runs(config: TrainConfig, resume: str | None, checkpoint, manifest: dict,
               precision: str, strategy) -> dict:
    """What every worker of a cluster must share: the options that shape the computation,
    the pack, the run resumed and its progress, the precision and the devices per worker."""
    local = ("models", "records", "gpus", "verbose", "cluster_timeout")
    return {**{k: v for k, v in dataclasses.asdict(config).items() if k not in local},
            "pack": manifest.get("created"), "precision": precision,
            "devices per worker": len(strategy.extended.worker_devices),
            "resumed run": os.path.basename(resume.rstrip("/")) if resume else None,
            "epochs done": ({name: (checkpoint.stage(name).epochs_done
                                    if checkpoint.stage(name) else 0)
                             for name in ("stage1", "stage2")} if checkpoint else None)}


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights, in order: equal on every worker of a cluster run
    (tclf-train prints it on each), and equal to that of the model.h5 it wrote."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def make_datasets(config: TrainConfig, cluster=None):
    """(training, validation) datasets of config.records, as both stages read them; in a
    multi-worker run (``cluster``), the training records split between the workers by shard
    file and the validation batches by tf.distribute."""
    from tclf.data import reader

    workers = (cluster.workers, cluster.index) if cluster else None
    train_data = reader.make_dataset(config.records, "train", config.batch_size, training=True,
                                   image_size=config.image_size, cache=config.cache,
                                   seed=config.seed, repeat=True, workers=workers,
                                   data_service=config.data_service or None)
    val_data = reader.make_dataset(config.records, "val", config.batch_size,
                                 image_size=config.image_size, cache=config.cache,
                                 workers=workers)
    return train_data, val_data


def seed_everything(config: TrainConfig) -> None:
    """Python's, NumPy's and TensorFlow's seeds from --seed; with --deterministic also
    TensorFlow's op determinism, which also makes tf.data deterministic (for the process:
    TensorFlow offers no public way back)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def model_for(config: TrainConfig, manifest: dict, calibrate: bool = True):
    """tclf.model.build_model with config's model options, for the records of ``manifest``;
    a random backbone's statistics set from the first training records (in the pack's fixed
    order, the same on every worker and on a resume) unless not ``calibrate``."""
    from tclf.model import build_model, calibrate_backbone, is_random

    model = build_model(len(manifest["classes"]), manifest["feature_mean"],
                        manifest["feature_std"], feature_shape=manifest["feature_shape"],
                        **config.model_options())
    if calibrate and is_random(config.weights) and config.random_backbone_stats > 0:
        calibrate_backbone(model, _first_spectrograms(config, config.random_backbone_stats))
    return model


def _first_spectrograms(config: TrainConfig, count: int):
    """The spectrograms of the training split's first ``count`` records, in fixed order."""
    from tclf.data import reader

    batch = reader.make_dataset(config.records, "train", count, image_size=config.image_size)
    with reader.naming_corrupt_shards(config.records, "train"):
        inputs, _ = next(iter(batch))
    return inputs[schema.SPECTROGRAM_KEY]


def _batch_split(batch_size: int, replicas: int) -> str:
    """How tf.distribute splits each global batch over the replicas, for the log."""
    if replicas == 1:
        return ""
    low, high = batch_size // replicas, -(-batch_size // replicas)
    return (f"; {replicas} replicas, global batch {batch_size} = "
            f"{low if low == high else f'{low}-{high}'} per replica")


def _training_manifest(records_dir: str) -> dict:
    """The pack's manifest, checked for what training needs: every class in the training
    split (an error: the model could not learn it) and in the validation split (a warning:
    its validation scores would be empty, and early stopping blind to it)."""
    from tclf import report_skip

    manifest = schema.load_manifest(records_dir)
    counts = {side: manifest["splits"][side]["records"] for side in schema.SPLITS}
    if not all(counts.values()):
        raise InputError(f"{records_dir}: training needs records in both splits "
                         f"(train: {counts['train']}, val: {counts['val']})")
    missing = {side: [c for c in manifest["classes"]
                      if not manifest["splits"][side]["counts"].get(c)] for side in schema.SPLITS}
    if missing["train"]:
        raise InputError(f"{records_dir}: the training split has no records of "
                         f"{', '.join(missing['train'])}; re-pack with more tracks of it")
    if missing["val"]:
        report_skip(f"{records_dir}: the validation split has no records of "
                    f"{', '.join(missing['val'])}: its validation scores will be empty and early "
                    f"stopping cannot see it; re-pack with more tracks of it (or another "
                    f"--seed or --val-fraction)")
    return manifest


def run_schedule(model, train_data, val_data, config: TrainConfig, run: RunFolder,
                 workers: tuple[int, int] | None = None) -> None:
    """tclf-train's :func:`two_stages`: progress in the run's training_progress.txt, logs in
    its logs/, the checkpoint after every epoch, and the log rewritten after stage 1."""
    callbacks = []
    if config.data_service:
        from tclf.training.callbacks import StallWatch

        def stalled(message: str) -> None:  # From the watch's thread: the run is stuck.
            error = RunError(message)
            run.fail(error)
            print(f"Error: RunError: {message}", file=sys.stderr, flush=True)
            os._exit(1)  # The main thread waits in TensorFlow for a batch that will not come.

        callbacks.append(StallWatch(config.data_service_timeout, stalled, (
            f"no batch from the tf.data service at {config.data_service} for "
            f"{config.data_service_timeout:g} s (--data-service-timeout): its dispatcher or "
            f"workers stopped or cannot be reached; {run.resume_command()} continues the run "
            f"(with a running service, or --data-service '' to read the records here)")))
    two_stages(model, train_data, val_data, config, run.manifest, logs_dir=run.path("logs"),
               progress_path=run.path("training_progress.txt"), checkpoint=run.checkpoint,
               scratch=run.folder, stages=run.stages, callbacks=callbacks,
               after_stage1=run.write_log, workers=workers)


def two_stages(model, train_data, val_data, config: TrainConfig, manifest: dict, *,
               logs_dir: str, progress_path: str | None = None,
               callbacks=(), checkpoint=None, outputs=None, scratch: str | None = None,
               stages: list | None = None, after_stage1=None,
               workers: tuple[int, int] | None = None) -> list[StageResult]:
    """The fixed schedule, as tclf-train and every tclf-tune trial run it, with the class
    weights and steps per epoch of ``manifest``'s training split: stage 1 (on the
    backbone's outputs with config.stage1_cache: ``outputs``, computed beforehand, or
    computed here with their scratch file in ``scratch``), then stage 2, each epoch logged to
    TensorBoard in ``logs_dir`` on one epoch axis (stage 2's epochs follow stage 1's) and
    to ``progress_path``. ``callbacks`` go to both stages, stage 2's with its epochs
    numbered after stage 1's. ``workers`` (count, index): a multi-worker run, each worker
    computing the outputs of its own training records. Returns ``stages`` with the two
    StageResults appended."""
    from tclf.training.callbacks import OffsetEpochs, ProgressFile, StageTensorBoard

    stages = [] if stages is None else stages
    lines = checkpoint.progress if checkpoint else []

    def stage_callbacks(stage: int, offset: int) -> list:
        own = [StageTensorBoard(logs_dir, stage=stage, epoch_offset=offset)]
        if progress_path:
            own.insert(0, ProgressFile(progress_path, f"stage{stage}", lines))
        return [*own, *(OffsetEpochs(c, offset) if offset else c for c in callbacks)]

    counts = manifest["splits"]["train"]
    common = dict(steps_per_epoch=math.ceil(counts["records"] / config.batch_size),
                  class_weight=class_weights(counts["counts"], manifest["classes"]),
                  verbose=config.verbose, checkpoint=checkpoint, progress=lines,
                  mixup=config.mixup, label_smoothing=config.label_smoothing, seed=config.seed)
    stage1_options = dict(learning_rate=config.stage1_lr, epochs=config.stage1_epochs,
                          warmup_epochs=config.stage1_warmup_epochs,
                          patience=config.stage1_patience, callbacks=stage_callbacks(1, 0),
                          **common)
    if config.stage1_cache:
        stages.append(_cached_stage1(model, config, stage1_options, checkpoint, outputs,
                                     scratch, workers))
    else:
        stages.append(stage1(model, train_data, val_data, **stage1_options))
    if after_stage1:
        after_stage1()
    from tclf.model import is_random

    if is_random(config.weights) and not config.stage2_random_backbone:
        stages.append(StageResult("stage2", {}, 0, "skipped: the backbone is random (--weights "
                                  "none); --stage2-random-backbone runs it", time.time(), 0.0))
        return stages
    stages.append(stage2(
        model, train_data, val_data, num_layers=config.stage2_layers,
        learning_rate=config.stage2_lr, min_epochs=config.stage2_min_epochs,
        max_epochs=config.stage2_max_epochs, warmup_epochs=config.stage2_warmup_epochs,
        patience=config.stage2_patience, min_delta=config.stage2_min_delta,
        callbacks=stage_callbacks(2, stages[-1].epochs_run), **common))
    return stages


def _cached_stage1(model, config: TrainConfig, options: dict, checkpoint, outputs,
                   scratch: str | None, workers=None) -> StageResult:
    """Stage 1 on the backbone's outputs (tclf.backbone_cache): ``outputs`` if given (a
    search computes them once for all its trials), else computed here, and then stage 1's
    time includes the pass. A resumed run whose stage 1 had finished skips the pass."""
    from tclf.training.backbone_cache import backbone_outputs
    from tclf.model import freeze_backbone, heads_model

    freeze_backbone(model)
    heads = heads_model(model)
    saved = checkpoint.stage("stage1") if checkpoint else None
    if saved and saved.finished:
        return stage1(heads, None, None, **options)
    if outputs is not None:
        return stage1(heads, outputs.train.dataset(config.batch_size, True, config.seed),
                      outputs.val.dataset(config.batch_size), **options)
    with backbone_outputs(model, config.records, config.batch_size, config.image_size,
                          scratch, config.stage1_cache_mb,
                          progress=config.verbose > 0, workers=workers) as cached:
        if workers and workers[0] > 1:  # Each worker's pass took its own time.
            from tclf.training.cluster import barrier

            barrier("tclf-stage1-pass")
        result = stage1(heads, cached.train.dataset(config.batch_size, True, config.seed),
                        cached.val.dataset(config.batch_size), **options)
    return dataclasses.replace(result, started=min(result.started, cached.started),
                               seconds=result.seconds + cached.seconds,
                               prepare_seconds=cached.seconds)
