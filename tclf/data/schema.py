"""The record schema: keys, splits, the manifest (checked, as a :class:`Pack`) and the segment
shapes. The writer (:func:`create_example`) and the reader's description
(:func:`feature_description`, which tclf.data.reader parses with) sit side by side. A record
holds one segment:

    spectrogram  bytes    the part_N.png file, byte for byte
    features     float[]  the FEATURE_SHAPE matrix (windows x columns), row-major
    label        int64    index into manifest["classes"]
    track_id     bytes    "<class>/<track folder>"
    segment      int64    N of part_N
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tclf import InputError, storage
from tclf.data.audio import (  # noqa: F401 (the segment shapes, re-exported)
    BACKBONES, EFFICIENTNET, FEATURE_SHAPE, IMAGE_SIZE, MUSICNN, MUSICNN_SCALE)

SCHEMA_VERSION = 1
SPECTROGRAM_KEY = "spectrogram"
FEATURES_KEY = "features"
LABEL_KEY = "label"
TRACK_ID_KEY = "track_id"
SEGMENT_KEY = "segment"
MANIFEST_NAME = "manifest.json"
EXTRACTION_SETTINGS_NAME = "extract.json"  # DATA_DIR/extract.json: tclf-extract's settings.
SPLITS = ("train", "val")


def _tf():
    import tensorflow as tf

    return tf


def create_example(png: bytes, features: np.ndarray, label: int, track_id: str,
                   segment: int) -> bytes:
    """Serialize one segment as a tf.train.Example."""
    tf = _tf()
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        SPECTROGRAM_KEY: feature(bytes_list=tf.train.BytesList(value=[png])),
        FEATURES_KEY: feature(float_list=tf.train.FloatList(
            value=np.asarray(features, np.float32).ravel())),
        LABEL_KEY: feature(int64_list=tf.train.Int64List(value=[int(label)])),
        TRACK_ID_KEY: feature(bytes_list=tf.train.BytesList(value=[track_id.encode()])),
        SEGMENT_KEY: feature(int64_list=tf.train.Int64List(value=[int(segment)])),
    })).SerializeToString()


def feature_description(feature_shape=FEATURE_SHAPE) -> dict:
    """The reader's view of :func:`create_example`, for tf.io.parse_single_example."""
    tf = _tf()
    return {
        SPECTROGRAM_KEY: tf.io.FixedLenFeature([], tf.string),
        FEATURES_KEY: tf.io.FixedLenFeature(list(feature_shape), tf.float32),
        LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
        TRACK_ID_KEY: tf.io.FixedLenFeature([], tf.string),
        SEGMENT_KEY: tf.io.FixedLenFeature([], tf.int64),
    }


def load_manifest(records_dir: str) -> dict:
    """Read RECORDS_DIR/manifest.json and check the structure the other modules rely on.

    A missing manifest is a FileNotFoundError; anything else wrong with it (not JSON, not an
    object, another schema version, a key missing or of the wrong type: see
    :func:`check_manifest`) is an InputError naming the file and what is wrong.
    """
    path = storage.join(records_dir, MANIFEST_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: {records_dir} is not a packed records folder "
                                f"(run `tclf-pack DATA_DIR {records_dir}`)")
    if storage.isdir(path):
        raise InputError(f"{path}: is a folder, not a manifest file; re-run tclf-pack")
    try:
        manifest = storage.read_json(path)
    except RecursionError:  # JSON nested thousands deep.
        raise InputError(f"{path}: not a valid JSON file (nested too deep)") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        what = (f"schema version {found!r}" if isinstance(manifest, dict)
                else f"holds a JSON {type(manifest).__name__}, not an object")
        raise InputError(f"{path}: {what}, this tclf reads schema version {SCHEMA_VERSION}; "
                         f"re-run tclf-pack")
    problem = check_manifest(manifest)
    if problem:
        raise InputError(f"{path}: {problem}; re-run tclf-pack")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**1000
    return isinstance(value, float) and math.isfinite(value)


def _shape_problem(manifest: dict, key: str, length: int) -> str | None:
    value = manifest.get(key)
    if (not isinstance(value, list) or len(value) != length
            or not all(_is_int(v) and v > 0 for v in value)):
        return f"{key!r} must be a list of {length} positive integers, found {value!r:.80}"
    return None


def check_manifest(manifest: dict) -> str | None:
    """What is wrong with a manifest's structure (None when nothing): the keys the reader,
    training and evaluation use, with their types: classes (distinct names), splits (train and
    val, each with records, counts per class, shards {file, records}, tracks), feature_shape,
    image_size, and feature_mean/std with one finite number per feature column."""
    classes = manifest.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        return f"'classes' must be a non-empty list of distinct names, found {classes!r:.80}"
    for key, length in (("feature_shape", 2), ("image_size", 3)):
        problem = _shape_problem(manifest, key, length)
        if problem:
            return problem
    columns = manifest["feature_shape"][1]
    for key in ("feature_mean", "feature_std"):
        value = manifest.get(key)
        if (not isinstance(value, list) or len(value) != columns
                or not all(_is_number(v) for v in value)):
            return (f"{key!r} must be a list of {columns} finite numbers (one per feature "
                    f"column), found {value!r:.80}")
    if any(v < 0 for v in manifest["feature_std"]):
        return "'feature_std' holds a negative value"
    backbone = manifest.get("backbone", EFFICIENTNET)
    if backbone not in BACKBONES:
        return f"'backbone' must be one of {', '.join(BACKBONES)}, found {backbone!r:.80}"
    scale = manifest.get("spectrogram_scale")
    if backbone == MUSICNN and scale != MUSICNN_SCALE:
        return (f"'spectrogram_scale' must be {MUSICNN_SCALE:g} (musicnn's log-mel x "
                f"{MUSICNN_SCALE:g}), found {scale!r:.80}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return f"'splits' must be an object with {' and '.join(SPLITS)}, found {splits!r:.80}"
    for side in SPLITS:
        info = splits.get(side)
        where = f"splits.{side}"
        if not isinstance(info, dict):
            return f"{where!r} is missing or not an object"
        if not _is_int(info.get("records")) or info["records"] < 0:
            return f"'{where}.records' must be a count, found {info.get('records')!r:.80}"
        counts = info.get("counts")
        if (not isinstance(counts, dict)
                or not all(_is_int(counts.get(c)) and counts[c] >= 0 for c in classes)):
            return f"'{where}.counts' must hold a count for every class, found {counts!r:.80}"
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and s["file"]
                and "/" not in s["file"] and "\\" not in s["file"] and s["file"] not in (".", "..")
                and _is_int(s.get("records")) and s["records"] >= 0 for s in shards):
            return (f"'{where}.shards' must be a list of {{\"file\": <name in the folder>, "
                    f"\"records\": <count>}}, found {shards!r:.80}")
        if sum(s["records"] for s in shards) != info["records"]:
            return (f"'{where}.records' is {info['records']} but its shards hold "
                    f"{sum(s['records'] for s in shards)}")
        tracks = info.get("tracks", [])
        if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
            return f"'{where}.tracks' must be a list of track ids, found {tracks!r:.80}"
    return None


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a pack: its record count, records per class, shard entries
    ({"file", "records", "bytes"}) and track ids."""

    records: int
    counts: dict
    shards: tuple
    tracks: tuple


@dataclasses.dataclass(frozen=True)
class Pack:
    """A records folder written by tclf-pack, its manifest read and checked once.

    Every stage after packing takes a Pack: the reader, the stage-1 pass, training and
    evaluation. ``stamp`` (the manifest's creation time) tells one pack from another."""

    path: str
    classes: tuple
    splits: dict  # "train" / "val" -> Split
    feature_shape: tuple
    feature_mean: list
    feature_std: list
    image_size: int  # The stored spectrograms' side (their height).
    stamp: str | None
    extraction: dict | None  # The extract.json settings of the data/ it was packed from.
    backbone: str = EFFICIENTNET  # The one its spectrograms are made for.
    spectrogram_shape: tuple = (IMAGE_SIZE, IMAGE_SIZE, 3)  # (height, width, channels)
    spectrogram_scale: float | None = None  # musicnn: stored integer = value * this.

    @classmethod
    def load(cls, path: str) -> "Pack":
        manifest = load_manifest(path)
        splits = {side: Split(info["records"], dict(info["counts"]), tuple(info["shards"]),
                              tuple(info.get("tracks", [])))
                  for side, info in manifest["splits"].items()}
        return cls(path, tuple(manifest["classes"]), splits, tuple(manifest["feature_shape"]),
                   list(manifest["feature_mean"]), list(manifest["feature_std"]),
                   manifest["image_size"][0], manifest.get("created"),
                   manifest.get("extraction"), manifest.get("backbone", EFFICIENTNET),
                   tuple(manifest["image_size"]), manifest.get("spectrogram_scale"))

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise InputError(f"{self.path}: no split {name!r}; the manifest has "
                             f"{sorted(self.splits)}")
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        return [storage.join(self.path, shard["file"]) for shard in self.split(split).shards]


def as_pack(records) -> Pack:
    """``records`` as a Pack: a Pack as it is, a folder loaded (for callers outside a run)."""
    return records if isinstance(records, Pack) else Pack.load(records)
