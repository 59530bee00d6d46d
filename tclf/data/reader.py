"""The tf.data reader of packed records.

One function, :func:`make_dataset`, builds every dataset; training and
evaluation differ only by its arguments. Elements are
``({"spectrogram": uint8 [B, H, W, 3], "features": float32 [B, *FEATURE_SHAPE]}, label)``,
keyed by the model's input names so a batch feeds the model as it is.
"""

from __future__ import annotations

import contextlib
import math
import re

import tensorflow as tf

from tclf import InputError, RunError, storage
from tclf.data import schema
from tclf.data.schema import FEATURES_KEY, LABEL_KEY, SPECTROGRAM_KEY, TRACK_ID_KEY

AUTOTUNE = tf.data.AUTOTUNE


def worker_shards(shards: list, workers: tuple[int, int] | None) -> list:
    """The shard files (or manifest entries) that worker ``index`` of ``count`` reads in a
    multi-worker run: every count-th, from the index-th on."""
    if not workers or workers[0] <= 1:
        return shards
    count, index = workers
    return shards[index::count]


def resize_image(image, image_size: int):
    """Resize uint8 images [..., H, W, 3] to image_size x image_size, staying uint8.

    The one resize used wherever a model smaller than IMAGE_SIZE is fed (reader, prediction).
    """
    resized = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_png(png, channels: int = 3):
    """A stored spectrogram: RGB uint8 [H, W, 3], or musicnn's uint16 [frames, 96, 1]."""
    return tf.io.decode_png(png, channels=channels,
                            dtype=tf.uint8 if channels == 3 else tf.uint16)


def decode_example(serialized: tf.Tensor, feature_shape, image_size: int | None = None,
                   include_track_id: bool = False, channels: int = 3):
    """Parse one serialized record and decode its PNG (:func:`decode_png`), not rescaled."""
    parsed = tf.io.parse_single_example(serialized, schema.feature_description(feature_shape))
    image = decode_png(parsed[SPECTROGRAM_KEY], channels)
    if image_size is not None:
        image = resize_image(image, image_size)
    inputs = {SPECTROGRAM_KEY: image, FEATURES_KEY: parsed[FEATURES_KEY]}
    label = tf.cast(parsed[LABEL_KEY], tf.int32)
    if include_track_id:
        return inputs, label, parsed[TRACK_ID_KEY]
    return inputs, label


def make_dataset(records, split: str = "train", batch_size: int = 32,
                 training: bool = False, image_size: int | None = None, cache: bool | str = False,
                 include_track_id: bool = False, shuffle_buffer: int = 256,
                 seed: int | None = None, repeat: bool = False, drop_remainder: bool = False,
                 options: tf.data.Options | None = None, workers: tuple[int, int] | None = None,
                 data_service: str | None = None, service_compression: str | None = None,
                 split_files: bool | None = None) -> tf.data.Dataset:
    """A batched, prefetched dataset over one split of ``records`` (a Pack or its folder).

    - ``training``: shuffled shards and records, non-deterministic interleave; else fixed order.
    - ``image_size``: resize the stored spectrograms (None keeps them). ``include_track_id``:
      yield (inputs, label, track_id), for track-level metrics.
    - ``cache``: keep decoded examples after the first epoch (True: memory, ~268 kB a
      record; a path: a cache file). ``repeat``: one endless stream, for steps_per_epoch.
    - ``shuffle_buffer``: in records; pack already spread them over the shards, so small.
    - ``workers`` (count, index): a multi-worker run; with ``split_files`` (default:
      ``training``) this worker reads its own shard files (every count-th), else
      tf.distribute keeps every count-th batch.
    - ``data_service``: a tf.data service dispatcher whose workers read and decode; batches
      travel uncompressed unless ``service_compression`` (BENCHMARKS.md: snappy halved the
      rate on loopback).
    """
    pack = schema.as_pack(records)
    split_files = training if split_files is None else split_files
    files = _shard_files(pack, split, workers if split_files and not data_service else None)
    options = _distribution_options(options, split_files, workers, data_service)
    # Only the mel images resize; musicnn reads its log-mel as stored.
    resize_to = (image_size if image_size and image_size != pack.image_size
                 and pack.backbone == schema.EFFICIENTNET else None)
    dataset = _decoded(files, pack.feature_shape, training, repeat, cache, shuffle_buffer, seed,
                       resize_to, include_track_id, pack.spectrogram_shape[2])
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder,
                            num_parallel_calls=AUTOTUNE, deterministic=not training)
    # Known length: Keras' progress bars and epoch ends rely on it. (Not in a multi-worker run
    # or from a tf.data service: the batches are split, and the assertion would count them
    # after the split.)
    if not repeat and not (workers and workers[0] > 1) and not data_service:
        records_in_split = pack.split(split).records
        batches = (records_in_split // batch_size if drop_remainder
                   else math.ceil(records_in_split / batch_size))
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    if data_service:
        dataset = dataset.apply(tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch", service=service_address(data_service),
            job_name=_service_job(workers, split, seed, pack.stamp, batch_size,
                                  image_size, cache, shuffle_buffer),
            compression=service_compression))
    dataset = dataset.prefetch(AUTOTUNE)
    if options is not None:
        dataset = dataset.with_options(options)
    return dataset


def _shard_files(pack, split: str, workers) -> list[str]:
    """The split's shard files, checked against the manifest's sizes; with ``workers``,
    this worker's share of them."""
    files = pack.shard_paths(split)
    if not files:
        raise InputError(f"{pack.path}: split {split!r} has no records")
    for shard, path in zip(pack.split(split).shards, files):
        if "bytes" in shard and storage.size(path) != shard["bytes"]:
            raise CorruptRecordsError(f"{path}: {storage.size(path)} bytes, the "
                                      f"manifest says {shard['bytes']} (truncated or replaced?); "
                                      f"re-run tclf-pack")
    if workers and workers[0] > 1:
        count, _ = workers
        if len(files) < count:
            raise InputError(f"{pack.path}: split {split!r} has {len(files)} shard file(s) "
                             f"for {count} workers; every worker reads its own shard files, so "
                             f"re-pack with --min-shards {count} or more")
        files = worker_shards(files, workers)
    return files


def _decoded(files, feature_shape, training, repeat, cache, shuffle_buffer, seed, resize_to,
             include_track_id, channels=3) -> tf.data.Dataset:
    """Decoded examples of ``files``, unbatched.

    Order, and why: shuffle file names (cheap) -> [repeat, when streaming and not caching: the
    stream never restarts, so the shuffle buffer is filled once, not once per epoch while the
    decoders wait] -> interleave reads of several shards in parallel -> [shuffle serialized
    records: half the memory of decoded ones] -> parse + decode in parallel -> [cache decoded
    -> repeat -> shuffle decoded, after the cache so each epoch differs]."""
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat and not cache:
        dataset = dataset.repeat()
    dataset = dataset.interleave(
        lambda path: _records_of(path), cycle_length=min(len(files), 16),
        block_length=1, num_parallel_calls=AUTOTUNE, deterministic=not training)
    if training and not cache:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        lambda x: decode_example(x, feature_shape, resize_to, include_track_id, channels),
        num_parallel_calls=AUTOTUNE, deterministic=not training)
    if cache:
        dataset = dataset.cache("" if cache is True else cache)
        if repeat:
            dataset = dataset.repeat()
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return dataset


def service_address(address: str) -> str:
    """A dispatcher's address as tf.data wants it: grpc://host:port."""
    address = address.strip()
    if not re.fullmatch(r"(grpc://)?[^\s:/]+:\d+", address):
        raise InputError(f"--data-service {address!r}: expected the dispatcher's host:port, "
                         f"e.g. grpc://10.0.0.5:5050")
    return address if address.startswith("grpc://") else f"grpc://{address}"


def check_service(address: str, timeout: float) -> None:
    """Fail with one line unless something answers at the dispatcher's address (a TCP
    connection) within ``timeout`` seconds: a typo or a stopped dispatcher is said at once
    instead of a silent wait."""
    import socket
    import time

    host, port = service_address(address).split("://", 1)[1].rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(10.0, timeout)).close()
            return
        except OSError as error:
            if time.monotonic() + 1.0 > deadline:
                raise RunError(f"--data-service {address}: no tf.data service dispatcher "
                               f"answers there within {timeout:g} s "
                               f"({error.strerror or error}); start one with `tclf "
                               f"data-service dispatcher --port {port}`, or check the "
                               f"address") from None
            time.sleep(1.0)


def _service_job(workers, split: str, seed, *settings) -> str | None:
    """One shared job for the tasks of a cluster (each batch to one of them): named by the
    cluster (TF_CONFIG without its task) and the reader's settings, the same on every task;
    alone, an anonymous job of this process."""
    if not workers or workers[0] <= 1:
        return None
    import hashlib
    import json
    import os

    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    key = json.dumps([cluster, split, seed, *settings], sort_keys=True, default=str)
    return f"tclf-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _distribution_options(options, split_files: bool, workers,
                          data_service) -> tf.data.Options:
    """How tf.distribute splits the dataset between workers: not at all where this module
    has split it (a worker's own shard files, or the tf.data service's shared job); else
    by batches (DATA), in the records' fixed order."""
    if not workers or workers[0] <= 1:
        return options
    options = options or tf.data.Options()
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = (
        policy.OFF if split_files or data_service else policy.DATA)
    return options


def _records_of(path: tf.Tensor) -> tf.data.Dataset:
    # A large read buffer: shards are read sequentially, and several at once.
    return tf.data.TFRecordDataset(path, buffer_size=4 * 2**20)


class CorruptRecordsError(RunError):
    """A shard of a pack cannot be read; the message names it."""


@contextlib.contextmanager
def naming_corrupt_shards(records, split: str | None = None):
    """Turn TF's anonymous "corrupted record at N" into an error naming the shard.

    TFRecordDataset reports a broken record without its file, so on such an
    error the split's shards are read once more, one by one, to find it.
    """
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        if not (isinstance(error, tf.errors.DataLossError) or "corrupt" in error.message.lower()
                or "png" in error.message.lower()):
            raise  # Not a data error (a shape mismatch, say): no point re-reading every shard.
        broken = verify_shards(records, split)
        if not broken:
            raise
        where = "; ".join(f"{path}: {message}" for path, message in broken)
        raise CorruptRecordsError(f"corrupt records shard {where} "
                                  f"(re-run tclf-pack to rebuild it)") from error


def verify_shards(records, split: str | None = None) -> list[tuple[str, str]]:
    """Read every shard of a pack end to end. Returns (shard, error) for the broken ones."""
    pack = schema.as_pack(records)
    broken = []
    for side in [split] if split else list(pack.splits):
        for path in pack.shard_paths(side):
            try:
                for record in tf.data.TFRecordDataset(path):
                    decode_png(tf.io.parse_single_example(
                        record, schema.feature_description(pack.feature_shape))[
                            SPECTROGRAM_KEY], pack.spectrogram_shape[2])
            except (tf.errors.DataLossError, tf.errors.OpError) as error:
                message = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|name: *$", "", error.message)
                broken.append((path, message.splitlines()[0].strip()))
    return broken
