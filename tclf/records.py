"""`tclf-pack`: data/<class>/<track>/part_N.{png,npy} -> sharded TFRecords + manifest.json.

The record layout is tclf.schema's; its names are re-exported here.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import re
import time
import uuid

import numpy as np

import tclf
from tclf import InputError, RunError, report_skip
from tclf.audio import FEATURE_SHAPE, IMAGE_SIZE
from tclf.schema import (  # noqa: F401 (re-exported)
    EXTRACTION_SETTINGS_NAME, FEATURES_KEY, LABEL_KEY, MANIFEST_NAME, SCHEMA_VERSION, SEGMENT_KEY,
    SPECTROGRAM_KEY, SPLITS, TRACK_ID_KEY, create_example, feature_description, load_manifest)
from tclf.splits import read_groups, split_tracks
from tclf.storage import join, read_json


def _tf():
    import tensorflow as tf

    return tf


_PART = re.compile(r"^part_(\d+)\.(png|npy)$")


# ---------------------------------------------------------------------------
# Scanning and validating data/.
# ---------------------------------------------------------------------------


Sample = collections.namedtuple("Sample", "label track_id segment png_path npy_path")


def scan_data(data_dir: str) -> tuple[list[str], list[Sample], collections.Counter]:
    """Classes (sub-folders with at least one pair), every png/npy pair of DATA_DIR, and the
    count of what was skipped per class folder.

    A png without its npy (or the reverse) and a class folder without any
    pair are reported with a DataWarning, counted and left out.
    """
    tf = _tf()
    if not tf.io.gfile.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such folder (expected DATA_DIR/<class>/<track>/)")
    classes, samples, skipped = [], [], collections.Counter()
    for class_name in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(data_dir)):
        class_dir = join(data_dir, class_name)
        if class_name.startswith(".") or not tf.io.gfile.isdir(class_dir):
            continue
        found = []
        for track in sorted(n.rstrip("/") for n in tf.io.gfile.listdir(class_dir)):
            track_dir = join(class_dir, track)
            if track.startswith(".") or not tf.io.gfile.isdir(track_dir):
                continue
            parts = collections.defaultdict(dict)
            for name in tf.io.gfile.listdir(track_dir):
                match = _PART.match(name)
                if match:
                    parts[int(match.group(1))][match.group(2)] = join(track_dir, name)
            for segment in sorted(parts):
                pair = parts[segment]
                if len(pair) != 2:
                    have, missing = ("png", "npy") if "png" in pair else ("npy", "png")
                    report_skip(f"skipped {pair[have]}: no matching part_{segment}.{missing}")
                    skipped[class_name] += 1
                    continue
                found.append((f"{class_name}/{track}", segment, pair["png"], pair["npy"]))
        if not found:
            report_skip(f"skipped class folder {class_dir}: it holds no part_N.png/.npy pairs")
            skipped[class_name] += 1
            continue
        label = len(classes)
        classes.append(class_name)
        samples.extend(Sample(label, *item) for item in found)
    return classes, samples, skipped


def read_sample(sample: Sample, image_size: int = IMAGE_SIZE,
                feature_shape=FEATURE_SHAPE) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Read and check one pair; ValueError naming the bad file.

    Returns (png bytes, features float32 [10, 68], image uint8 [H, W, 3]); the
    image is the decode that checked the PNG, so callers need not decode again.
    """
    from PIL import Image

    tf = _tf()
    with tf.io.gfile.GFile(sample.png_path, "rb") as f:
        png = f.read()
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG":
                raise InputError(f"not a PNG ({image.format})")
            image.load()
            size, mode = image.size, image.mode
            pixels = np.asarray(image)
    except Exception as error:
        raise InputError(f"{sample.png_path}: unreadable PNG ({error})") from None
    if size != (image_size, image_size) or mode != "RGB":
        raise InputError(f"{sample.png_path}: image is {size[0]}x{size[1]} {mode}, expected "
                         f"{image_size}x{image_size} RGB")
    try:
        with tf.io.gfile.GFile(sample.npy_path, "rb") as f:
            features = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except Exception as error:
        raise InputError(f"{sample.npy_path}: unreadable .npy ({error})") from None
    if features.shape != tuple(feature_shape):
        raise InputError(f"{sample.npy_path}: feature matrix has shape {features.shape}, "
                         f"expected {tuple(feature_shape)}")
    if not np.issubdtype(features.dtype, np.number) or not np.all(np.isfinite(features)):
        raise InputError(f"{sample.npy_path}: feature matrix holds non-finite values")
    return png, features.astype(np.float32), pixels


# ---------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard INDEX of COUNT of a split."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _num_shards(num_bytes: int, num_samples: int, shard_megabytes: float, min_shards: int) -> int:
    """Shards for a split: about shard_megabytes each, at least min_shards, at most one a sample."""
    by_size = math.ceil(num_bytes / (shard_megabytes * 2**20))
    return max(1, min(num_samples, max(by_size, min_shards)))


def _existing_pack(records_dir: str) -> list[str]:
    """The manifest and shard file names already in records_dir (empty when there are none)."""
    tf = _tf()
    if not tf.io.gfile.isdir(records_dir):
        return []
    return [n for n in tf.io.gfile.listdir(records_dir)
            if n == MANIFEST_NAME or n.endswith(".tfrecord")]


class FeatureStats:
    """Running per-column sums of feature matrices, for the manifest's mean and std."""

    def __init__(self, columns: int = FEATURE_SHAPE[1]):
        self.sum = np.zeros(columns)
        self.squares = np.zeros(columns)
        self.rows = 0

    def add(self, features: np.ndarray) -> None:
        """Add the rows of one feature matrix."""
        self.sum += features.sum(axis=0)
        self.squares += (features.astype(np.float64) ** 2).sum(axis=0)
        self.rows += features.shape[0]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-column mean and standard deviation (zeros when no row was added)."""
        mean = self.sum / max(self.rows, 1)
        std = np.sqrt(np.maximum(self.squares / max(self.rows, 1) - mean**2, 0.0))
        return mean, std


def _write_records(samples: list[Sample], paths: list[str], classes: list[str],
                   skipped: collections.Counter, bar=None):
    """Write samples, in order, round-robin into new TFRecord files at paths.

    A sample that fails :func:`read_sample` is reported, counted in skipped
    under its class and left out. Returns (records per shard, records per
    class name, track ids written, FeatureStats of the written samples).
    """
    tf = _tf()
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    per_shard = [0] * len(paths)
    per_class = collections.Counter()
    tracks = set()
    stats = FeatureStats()
    written = 0
    try:
        for sample in samples:
            if bar is not None:
                bar.update(1)
            try:
                png, features, _ = read_sample(sample)
            except ValueError as error:
                report_skip(f"skipped {error}")
                skipped[classes[sample.label]] += 1
                continue
            shard = written % len(paths)
            writers[shard].write(create_example(png, features, sample.label,
                                                sample.track_id, sample.segment))
            per_shard[shard] += 1
            per_class[classes[sample.label]] += 1
            tracks.add(sample.track_id)
            stats.add(features)
            written += 1
    finally:
        for writer in writers:
            writer.close()
    return per_shard, per_class, tracks, stats


def _shard_entries(out_dir: str, names: list[str], per_shard: list[int]) -> list[dict]:
    """Manifest entries of the non-empty shards; empty shard files are deleted.

    Shards stay empty when a split has fewer valid samples than shards.
    """
    tf = _tf()
    shards = []
    for name, records in zip(names, per_shard):
        if records:
            size = tf.io.gfile.stat(join(out_dir, name)).length
            shards.append({"file": name, "records": records, "bytes": size})
        else:
            tf.io.gfile.remove(join(out_dir, name))
    return shards


def write_split(side: str, samples: list[Sample], classes: list[str], out_dir: str,
                rng: np.random.Generator, skipped: collections.Counter, bar=None,
                shard_megabytes: float = 128.0, min_shards: int = 8) -> tuple[dict, FeatureStats]:
    """Write one split's samples into shards `<side>-NNNNN-of-NNNNN.tfrecord` in out_dir.

    The records are shuffled with rng and dealt round-robin over the shards,
    whose number follows the PNG bytes (see :func:`_num_shards`). Unreadable
    samples are reported and counted in skipped; bar (a tqdm) advances one
    step a sample.

    Returns
    -------
    (entry, stats) : the split's manifest entry {"records", "counts", "shards",
        "tracks"}, and the FeatureStats of its written samples.
    """
    tf = _tf()
    chosen = [samples[i] for i in rng.permutation(len(samples))]
    num_bytes = sum(tf.io.gfile.stat(s.png_path).length for s in chosen)
    count = _num_shards(num_bytes, len(chosen), shard_megabytes, min_shards)
    names = [shard_name(side, i, count) for i in range(count)]
    per_shard, per_class, tracks, stats = _write_records(
        chosen, [join(out_dir, n) for n in names], classes, skipped, bar)
    entry = {
        "records": sum(per_shard),
        "counts": {c: per_class[c] for c in classes},
        "shards": _shard_entries(out_dir, names, per_shard),
        "tracks": sorted(tracks),
    }
    return entry, stats


def build_manifest(data_dir: str, classes: list[str], splits: dict, skipped: collections.Counter,
                   feature_stats: FeatureStats, seed: int, val_fraction: float,
                   groups_file: str | None) -> dict:
    """The manifest.json content of a pack: schema, classes, splits, skips and the
    feature mean and std (of the train split, given as feature_stats)."""
    mean, std = feature_stats.mean_std()
    return {
        "schema_version": SCHEMA_VERSION,
        "tclf_version": tclf.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_dir": data_dir,
        "classes": classes,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE, 3],
        "feature_shape": list(FEATURE_SHAPE),
        "seed": seed,
        "val_fraction": val_fraction,
        "groups_file": groups_file,
        "splits": splits,
        "skipped": dict(skipped),
        "extraction": _extraction_settings(data_dir),
        "feature_mean": [float(x) for x in mean],
        "feature_std": [float(x) for x in std],
    }


@contextlib.contextmanager
def _staging_dir(records_dir: str):
    """A new hidden .tmp-pack-* folder in records_dir, deleted again if the block fails."""
    tf = _tf()
    tmp_dir = join(records_dir, f".tmp-pack-{uuid.uuid4().hex[:8]}")
    tf.io.gfile.makedirs(tmp_dir)
    try:
        yield tmp_dir
    except BaseException:
        tf.io.gfile.rmtree(tmp_dir)
        raise


def pack(data_dir: str, records_dir: str, val_fraction: float = 0.2, seed: int = 0,
         groups_file: str | None = None, shard_megabytes: float = 128.0, min_shards: int = 8,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Pack DATA_DIR into sharded TFRecords and a manifest in RECORDS_DIR.

    Everything is written into a hidden temporary folder inside RECORDS_DIR
    and moved into place at the end, manifest.json last, so a folder with a
    manifest is always complete. Samples are streamed: memory does not grow
    with the data set.

    Parameters
    ----------
    val_fraction : float
        Share of each class's tracks in the validation split.
    seed : int
        Seed of the split and of the order of records in the shards.
    groups_file : str, optional
        CSV `track_id,group`; a group's tracks all land on one side.
    shard_megabytes : float
        Target shard size; shards hold 100-200 MB for big data sets.
    min_shards : int
        At least this many shards per split (capped by its sample count),
        so that the reader can interleave reads.
    overwrite : bool
        Replace an existing pack in RECORDS_DIR.

    Returns
    -------
    manifest : dict (as written to manifest.json)

    Raises
    ------
    FileExistsError
        RECORDS_DIR already holds a pack and overwrite is False.
    RuntimeError
        No valid sample at all.
    """
    tf = _tf()
    from tqdm import tqdm

    start_time = time.perf_counter()
    if _existing_pack(records_dir) and not overwrite:
        raise FileExistsError(f"{records_dir} already holds packed records; "
                              f"use --overwrite to replace them")
    classes, samples, skipped = scan_data(data_dir)
    if not samples:
        raise RunError(f"no samples found in {data_dir} (expected "
                       f"DATA_DIR/<class>/<track>/part_N.png + part_N.npy)")
    groups = read_groups(groups_file) if groups_file else None
    split = split_tracks({s.track_id: s.label for s in samples}, val_fraction, seed, groups)
    side_of = {track: side for side, tracks in split.items() for track in tracks}

    with _staging_dir(records_dir) as tmp_dir:
        rng = np.random.default_rng(seed)
        bar = tqdm(total=len(samples), unit="segment", desc="pack", disable=not progress)
        splits, stats = {}, {}
        for side in SPLITS:
            chosen = [s for s in samples if side_of[s.track_id] == side]
            splits[side], stats[side] = write_split(side, chosen, classes, tmp_dir, rng, skipped,
                                                    bar, shard_megabytes, min_shards)
        bar.close()
        if not sum(entry["records"] for entry in splits.values()):
            raise RunError(f"no valid sample in {data_dir}: all {len(samples)} were skipped")
        manifest = build_manifest(data_dir, classes, splits, skipped, stats["train"], seed=seed,
                                  val_fraction=val_fraction, groups_file=groups_file)
        with tf.io.gfile.GFile(join(tmp_dir, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)
        _move_into_place(tmp_dir, records_dir)
    manifest["seconds"] = time.perf_counter() - start_time
    return manifest


def _extraction_settings(data_dir: str) -> dict | None:
    """DATA_DIR/extract.json written by tclf-extract, if any (None for hand-made data)."""
    tf = _tf()
    path = join(data_dir, EXTRACTION_SETTINGS_NAME)
    if not tf.io.gfile.exists(path):
        return None
    return read_json(path)


def _move_into_place(tmp_dir: str, records_dir: str) -> None:
    """Replace the pack in records_dir by tmp_dir's, manifest.json last.

    The old pack is first moved aside (manifest first, so the folder stops
    looking complete) and deleted only after the new one is in place. A failure
    while the new files move in (remote storage) puts the old pack back; a hard
    kill leaves it whole in a hidden .old-pack-* folder, never half-replaced.
    """
    tf = _tf()
    old = _existing_pack(records_dir)
    old_dir = None
    if old:
        old_dir = join(records_dir, f".old-pack-{uuid.uuid4().hex[:8]}")
        tf.io.gfile.makedirs(old_dir)
        for name in sorted(old, key=lambda n: n != MANIFEST_NAME):
            tf.io.gfile.rename(join(records_dir, name), join(old_dir, name))
    new = sorted(tf.io.gfile.listdir(tmp_dir), key=lambda n: n == MANIFEST_NAME)
    placed = []
    try:
        for name in new:
            tf.io.gfile.rename(join(tmp_dir, name), join(records_dir, name))
            placed.append(name)
    except BaseException:
        # Take the new files back out and put the old pack back, its manifest last; should
        # that fail too, the old pack is still whole in its .old-pack-* folder.
        for name in placed:
            tf.io.gfile.rename(join(records_dir, name), join(tmp_dir, name))
        if old_dir:
            for name in sorted(old, key=lambda n: n == MANIFEST_NAME):
                tf.io.gfile.rename(join(old_dir, name), join(records_dir, name))
            tf.io.gfile.rmtree(old_dir)
        raise
    tf.io.gfile.rmtree(tmp_dir)
    if old_dir:
        tf.io.gfile.rmtree(old_dir)


def summary_lines(manifest: dict) -> list[str]:
    """Human-readable summary of a pack: records and tracks per class and split."""
    lines = []
    for side in SPLITS:
        info = manifest["splits"][side]
        tracks = collections.Counter(t.split("/", 1)[0] for t in info["tracks"])
        per_class = ", ".join(f"{c}: {info['counts'][c]} ({tracks[c]} tracks)"
                              for c in manifest["classes"])
        lines.append(f"{side}: {info['records']} records in {len(info['shards'])} shards; "
                     f"{per_class}")
    skipped = manifest.get("skipped") or {}
    lines.append(f"skipped: {sum(skipped.values())}"
                 + (f" ({', '.join(f'{c}: {n}' for c, n in skipped.items())})" if skipped else ""))
    return lines
