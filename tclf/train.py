"""`tclf-train`: the fixed two-stage schedule (SPEC section 5) and the version folder (section 6).

Stage 1 trains the heads on a frozen backbone; stage 2 fine-tunes the last
20 backbone layers (BatchNormalization kept frozen) at a lower rate. Both are
:func:`run_stage` with different arguments, and :func:`train` is one readable
sequence: devices -> data -> model -> stage 1 -> stage 2 -> reports -> model.h5.
A Keras Tuner search calls the same :func:`build_model`, :func:`stage1` and
:func:`stage2`.

A version folder models/vX/ is complete when it holds model.h5: that file is
written last, after every report, and models/latest.h5 is replaced only after
it. A failed or interrupted run leaves vX/ without model.h5 (its
training_log.txt says why) and never touches latest.h5.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import time

import numpy as np

import tclf
from tclf import InputError, records, storage

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
_VERSION = re.compile(r"^v(\d+)$")


def option(default, help: str):
    """A TrainConfig field: its default and its help. The type is the annotation; tclf-train's
    options, `--hparams` files and the tuner are all derived from these fields."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; `--hparams FILE` may override any of them."""

    records: str = option("records", "Records folder written by tclf-pack.")
    models: str = option("models", "Folder receiving the version folders vN/ and latest.h5.")
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
    # Stage 1: frozen backbone.
    stage1_epochs: int = option(15, "Stage 1 (frozen backbone): maximum epochs.")
    stage1_lr: float = option(
        1e-4,
        "Stage 1: peak learning rate (Adam, warm-up then cosine decay).")
    stage1_warmup_epochs: float = option(1.0, "Stage 1: epochs of linear warm-up.")
    stage1_patience: int = option(
        3,
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
    verbose: int = option(
        1,
        "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.")

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with ``overrides`` (names with dashes or underscores), each value checked
        against its field's type: a JSON file's 2 is a fine float, its "299" no int."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {name.replace("-", "_"): value for name, value in overrides.items()}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InputError(f"unknown option(s) {unknown}; valid: "
                             f"{sorted(n.replace('_', '-') for n in fields)}")
        for name, value in values.items():
            kind = type(fields[name].default)
            if kind is float and type(value) is int:
                values[name] = float(value)
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
        if not 2 <= self.stage2_max_epochs or self.stage2_min_epochs > self.stage2_max_epochs:
            raise InputError(f"stage 2 epochs: need min <= max, got {self.stage2_min_epochs} and "
                             f"{self.stage2_max_epochs}")
        for name in ("image_size", "batch_size", "stage1_epochs", "stage2_max_epochs",
                     "cpu_devices"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        from tclf.model import backbone_layer_count

        if not 0 <= self.stage2_layers <= backbone_layer_count():
            raise InputError(f"stage2_layers must be 0-{backbone_layer_count()}, got "
                             f"{self.stage2_layers}")


# The tiny preset: a two-stage run in about a minute on 2 CPU cores (32x32 spectrograms, small
# layers, 1 + 1-2 epochs). For tests, smoke runs and benchmarks of the machinery, not of the
# model: TrainConfig().replace(**TINY) or `tclf-train --hparams` with it.
TINY = dict(weights="none", image_size=32, batch_size=8, stage1_epochs=1, stage2_min_epochs=1,
            stage2_max_epochs=2, stage2_patience=1, image_units=16, gru_units=16, gru2_units=8,
            feature_units=8, fusion_units=16, head_units=8, attention_heads=2)


def load_hparams(path: str) -> dict:
    """Options from a JSON object file (as the tuner writes them)."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a JSON object of option: value")
    return values


# ---------------------------------------------------------------------------
# Devices and precision.
# ---------------------------------------------------------------------------


def configure_devices(gpus: str = "all", cpu_devices: int = 1):
    """Pick the distribution strategy for `--gpus` (and `--cpu-devices`).

    "all": every visible GPU (MirroredStrategy; one GPU: that GPU; none: CPU).
    "none": CPU only. "0,1": those GPUs. Must run before TensorFlow touches a device.

    On the CPU, ``cpu_devices`` > 1 splits it into that many logical devices and
    mirrors over them: the multi-device path (MirroredStrategy, the global batch
    split across replicas, gradient all-reduce) runs on a machine without GPUs.
    It tests that path; it does not make training faster.

    Returns
    -------
    (strategy, description, on_gpu)
    """
    import tensorflow as tf

    if cpu_devices < 1:
        raise InputError(f"--cpu-devices must be >= 1, got {cpu_devices}")
    physical = tf.config.list_physical_devices("GPU")
    spec = str(gpus).strip().lower()
    if spec == "none":
        if physical:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                raise InputError("--gpus none: TensorFlow already started in this process with "
                                 "its GPUs visible; choose the devices before anything else "
                                 "uses TensorFlow (a new process, or CUDA_VISIBLE_DEVICES='')"
                                 ) from None
        return _cpu_strategy(cpu_devices, "--gpus none")
    if spec == "all":
        chosen = physical
    else:
        try:
            indices = sorted({int(i) for i in spec.split(",") if i.strip()})
        except ValueError:
            raise InputError(f"--gpus must be all, none or GPU indices like 0,1; got {gpus!r}")
        missing = [i for i in indices if i >= len(physical) or i < 0]
        if missing or not indices:
            raise InputError(f"--gpus {gpus}: this machine has {len(physical)} GPU(s) "
                             f"(indices 0-{len(physical) - 1})" if physical else
                             f"--gpus {gpus}: this machine has no GPU; use --gpus none")
        chosen = [physical[i] for i in indices]
        tf.config.set_visible_devices(chosen, "GPU")
    if not chosen:
        return _cpu_strategy(cpu_devices, "no GPU found")
    if cpu_devices > 1:
        raise InputError(f"--cpu-devices {cpu_devices} splits the CPU, but this run trains on "
                         f"{len(chosen)} GPU(s); add --gpus none to train on the split CPU")
    for device in chosen:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (ValueError, RuntimeError):
            pass
    logical = [f"/gpu:{i}" for i in range(len(chosen))]
    names = ", ".join(d.name for d in chosen)
    if len(chosen) == 1:
        return tf.distribute.OneDeviceStrategy(logical[0]), f"1 GPU ({names})", True
    return (tf.distribute.MirroredStrategy(logical),
            f"{len(chosen)} GPUs, MirroredStrategy ({names})", True)


def _cpu_strategy(cpu_devices: int, why: str):
    import tensorflow as tf

    if cpu_devices == 1:
        return tf.distribute.get_strategy(), f"CPU ({why})", False
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)])
    except RuntimeError:  # TensorFlow already started: fine if it has exactly that split.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != cpu_devices:
            raise InputError(f"--cpu-devices {cpu_devices}: TensorFlow already started in this "
                             f"process with {have} CPU device(s); the split must be set before "
                             f"anything else uses TensorFlow (start a new process)") from None
    logical = [f"/cpu:{i}" for i in range(cpu_devices)]
    return (tf.distribute.MirroredStrategy(logical),
            f"CPU split into {cpu_devices} logical devices, MirroredStrategy ({why})", False)


CPU_BFLOAT16_ENV = "TCLF_CPU_BFLOAT16"  # "1" / "0": override the CPU flag check below.
CPUINFO = "/proc/cpuinfo"


def cpu_supports_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX).

    The environment variable TCLF_CPU_BFLOAT16=1 or =0 overrides the check
    (to reproduce on one machine what `--precision auto` does on another).
    """
    forced = os.environ.get(CPU_BFLOAT16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise InputError(f"{CPU_BFLOAT16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:
        with open(cpuinfo or CPUINFO) as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str = "auto", on_gpu: bool = False) -> str:
    """The Keras dtype policy for `--precision`.

    auto: mixed_float16 on GPUs. On CPUs, mixed_bfloat16 only where the CPU
    computes in bfloat16 natively; elsewhere it is emulated and measured
    slower than float32 (BENCHMARKS.md), so float32.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if on_gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"


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


def _callbacks_module():
    import keras

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
        """One line per epoch in training_progress.txt, rewritten as training runs."""

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

    return EarlyStoppingAfter, ProgressFile


@dataclasses.dataclass
class StageResult:
    name: str
    history: dict
    epochs_run: int
    stop_reason: str
    started: float
    seconds: float


def run_stage(model, train_data, val_data, *, name: str, learning_rate: float, epochs: int,
              steps_per_epoch: int, warmup_epochs: float = 1.0, patience: int = 3,
              min_epochs: int = 0, class_weight=None, callbacks=(), verbose=1) -> StageResult:
    """Compile with Adam on a warm-up + cosine schedule and fit, with early stopping.

    Early stopping watches val_loss, restores the best epoch's weights and
    never stops before ``min_epochs``.
    """
    import keras

    EarlyStoppingAfter, _ = _callbacks_module()
    schedule = learning_rate_schedule(learning_rate, steps_per_epoch, epochs, warmup_epochs)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    stopper = EarlyStoppingAfter(min_epochs=min_epochs, monitor="val_loss", patience=patience,
                                 restore_best_weights=True)
    started = time.time()
    history = model.fit(train_data, validation_data=val_data, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, class_weight=class_weight, shuffle=False,
                        callbacks=[stopper, *callbacks], verbose=verbose)
    epochs_run = len(history.history.get("loss", []))
    if stopper.stopped_epoch > 0:
        reason = (f"early stopping: val_loss did not improve for {patience} epochs; "
                  f"restored the best epoch, {stopper.best_epoch + 1}")
    else:
        best = f"; restored the best epoch, {stopper.best_epoch + 1}" if epochs_run else ""
        reason = f"reached the maximum of {epochs} epochs{best}"
    return StageResult(name, dict(history.history), epochs_run, reason, started,
                       time.time() - started)


def stage1(model, train_data, val_data, *, steps_per_epoch: int, learning_rate: float = 1e-4,
           epochs: int = 15, warmup_epochs: float = 1.0, patience: int = 3, class_weight=None,
           callbacks=(), verbose=1) -> StageResult:
    """Stage 1: backbone frozen, heads trained at ``learning_rate``."""
    from tclf.model import freeze_backbone

    freeze_backbone(model)
    return run_stage(model, train_data, val_data, name="stage1", learning_rate=learning_rate,
                     epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs,
                     patience=patience, class_weight=class_weight, callbacks=callbacks,
                     verbose=verbose)


def stage2(model, train_data, val_data, *, steps_per_epoch: int, num_layers: int = 20,
           learning_rate: float = 1e-5, min_epochs: int = 3, max_epochs: int = 8,
           warmup_epochs: float = 1.0, patience: int = 2, class_weight=None, callbacks=(),
           verbose=1) -> StageResult:
    """Stage 2: the last ``num_layers`` backbone layers trainable (BatchNorm frozen)."""
    from tclf.model import unfreeze_top

    unfreeze_top(model, num_layers)
    return run_stage(model, train_data, val_data, name="stage2", learning_rate=learning_rate,
                     epochs=max_epochs, min_epochs=min_epochs, steps_per_epoch=steps_per_epoch,
                     warmup_epochs=warmup_epochs, patience=patience, class_weight=class_weight,
                     callbacks=callbacks, verbose=verbose)


# ---------------------------------------------------------------------------
# Version folders.
# ---------------------------------------------------------------------------


def claim_version_dir(models_dir: str) -> tuple[str, int]:
    """Create models/vX with X = 1 + the largest existing vN, atomically.

    Locally, os.mkdir either creates the folder or fails because another run
    got it first, in which case the next number is tried: two runs started
    together never share a folder. Folders not named vN are ignored.
    """
    import tensorflow as tf

    tf.io.gfile.makedirs(models_dir)
    while True:
        numbers = [int(m.group(1)) for n in tf.io.gfile.listdir(models_dir)
                   if (m := _VERSION.match(n.rstrip("/")))]
        number = max(numbers, default=0) + 1
        path = storage.join(models_dir, f"v{number}")
        if "://" in models_dir:  # Object stores have no atomic mkdir; best effort.
            if tf.io.gfile.exists(path):
                continue
            tf.io.gfile.makedirs(path)
            return path, number
        try:
            os.mkdir(path)
            return path, number
        except FileExistsError:
            continue


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


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _training_log(config, manifest, devices, precision, weights, stages, evaluation=None,
                  started=None, failure=None) -> str:
    lines = [f"tclf {tclf.__version__} training log", ""]
    lines.append(f"started: {_stamp(started)}")
    if stages or evaluation:
        lines.append(f"finished: {_stamp(time.time())}  "
                     f"(duration {time.time() - started:.1f} s)")
    lines += [f"devices: {devices}", f"precision: {precision}", f"records: {config.records}",
              f"classes: {', '.join(manifest['classes'])}",
              "training records per class: " + ", ".join(
                  f"{c}: {manifest['splits']['train']['counts'][c]}" for c in manifest["classes"]),
              "validation records per class: " + ", ".join(
                  f"{c}: {manifest['splits']['val']['counts'][c]}" for c in manifest["classes"]),
              "class weights: " + ", ".join(
                  f"{c}: {weights[i]:.4f}" for i, c in enumerate(manifest["classes"])), ""]
    for stage in stages:
        lines += [f"{stage.name}: {stage.epochs_run} epochs, {_stamp(stage.started)} -> "
                  f"{_stamp(stage.started + stage.seconds)} ({stage.seconds:.1f} s)",
                  f"  stopped: {stage.stop_reason}"]
    if evaluation is not None:
        lines += ["", f"validation accuracy (segments): {evaluation.segment_accuracy:.4f} "
                      f"over {evaluation.num_segments} segments",
                  f"validation accuracy (tracks): {evaluation.track_accuracy:.4f} "
                  f"over {evaluation.num_tracks} tracks",
                  f"validation macro F1 (segments / tracks): {evaluation.segment_macro_f1:.4f} / "
                  f"{evaluation.track_macro_f1:.4f}"]
    if failure:
        lines += ["", f"FAILED: {failure}", "No model.h5 was written; latest.h5 is unchanged."]
    lines += ["", "options:"] + [f"  {k}: {v}" for k, v in dataclasses.asdict(config).items()]
    return "\n".join(lines) + "\n"


def train(config: TrainConfig) -> TrainResult:
    """Run the two-stage schedule on config.records and write config.models/vX/.

    Sets Keras' global dtype policy for the run and puts the previous one back
    when it returns or fails, so that a run in a process leaves no trace in the next.
    """
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _train(config)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(config: TrainConfig) -> TrainResult:
    import keras
    import tensorflow as tf

    from tclf import data, reports
    from tclf.evaluate import predict_records
    from tclf.model import build_model, save_model

    config.validate()
    started = time.time()

    # --- Devices, precision, seeds -------------------------------------------------------------
    strategy, devices, on_gpu = configure_devices(config.gpus, config.cpu_devices)
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:  # tf.distribute splits each global batch over the replicas.
        low, high = config.batch_size // replicas, -(-config.batch_size // replicas)
        devices += (f"; {replicas} replicas, global batch {config.batch_size} = "
                    f"{low if low == high else f'{low}-{high}'} per replica")
    precision = resolve_precision(config.precision, on_gpu)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(config.seed)

    # --- Input pipeline ------------------------------------------------------------------------
    manifest = records.load_manifest(config.records)
    classes = manifest["classes"]
    n_train = manifest["splits"]["train"]["records"]
    if not n_train or not manifest["splits"]["val"]["records"]:
        raise InputError(f"{config.records}: training needs records in both splits "
                         f"(train: {n_train}, val: {manifest['splits']['val']['records']})")
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    train_data = data.make_dataset(config.records, "train", config.batch_size, training=True,
                                   image_size=config.image_size, cache=config.cache,
                                   seed=config.seed, repeat=True)
    val_data = data.make_dataset(config.records, "val", config.batch_size,
                                 image_size=config.image_size, cache=config.cache)
    weights = class_weights(manifest["splits"]["train"]["counts"], classes)

    # --- Version folder ------------------------------------------------------------------------
    version_dir, _ = claim_version_dir(config.models)
    out = lambda *names: storage.join(version_dir, *names)  # noqa: E731
    tf.io.gfile.makedirs(out("analysis"))
    stages: list[StageResult] = []
    write_log = lambda **kw: storage.write_atomic(  # noqa: E731
        out("training_log.txt"),
        _training_log(config, manifest, devices, precision, weights, stages, started=started,
                      **kw))
    write_log()
    config_record = {**dataclasses.asdict(config), "classes": classes, "devices": devices,
                     "extraction": manifest.get("extraction"),
                     "resolved_precision": precision, "tclf_version": tclf.__version__,
                     "version_dir": version_dir}
    try:
        # --- Model -----------------------------------------------------------------------------
        with strategy.scope():
            model = build_model(len(classes), manifest["feature_mean"], manifest["feature_std"],
                                feature_shape=manifest["feature_shape"], **config.model_options())
            _, ProgressFile = _callbacks_module()
            progress_lines: list[str] = []
            common = dict(steps_per_epoch=steps_per_epoch, class_weight=weights,
                          verbose=config.verbose)
            tensorboard = keras.callbacks.TensorBoard(out("logs"), write_graph=False)

            # --- Stage 1: frozen backbone ------------------------------------------------------
            with data.naming_corrupt_shards(config.records):
                stages.append(stage1(
                    model, train_data, val_data, learning_rate=config.stage1_lr,
                    epochs=config.stage1_epochs, warmup_epochs=config.stage1_warmup_epochs,
                    patience=config.stage1_patience,
                    callbacks=[ProgressFile(out("training_progress.txt"), "stage1",
                                            progress_lines), tensorboard], **common))
                write_log()

                # --- Stage 2: fine-tuning ------------------------------------------------------
                stages.append(stage2(
                    model, train_data, val_data, num_layers=config.stage2_layers,
                    learning_rate=config.stage2_lr, min_epochs=config.stage2_min_epochs,
                    max_epochs=config.stage2_max_epochs,
                    warmup_epochs=config.stage2_warmup_epochs, patience=config.stage2_patience,
                    callbacks=[ProgressFile(out("training_progress.txt"), "stage2",
                                            progress_lines), tensorboard], **common))

        # --- Reports ---------------------------------------------------------------------------
        probabilities, labels, track_ids = predict_records(model, config.records, "val",
                                                           config.batch_size, config.image_size)
        evaluation = reports.evaluate(probabilities, labels, track_ids, classes)
        title = f"{os.path.basename(version_dir.rstrip('/'))}: validation split of {config.records}"
        histories = [s.history for s in stages]
        for folder in (version_dir, out("analysis")):
            reports.write_evaluation(evaluation, folder, title=title)
            for metric in ("accuracy", "loss"):
                reports.plot_history(histories, metric, storage.join(folder, f"{metric}.png"),
                                     stage_names=["stage 1 (frozen)", "stage 2 (fine-tune)"])
        config_record["evaluation"] = evaluation.to_dict()
        storage.write_atomic(out("config.json"), json.dumps(config_record, indent=1,
                                                                  default=str))
        log_text = _training_log(config, manifest, devices, precision, weights, stages,
                                 evaluation, started)
        for folder in (version_dir, out("analysis")):
            storage.write_atomic(storage.join(folder, "training_log.txt"), log_text)

        # --- The model last: its presence marks the folder complete ----------------------------
        save_model(model, out("model.h5"), classes, config_record)
        storage.publish(out("model.h5"), storage.join(config.models, "latest.h5"))
    except BaseException as error:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else (
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        try:
            write_log(failure=reason)
        except Exception:
            pass
        raise
    return TrainResult(version_dir, out("model.h5"), evaluation, stages,
                       time.time() - started, devices, precision, model, replicas)
