"""Stage 1's backbone outputs, computed once (tclf-train's `--stage1-cache`, the default).

The frozen backbone gives a spectrogram the same pooled output (1,280 values) in every epoch
(tclf.model keeps it in inference mode), so stage 1 computes those of every training and
validation record in one batched pass, on the training devices and in the training precision,
then trains ``tclf.model.heads_model`` on (backbone output, features) pairs. They are kept in
memory (:func:`record_bytes` a record) or, above ``memory_mb``, in a scratch TFRecord file in
the version folder, deleted when the stage ends, whether it succeeds or fails (after a kill:
by the next resume or completion of the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import numpy as np

from tclf import storage
from tclf.data import reader, schema
from tclf.model import BACKBONE_OUTPUT_KEY, backbone_of, image_encoder
from tclf.training import layout



@dataclasses.dataclass
class CachedSplit:
    """One split's backbone outputs, features and labels: arrays, or a scratch file."""

    records: int
    arrays: tuple | None = None  # (outputs [N, width], features [N, *feature_shape], labels [N])
    path: str | None = None
    shape: tuple = ()  # (width, feature_shape) for reading the scratch file.
    # In a multi-worker run: how tf.distribute splits it between the workers, "OFF" for a
    # worker's own share of the training records, "DATA" for the whole validation split.
    sharding: str | None = None

    def dataset(self, batch_size: int, training: bool = False, seed: int | None = None):
        """({"backbone_output", "features"}, label) batches; training: shuffled, repeated."""
        import tensorflow as tf

        if self.arrays is not None:
            outputs, features, labels = self.arrays
            data = tf.data.Dataset.from_tensor_slices(
                ({BACKBONE_OUTPUT_KEY: outputs, schema.FEATURES_KEY: features}, labels))
            buffer = self.records
        else:
            width, feature_shape = self.shape
            description = {
                BACKBONE_OUTPUT_KEY: tf.io.FixedLenFeature([width], tf.float32),
                schema.FEATURES_KEY: tf.io.FixedLenFeature(list(feature_shape), tf.float32),
                schema.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}

            def parse(serialized):
                example = tf.io.parse_single_example(serialized, description)
                return ({BACKBONE_OUTPUT_KEY: example[BACKBONE_OUTPUT_KEY],
                         schema.FEATURES_KEY: example[schema.FEATURES_KEY]},
                        tf.cast(example[schema.LABEL_KEY], tf.int32))

            data = tf.data.TFRecordDataset(self.path).map(parse,
                                                           num_parallel_calls=tf.data.AUTOTUNE)
            buffer = min(self.records, 8192)
        if training:
            data = data.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        data = data.batch(batch_size)
        if not training and not self.sharding:
            data = data.apply(tf.data.experimental.assert_cardinality(
                math.ceil(self.records / batch_size)))
        data = data.prefetch(tf.data.AUTOTUNE)
        if self.sharding:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = getattr(
                tf.data.experimental.AutoShardPolicy, self.sharding)
            data = data.with_options(options)
        return data


@dataclasses.dataclass
class BackboneOutputs:
    train: CachedSplit
    val: CachedSplit
    started: float
    seconds: float


def record_bytes(width: int, feature_shape) -> int:
    """Memory per record: its backbone output, features (float32) and label."""
    return 4 * (width + int(np.prod(feature_shape))) + 4


@contextlib.contextmanager
def backbone_outputs(model, records, batch_size: int, image_size: int, folder: str,
                     memory_mb: float = 2048.0, progress: bool = True,
                     workers: tuple[int, int] | None = None):
    """Compute the backbone outputs of both splits of ``records`` (a Pack) with ``model``'s
    backbone; yield a BackboneOutputs; delete any scratch files in ``folder`` when the block ends.

    In a multi-worker run (``workers`` = (count, index)) each worker computes, on its own
    devices and with no collective, the outputs of the training records it reads in stage 2
    (its shard files) and of the whole validation split; stage 1 then trains each worker on
    its own share, as stage 2 does."""
    pack = schema.as_pack(records)
    width = int(backbone_of(model).output.shape[-1])
    feature_shape = pack.feature_shape
    total = sum(pack.split(side).records for side in schema.SPLITS)
    in_memory = total * record_bytes(width, feature_shape) <= memory_mb * 2**20
    paths = {side: storage.join(folder, layout.STAGE1_SCRATCH.format(split=side))
             for side in schema.SPLITS}
    remove_scratch(folder)  # A killed run's.
    try:
        started = time.time()
        step = _encode_step(image_encoder(model))
        splits = {side: _compute(step, pack, side, batch_size, image_size,
                                 width, feature_shape, None if in_memory else paths[side],
                                 progress, workers)
                  for side in schema.SPLITS}
        yield BackboneOutputs(splits["train"], splits["val"], started, time.time() - started)
    finally:
        remove_scratch(folder)


def remove_scratch(folder: str) -> None:
    for side in schema.SPLITS:
        storage.remove_quietly(storage.join(folder, layout.STAGE1_SCRATCH.format(split=side)))


def _encode_step(encoder):
    """One replica's step: (inputs, label) -> (backbone outputs, features, label). Traced
    once for both splits; reduce_retracing makes the last, smaller batch of a split share
    the trace of the others instead of tracing EfficientNet again."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(inputs, label):
        return (tf.cast(encoder(inputs[schema.SPECTROGRAM_KEY], training=False), tf.float32),
                inputs[schema.FEATURES_KEY], label)

    return step


def _batches(step, dataset, local: bool = False):
    """(backbone outputs, features, labels) as numpy arrays, one global batch at a time, in
    the dataset's order. Each batch is split over the strategy's replicas (the training
    devices) and gathered back in order; Keras' predict_on_batch would give every replica
    the whole batch. ``local``: on this process's default device, without the strategy."""
    import tensorflow as tf

    if local:
        for inputs, label in dataset:
            yield tuple(part.numpy() for part in step(inputs, label))
        return
    strategy = tf.distribute.get_strategy()
    for inputs, label in strategy.experimental_distribute_dataset(dataset):
        parts = strategy.run(step, (inputs, label))
        yield tuple(strategy.gather(part, axis=0).numpy() for part in parts)


def _compute(step, pack, split, batch_size, image_size, width,
             feature_shape, path, progress, workers=None) -> CachedSplit:
    import tensorflow as tf
    from tqdm import tqdm

    count = pack.split(split).records
    sharding = None
    if workers and workers[0] > 1:  # The training split: this worker's shard files only.
        mine = split == "train"
        sharding = "OFF" if mine else "DATA"
        if mine:
            count = sum(shard["records"] for shard in
                        reader.worker_shards(pack.split(split).shards, workers))
    dataset = reader.make_dataset(pack, split, batch_size, image_size=image_size,
                                workers=workers if sharding == "OFF" else None,
                                split_files=True)
    bar = tqdm(total=count, unit="record", desc=f"stage 1: backbone outputs ({split})",
               disable=not progress)
    done = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(reader.naming_corrupt_shards(pack, split))
        if path is None:
            outputs = np.empty((count, width), np.float32)
            features = np.empty((count, *feature_shape), np.float32)
            labels = np.empty((count,), np.int32)
        else:
            writer = stack.enter_context(tf.io.TFRecordWriter(path))
        for batch_outputs, batch_features, batch_labels in _batches(step, dataset,
                                                                     local=bool(sharding)):
            n = len(batch_labels)
            if path is None:
                outputs[done:done + n] = batch_outputs
                features[done:done + n] = batch_features
                labels[done:done + n] = batch_labels
            else:
                for i in range(n):
                    writer.write(_example(batch_outputs[i], batch_features[i],
                                          int(batch_labels[i])))
            done += n
            bar.update(n)
    bar.close()
    if path is None:
        return CachedSplit(done, arrays=(outputs[:done], features[:done], labels[:done]),
                           sharding=sharding)
    return CachedSplit(done, path=path, shape=(width, feature_shape), sharding=sharding)


def _example(output, features, label) -> bytes:
    import tensorflow as tf

    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        BACKBONE_OUTPUT_KEY: feature(float_list=tf.train.FloatList(value=output.ravel())),
        schema.FEATURES_KEY: feature(float_list=tf.train.FloatList(value=features.ravel())),
        schema.LABEL_KEY: feature(int64_list=tf.train.Int64List(value=[label])),
    })).SerializeToString()
