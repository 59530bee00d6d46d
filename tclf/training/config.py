"""TrainConfig: every option of a training run, with its type, default, help and group.

tclf-train's options, `--hparams` files, the tuner's space and what `--resume` may change
are all derived from these fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers

from tclf import InputError, storage
from tclf.data.audio import EFFICIENTNET
from tclf.model import backbone_layer_count, build_model
from tclf.training.devices import PRECISIONS

# The groups of options.
PLACE = "place"  # Where the run goes, never what it computes.
MODEL = "model"
TRAINING = "training"  # Both stages.
STAGE1 = "stage1"
STAGE2 = "stage2"


def option(group: str, default, help: str, flag: str | None = None):
    """A TrainConfig field: its group, its default (whose type is the option's), its help and
    (if not --name-with-dashes) its flag."""
    return dataclasses.field(default=default,
                             metadata={"group": group, "help": help, "flag": flag})


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run; `--hparams FILE` may override any of them."""

    # Where the run goes: paths, devices, cluster, data service, output. `--resume` may change
    # these, and a search leaves them out of best_hparams.json.
    records: str = option(PLACE, "records", "Records folder written by tclf-pack.")
    models: str = option(PLACE, "models", "Folder receiving the version folders vN/ and latest.h5.",
                         flag="--models-dir")
    gpus: str = option(
        PLACE, "all",
        "all (every GPU; CPU if none), none (CPU), or GPU indices like 0,1. Several GPUs train "
        "with MirroredStrategy.")
    cpu_devices: int = option(
        PLACE, 1,
        "When training on the CPU: split it into this many logical devices and mirror over them "
        "(MirroredStrategy), to run the multi-device path without GPUs. For testing; not "
        "faster.")
    data_service: str = option(
        PLACE, "",
        "host:port of a tf.data service dispatcher (tclf-data-service): its workers read and "
        "decode the training records instead of this process (docs/cluster.md).")
    data_service_timeout: float = option(
        PLACE, 300.0,
        "With --data-service: seconds the run waits for the service (its dispatcher at the "
        "start, a batch from it while training) before it fails with one line, resumable.")
    cluster_timeout: float = option(
        PLACE, 600.0,
        "Multi-worker runs (TF_CONFIG): seconds a worker waits for the others (at start-up, at "
        "every step's all-reduce, at the end) before the whole run fails.")
    verbose: int = option(
        PLACE, 1,
        "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.")

    # The model.
    weights: str = option(
        MODEL, "imagenet",
        "Backbone initialization: imagenet = its pretrained weights (EfficientNetB0: "
        "ImageNet's, downloaded once to ~/.keras/models; musicnn: the Million Song Dataset's, "
        "from the musicnn package), none (random), or the path of a weights file. The "
        "backbone is the records' (tclf extract --backbone).")
    image_size: int = option(
        MODEL, 299,
        "EfficientNetB0: side of the square spectrogram input; records are resized if it "
        "differs from 299. (musicnn reads its log-mel as stored.)")
    image_units: int = option(MODEL, 128, "Units of the image branch's Dense layer.")
    gru_units: int = option(MODEL, 128, "Units of the first GRU (returns sequences).")
    gru2_units: int = option(MODEL, 64, "Units of the second GRU.")
    feature_units: int = option(MODEL, 64, "Units of the feature branch's Dense layer.")
    fusion_units: int = option(MODEL, 128, "Units of the first fusion Dense layer.")
    head_units: int = option(MODEL, 64, "Units of the second fusion Dense layer.")
    attention_heads: int = option(MODEL, 4, "Heads of the self-attention over the 10 windows.")
    dropout: float = option(MODEL, 0.4, "Dropout rate after the first fusion layer.")
    random_backbone_stats: int = option(
        MODEL, 96,
        "With --weights none: set the random backbone's BatchNormalization statistics from "
        "this many training spectrograms (one forward pass) before stage 1. Left at their "
        "initial values they shrink its outputs to ~1e-5 and silence the image branch "
        "(docs/real-music.md). 0 keeps them. No effect on pretrained weights.")

    # Training, both stages.
    precision: str = option(
        TRAINING, "auto",
        "Dtype policy: auto = mixed_float16 on GPUs; on CPUs mixed_bfloat16 where the CPU has "
        "native bfloat16 (AVX512-BF16/AMX), else float32. The feature normalization and the "
        "softmax always compute in float32.")
    batch_size: int = option(TRAINING, 32,
                             "Global batch size: with N GPUs each gets batch_size / N.")
    seed: int = option(TRAINING, 0, "Seed of weights initialization and data order.")
    cache: bool = option(
        TRAINING, False,
        "Keep decoded training examples in memory after the first epoch (about 270 kB per "
        "segment).")
    mixup: float = option(
        TRAINING, 0.4,
        "Mixup in both stages' training steps: each example blended with another of its "
        "batch, inputs and labels, by a weight drawn from Beta(alpha, alpha); this is alpha "
        "(0: off). Validation and prediction never mix (docs/real-music.md).")
    label_smoothing: float = option(
        TRAINING, 0.1,
        "Training targets put 1 - this on the true style and spread this over all styles "
        "(0: off).")
    calibrate: bool = option(
        TRAINING, True,
        "After training, fit a temperature to the validation segments so that the "
        "probabilities match how often the model is right; stored in model.h5, applied by "
        "tclf-eval and tclf-predict (docs/real-music.md).")
    deterministic: bool = option(
        TRAINING, False,
        "TensorFlow's op determinism (and a deterministic input pipeline): with the same "
        "--seed, records, machine and software, a run repeats bit for bit, on the CPU and on "
        "GPUs, at some cost in speed. Without it, --seed fixes the initial weights, the "
        "split of the data and its order, but parallel reading and GPU kernels still vary "
        "the results slightly. Stays on for the rest of the process.")

    # Stage 1: the backbone frozen.
    stage1_cache: bool = option(
        STAGE1, True,
        "Stage 1: compute the frozen backbone's outputs of every record once, then train the "
        "rest of the model on them (the weights are the same layers'). --no-stage1-cache runs "
        "the backbone on every record in every epoch.")
    stage1_cache_mb: float = option(
        STAGE1, 2048.0,
        "Stage 1 cache: above this many MB (about 7.9 kB a record) the backbone outputs go to "
        "a scratch file in the version folder instead of memory.")
    stage1_epochs: int = option(
        STAGE1, 60,
        "Stage 1 (frozen backbone): maximum epochs, a budget for early stopping to end "
        "(docs/commands.md: how it was chosen). The cosine schedule spans it.")
    stage1_lr: float = option(
        STAGE1, 1e-4,
        "Stage 1: peak learning rate (Adam, warm-up then cosine decay).")
    stage1_warmup_epochs: float = option(STAGE1, 1.0, "Stage 1: epochs of linear warm-up.")
    stage1_patience: int = option(
        STAGE1, 8,
        "Stage 1: early-stopping patience on val_loss (best weights restored).")

    # Stage 2: the top of the backbone fine-tuned.
    stage2_layers: int = option(
        STAGE2, 20,
        "Stage 2: number of last backbone layers unfrozen (BatchNorm stays frozen).")
    stage2_lr: float = option(STAGE2, 1e-5, "Stage 2: peak learning rate.")
    stage2_warmup_epochs: float = option(STAGE2, 1.0, "Stage 2: epochs of linear warm-up.")
    stage2_min_epochs: int = option(STAGE2, 3,
                                    "Stage 2: minimum epochs before early stopping may stop it.")
    stage2_max_epochs: int = option(STAGE2, 8, "Stage 2: maximum epochs.")
    stage2_patience: int = option(STAGE2, 2, "Stage 2: early-stopping patience on val_loss.")
    stage2_random_backbone: bool = option(
        STAGE2, False,
        "With --weights none, run stage 2 anyway. Skipped by default: fine-tuning the top of a "
        "random backbone at stage 2's rate changed nothing on real music (docs/real-music.md)"
        " and costs a full backbone pass per epoch.")
    stage2_min_delta: float = option(
        STAGE2, 1e-3,
        "Stage 2: the smallest fall in val_loss that counts as an improvement for early "
        "stopping (an epoch of stage 2 costs a full backbone pass; docs/commands.md).")

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

    @classmethod
    def group(cls, name: str) -> tuple[str, ...]:
        """The names of one group's options, in order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["group"] == name)

    def without_place(self) -> dict:
        """The options that shape what a run computes: all but the PLACE group."""
        place = self.group(PLACE)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in place}

    def model_options(self) -> dict:
        """The fields that are arguments of tclf.model.build_model, by name."""
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

    def validate_model_options(self, backbone: str = EFFICIENTNET) -> None:
        """The checks that build a backbone (so they start TensorFlow: after the devices), for
        the pack's ``backbone``."""
        count = backbone_layer_count(backbone)
        if not 0 <= self.stage2_layers <= count:
            raise InputError(f"stage2_layers must be 0-{count} for the {backbone} backbone, "
                             f"got {self.stage2_layers}")


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
