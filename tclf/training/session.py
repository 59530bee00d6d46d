"""The set-up every training process shares: tclf-train's run and each tclf-tune search.

A :class:`Session` configures the devices (the strategy), resolves the precision and sets
Keras' dtype policy, seeds, and holds the pack; it puts the previous policy back when it
ends, so that a run leaves no trace in the next one in the same process.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tclf import InputError, RunError, report_skip, storage
from tclf.data import reader, schema
from tclf.model import backbone_of, build_model, calibrate_backbone, freeze_backbone, is_random
from tclf.training.backbone_cache import backbone_outputs
from tclf.training.config import TrainConfig
from tclf.training.devices import configure_devices, resolve_precision


class Session:
    """``with Session(config, cluster) as session:`` the devices, precision, policy and
    seeds set for ``config``; then ``session.load_pack()``."""

    def __init__(self, config: TrainConfig, cluster=None):
        self.config, self.cluster = config, cluster
        self.pack = None

    def __enter__(self) -> "Session":
        self._previous_policy = keras.mixed_precision.global_policy()
        config = self.config
        self.strategy, devices, on_gpu = configure_devices(
            config.gpus, config.cpu_devices, self.cluster, config.cluster_timeout)
        self.devices = devices + _batch_split(config.batch_size,
                                              self.strategy.num_replicas_in_sync)
        self.precision = resolve_precision(config.precision, on_gpu)
        try:
            keras.mixed_precision.set_global_policy(self.precision)
            seed_everything(config)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *error) -> None:
        keras.mixed_precision.set_global_policy(self._previous_policy)

    def load_pack(self, resume: str | None = None) -> schema.Pack:
        """config.records, checked for training (:func:`training_pack`), and the options
        that depend on its backbone."""
        self.pack = training_pack(self.config.records, resume)
        self.config.validate_model_options(self.pack.backbone)  # Builds a backbone.
        return self.pack

    @contextlib.contextmanager
    def shared_stage1(self, scratch: str, progress: bool):
        """Stage 1's backbone outputs of the whole pack, computed once for many trials:
        yields (the backbone's weights, the outputs); a search's trials depend on neither
        (the image size, weights and seed are fixed for it)."""
        with contextlib.ExitStack() as stack:
            with self.strategy.scope():
                model = model_for(self.config, self.pack)
            freeze_backbone(model)
            weights = backbone_of(model).get_weights()
            # The scope only around the pass: the trials' clear_session() resets the graph
            # that a scope left open would be popped from.
            with self.strategy.scope():
                outputs = stack.enter_context(backbone_outputs(
                    model, self.pack, self.config.batch_size, self.config.image_size,
                    scratch, self.config.stage1_cache_mb, progress=progress))
            del model
            yield weights, outputs


def seed_everything(config: TrainConfig) -> None:
    """Python's, NumPy's and TensorFlow's seeds from --seed; with --deterministic also
    TensorFlow's op determinism, which also makes tf.data deterministic (for the process:
    TensorFlow offers no public way back)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def training_pack(records: str, resume: str | None = None) -> schema.Pack:
    """The pack at ``records``, checked for what training needs: every class in the training
    split (an error: the model could not learn it) and in the validation split (a warning:
    its validation scores would be empty, and early stopping blind to it)."""
    if resume and not storage.exists(storage.join(records, schema.MANIFEST_NAME)):
        raise RunError(f"{records}: the records {resume} was trained on are not there "
                       f"(no {schema.MANIFEST_NAME}); give --records where that pack is now "
                       f"(packing again makes another pack, which a resume refuses)")
    pack = schema.Pack.load(records)
    counts = {side: pack.split(side).records for side in schema.SPLITS}
    if not all(counts.values()):
        raise InputError(f"{records}: training needs records in both splits "
                         f"(train: {counts['train']}, val: {counts['val']})")
    missing = {side: [c for c in pack.classes if not pack.split(side).counts.get(c)]
               for side in schema.SPLITS}
    if missing["train"]:
        raise InputError(f"{records}: the training split has no records of "
                         f"{', '.join(missing['train'])}; re-pack with more tracks of it")
    if missing["val"]:
        report_skip(f"{records}: the validation split has no records of "
                    f"{', '.join(missing['val'])}: its validation scores will be empty and early "
                    f"stopping cannot see it; re-pack with more tracks of it (or another "
                    f"--seed or --val-fraction)")
    return pack


def model_for(config: TrainConfig, pack, calibrate: bool = True):
    """tclf.model.build_model with config's model options, for ``pack``'s classes and
    features; a random backbone's statistics set from the first training records (in the
    pack's fixed order, the same on every worker and on a resume) unless not ``calibrate``."""
    model = build_model(len(pack.classes), pack.feature_mean, pack.feature_std,
                        feature_shape=pack.feature_shape, backbone=pack.backbone,
                        segment_seconds=(pack.extraction or {}).get("segment_seconds", 10.0),
                        **config.model_options())
    if calibrate and is_random(config.weights) and config.random_backbone_stats > 0:
        calibrate_backbone(model, first_spectrograms(config, pack, config.random_backbone_stats))
    return model


def first_spectrograms(config: TrainConfig, pack, count: int):
    """The spectrograms of the training split's first ``count`` records, in fixed order."""
    batch = reader.make_dataset(pack, "train", count, image_size=config.image_size)
    with reader.naming_corrupt_shards(pack, "train"):
        inputs, _ = next(iter(batch))
    return inputs[schema.SPECTROGRAM_KEY]


def make_datasets(config: TrainConfig, pack, cluster=None):
    """(training, validation) datasets of ``pack``, as both stages read them; in a
    multi-worker run (``cluster``), the training records split between the workers by shard
    file and the validation batches by tf.distribute."""
    workers = (cluster.workers, cluster.index) if cluster else None
    train_data = reader.make_dataset(pack, "train", config.batch_size, training=True,
                                     image_size=config.image_size, cache=config.cache,
                                     seed=config.seed, repeat=True, workers=workers,
                                     data_service=config.data_service or None)
    val_data = reader.make_dataset(pack, "val", config.batch_size,
                                   image_size=config.image_size, cache=config.cache,
                                   workers=workers)
    return train_data, val_data


def _batch_split(batch_size: int, replicas: int) -> str:
    """How tf.distribute splits each global batch over the replicas, for the log."""
    if replicas == 1:
        return ""
    low, high = batch_size // replicas, -(-batch_size // replicas)
    return (f"; {replicas} replicas, global batch {batch_size} = "
            f"{low if low == high else f'{low}-{high}'} per replica")
