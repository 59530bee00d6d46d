"""The record schema: keys, splits, the manifest, and the segment shapes.

Every module takes these names from here: the feature keys, the writer
(:func:`create_example`) and the reader's description
(:func:`feature_description`) sit side by side, and `tclf.data` parses with
the latter. A record holds one segment:

=============  ========  =====================================================
key            type      content
=============  ========  =====================================================
spectrogram    bytes     the part_N.png file, byte for byte
features       float[]   the 10x68 matrix, row-major
label          int64     index into manifest["classes"]
track_id       bytes     "<class>/<track folder>"
segment        int64     N of part_N
=============  ========  =====================================================
"""

from __future__ import annotations


import numpy as np

from tclf import InputError
from tclf.audio import FEATURE_SHAPE, IMAGE_SIZE  # noqa: F401 (the segment shapes, re-exported)
from tclf.storage import join, read_json

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
    """Read RECORDS_DIR/manifest.json, with a clear error when it is missing."""
    tf = _tf()
    path = join(records_dir, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: {records_dir} is not a packed records folder "
                                f"(run `tclf-pack DATA_DIR {records_dir}`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        found = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise InputError(f"{path}: schema version {found}, this tclf reads {SCHEMA_VERSION}; "
                         f"re-run tclf-pack")
    return manifest
