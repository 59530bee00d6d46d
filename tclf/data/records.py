"""`tclf-pack`: data/<class>/<track>/part_N.{png,npy} -> sharded TFRecords + manifest.json.

The record layout is tclf.data.schema's; its names are re-exported here.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import re
import socket
import time
import uuid

import numpy as np

import tclf
from tclf import InputError, RunError, faults, report_skip, storage
from tclf.data import audio
from tclf.data.audio import FEATURE_SHAPE, IMAGE_SIZE

SPECTROGRAM_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)  # efficientnetb0's; musicnn's differs.
from tclf.data.schema import (  # noqa: F401 (re-exported)
    EXTRACTION_SETTINGS_NAME, FEATURES_KEY, LABEL_KEY, MANIFEST_NAME, SCHEMA_VERSION, SEGMENT_KEY,
    SPECTROGRAM_KEY, SPLITS, TRACK_ID_KEY, create_example, feature_description, load_manifest)
from tclf.data.splits import read_groups, split_tracks
from tclf.storage import is_remote, join


def _tf():
    import tensorflow as tf

    return tf


_PART = re.compile(r"^part_(\d+)\.(png|npy)$")


# ---------------------------------------------------------------------------
# Scanning and validating data/.
# ---------------------------------------------------------------------------


Sample = collections.namedtuple("Sample", "label track_id segment png_path npy_path")


def _listdir(folder: str) -> list[str] | None:
    """Sorted entries of a folder of the user's data; None (reported) when it cannot be listed."""
    try:
        return sorted(storage.listdir(folder))
    except storage.errors(folder) as error:
        report_skip(f"skipped folder {folder}: it cannot be listed ({storage.reason(error)})")
        return None


def track_parts(track_dir: str) -> list[tuple[int, str, str]]:
    """(N, png path, npy path) for every part_N.png of a data/ track folder (none if it is not
    a folder), part_2 before part_10; the npy path is part_N.npy's, whether it exists or not.
    Read a part with :func:`read_pair`."""
    parts = []
    for name in sorted(storage.listdir(track_dir), key=lambda n: (len(n), n)):
        match = _PART.match(name)
        if match and match.group(2) == "png":
            index = int(match.group(1))
            parts.append((index, join(track_dir, name), join(track_dir, f"part_{index}.npy")))
    return parts


def _check_data_dir(data_dir: str) -> None:
    """FileNotFoundError or NotADirectoryError unless data_dir is a folder."""
    if not storage.isdir(data_dir):
        if storage.exists(data_dir):
            raise NotADirectoryError(f"{data_dir}: is a file, not a folder (expected "
                                     f"DATA_DIR/<class>/<track>/part_N.png + part_N.npy)")
        raise FileNotFoundError(f"{data_dir}: no such folder (expected DATA_DIR/<class>/<track>/)")


def scan_data(data_dir: str) -> tuple[list[str], list[Sample], collections.Counter]:
    """Classes (sub-folders with at least one pair), every png/npy pair of DATA_DIR, and the
    count of what was skipped per class folder.

    A png without its npy (or the reverse), a class folder without any pair and a
    folder that cannot be listed are reported with a DataWarning, counted and left
    out. Symbolic links to class or track folders are followed. The pairs are not
    read here: see :func:`validate_samples`.
    """
    _check_data_dir(data_dir)
    classes, samples, skipped = [], [], collections.Counter()
    for class_name in _listdir(data_dir) or []:
        class_dir = join(data_dir, class_name)
        if class_name.startswith(".") or not storage.isdir(class_dir):
            continue
        found = []
        for track in _listdir(class_dir) or []:
            track_dir = join(class_dir, track)
            if track.startswith(".") or not storage.isdir(track_dir):
                continue
            names = _listdir(track_dir)
            if names is None:
                skipped[class_name] += 1
                continue
            parts = collections.defaultdict(dict)
            for name in names:
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


def validate_samples(data_dir: str, classes: list[str], samples: list[Sample],
                     skipped: collections.Counter, progress: bool = False,
                     shape: tuple = SPECTROGRAM_SHAPE) -> tuple[list[str], list[Sample]]:
    """The classes and samples of a scan that pass :func:`read_sample`, before the split.

    Every pair is read and checked once (nothing decoded is kept: only whether it
    passed), so the split is drawn over tracks that really have data: a track whose
    parts are all bad cannot take a class's place in the validation split. Bad pairs
    are reported and counted in skipped; a class left without any valid pair is
    reported and dropped, and the labels of the others renumbered. shape: the spectrograms'
    (:func:`audio.spectrogram_shape`).
    """
    from tqdm import tqdm

    valid = []
    for sample in tqdm(samples, unit="segment", desc="check", disable=not progress):
        try:
            read_sample(sample, shape)
        except ValueError as error:
            report_skip(f"skipped {error}")
            skipped[classes[sample.label]] += 1
            continue
        valid.append(sample)
    kept = sorted({s.label for s in valid})
    for label in sorted(set(range(len(classes))) - set(kept)):
        report_skip(f"skipped class folder {join(data_dir, classes[label])}: "
                    f"none of its part_N.png/.npy pairs is valid")
    relabel = {old: new for new, old in enumerate(kept)}
    return ([classes[label] for label in kept],
            [s._replace(label=relabel[s.label]) for s in valid])


def _read_file(path: str) -> bytes:
    """The bytes of a data file; InputError naming it when it cannot be read or is empty."""
    try:
        content = storage.read_bytes(path)
    except storage.errors(path) as error:
        raise InputError(f"{path}: cannot be read ({storage.reason(error)})") from None
    if not content:
        raise InputError(f"{path}: empty file")
    return content


def _load_features(path: str, content: bytes, feature_shape) -> np.ndarray:
    """The feature matrix of a .npy file's bytes as float32, checked; InputError naming it.

    The header is checked before the data are read (a header cannot make us allocate
    more than the file holds). Real numbers are accepted, floats or integers, and
    converted to float32; bool, complex, structured and object arrays are not (a bool
    or complex matrix is not a feature matrix, and dropping an imaginary part would
    pack wrong numbers).
    """
    from numpy.lib import format as npy

    buffer = io.BytesIO(content)
    try:
        version = npy.read_magic(buffer)
        read_header = {(1, 0): npy.read_array_header_1_0,
                       (2, 0): npy.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        shape, _, dtype = read_header(buffer)
    except Exception as error:  # noqa: BLE001 - numpy raises many kinds for bad bytes.
        raise InputError(f"{path}: unreadable .npy ({error})") from None
    if dtype.fields is not None or dtype.subdtype is not None or not (
            np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise InputError(f"{path}: feature matrix has dtype {dtype}, expected a real float "
                         f"array (integers are accepted too)")
    if tuple(shape) != tuple(feature_shape):
        raise InputError(f"{path}: feature matrix has shape {tuple(shape)}, "
                         f"expected {tuple(feature_shape)}")
    try:
        features = np.load(io.BytesIO(content), allow_pickle=False)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: unreadable .npy ({error})") from None
    with np.errstate(over="ignore", invalid="ignore"):
        converted = features.astype(np.float32)
    if not np.all(np.isfinite(converted)):
        what = ("values too large for float32" if np.all(np.isfinite(features))
                else "non-finite values")
        raise InputError(f"{path}: feature matrix holds {what}")
    return converted


def read_sample(sample: Sample, shape: tuple = SPECTROGRAM_SHAPE
                ) -> tuple[bytes, np.ndarray, np.ndarray]:
    """:func:`read_pair` of a sample of :func:`scan_data`."""
    return read_pair(sample.png_path, sample.npy_path, shape)


# Pillow's modes of the stored spectrograms: 8-bit RGB, and musicnn's 16-bit grayscale.
_MODES = {3: ("RGB",), 1: ("I;16", "I;16B", "I")}
_BACKBONE_OF_CHANNELS = {3: audio.EFFICIENTNET, 1: audio.MUSICNN}


class OtherBackbone(InputError):
    """A spectrogram made for the other backbone than the one expected."""

    def __init__(self, message: str, backbone: str):
        super().__init__(message)
        self.backbone = backbone


def read_pair(png_path: str, npy_path: str, shape: tuple = SPECTROGRAM_SHAPE,
              feature_shape=FEATURE_SHAPE) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Read and check one part_N.png + part_N.npy; InputError (a ValueError) naming the bad file.

    A file that cannot be read (permissions, a folder or dangling link by that
    name) or is empty, a PNG that is not of ``shape`` (height, width, channels: 299x299 RGB,
    or musicnn's 16-bit grayscale), and a .npy that is not a finite real matrix of the
    feature shape (see :func:`_load_features`) are errors. Returns (png bytes, features
    float32 [10, 68], pixels: uint8 [H, W, 3] or uint16 [H, W]); the pixels are the decode
    that checked the PNG, so callers need not decode again.
    """
    from PIL import Image, UnidentifiedImageError

    height, width, channels = shape
    modes = _MODES[channels]
    png = _read_file(png_path)
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG":
                raise InputError(f"a {image.format} image, not a PNG")
            size, mode = image.size, image.mode
            if size == (width, height) and mode in modes:
                image.load()
                pixels = np.asarray(image)
                if pixels.ndim == 2:
                    pixels = pixels.astype(np.uint16)
    except UnidentifiedImageError:
        raise InputError(f"{png_path}: unreadable PNG (not an image file)") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for bad bytes.
        raise InputError(f"{png_path}: unreadable PNG ({error})") from None
    if size != (width, height) or mode not in modes:
        kind = "RGB" if channels == 3 else "16-bit grayscale (musicnn's log-mel)"
        for other, other_modes in _MODES.items():
            if other != channels and mode in other_modes:
                found, wanted = _BACKBONE_OF_CHANNELS[other], _BACKBONE_OF_CHANNELS[channels]
                raise OtherBackbone(f"{png_path}: a spectrogram for the {found} backbone, "
                                    f"where {wanted}'s is expected", found)
        raise InputError(f"{png_path}: image is {size[0]}x{size[1]} {mode}, expected "
                         f"{width}x{height} {kind}")
    features = _load_features(npy_path, _read_file(npy_path), feature_shape)
    return png, features, pixels


# ---------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------


def shard_name(split: str, index: int, count: int, pack_id: str = "") -> str:
    """File name of shard INDEX of COUNT of a split, e.g. train-00000-of-00008-<pack id>.tfrecord.

    The pack id (8 hex digits, new for every pack) keeps a new pack's shards from
    taking the names of the pack they replace: see :func:`_move_into_place`.
    """
    return f"{split}-{index:05d}-of-{count:05d}{'-' + pack_id if pack_id else ''}.tfrecord"


# Shards named with a pack id: those the folder's manifest does not list are a killed run's.
_OWN_SHARD = re.compile(r"^(%s)-\d{5}-of-\d{5}-[0-9a-f]{8}\.tfrecord$" % "|".join(SPLITS))
LOCK_NAME = ".pack.lock"
STAGING_PREFIX = ".tmp-pack-"


def _num_shards(num_bytes: int, num_samples: int, shard_megabytes: float, min_shards: int) -> int:
    """Shards for a split: about shard_megabytes each, at least min_shards, at most one a sample."""
    by_size = math.ceil(num_bytes / (shard_megabytes * 2**20))
    return max(1, min(num_samples, max(by_size, min_shards)))


def _existing_pack(records_dir: str) -> list[str]:
    """The manifest and shard file names already in records_dir (empty when there are none)."""
    return [n for n in storage.listdir(records_dir)
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


KEEP = "keep"  # tclf-pack --png-compression keep: the PNG bytes as DATA_DIR holds them.


def _write_records(samples: list[Sample], paths: list[str], classes: list[str],
                   skipped: collections.Counter, bar=None, png_compression=KEEP,
                   shape: tuple = SPECTROGRAM_SHAPE):
    """Write samples, in order, round-robin into new TFRecord files at paths.

    A sample that fails :func:`read_sample` is reported, counted in skipped
    under its class and left out. Unless png_compression is KEEP, each PNG is
    encoded again from its decoded pixels at that setting (:func:`audio.encode_png`:
    the same pixels, other bytes). Returns (records per shard, records per
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
                png, features, pixels = read_sample(sample, shape)
            except ValueError as error:  # Changed since validate_samples read it.
                report_skip(f"skipped {error}")
                skipped[classes[sample.label]] += 1
                continue
            if png_compression != KEEP:
                png = audio.encode_png(pixels, png_compression)
            shard = written % len(paths)
            writers[shard].write(create_example(png, features, sample.label,
                                                sample.track_id, sample.segment))
            faults.point("pack.record_written")
            per_shard[shard] += 1
            per_class[classes[sample.label]] += 1
            tracks.add(sample.track_id)
            stats.add(features)
            written += 1
    finally:
        _close_all(writers)
    return per_shard, per_class, tracks, stats


def _close_all(writers) -> None:
    """Close every writer even if one fails (a full disk may only show when buffers are
    flushed); the first failure is raised after all are closed."""
    failure = None
    for writer in writers:
        try:
            writer.close()
        except Exception as error:  # noqa: BLE001 - re-raised below.
            failure = failure or error
    if failure is not None:
        raise failure


def _shard_entries(out_dir: str, names: list[str], per_shard: list[int]) -> list[dict]:
    """Manifest entries of the non-empty shards; empty shard files are deleted.

    Shards stay empty when a split has fewer valid samples than shards.
    """
    shards = []
    for name, records in zip(names, per_shard):
        if records:
            size = storage.size(join(out_dir, name))
            shards.append({"file": name, "records": records, "bytes": size})
        else:
            storage.remove(join(out_dir, name))
    return shards


def write_split(side: str, samples: list[Sample], classes: list[str], out_dir: str,
                rng: np.random.Generator, skipped: collections.Counter, bar=None,
                shard_megabytes: float = 128.0, min_shards: int = 8,
                pack_id: str = "", png_compression=KEEP, shape: tuple = SPECTROGRAM_SHAPE
                ) -> tuple[dict, FeatureStats]:
    """Write one split's samples into shards `<side>-NNNNN-of-NNNNN-<pack_id>.tfrecord`.

    The records are shuffled with rng and dealt round-robin over the shards,
    whose number follows the PNG bytes (see :func:`_num_shards`; when the PNGs are
    re-encoded at level 0 their size is known, otherwise the files' sizes stand in).
    Unreadable samples are reported and counted in skipped; bar (a tqdm) advances one
    step a sample. png_compression: see :func:`_write_records`.

    Returns
    -------
    (entry, stats) : the split's manifest entry {"records", "counts", "shards",
        "tracks"}, and the FeatureStats of its written samples.
    """
    chosen = [samples[i] for i in rng.permutation(len(samples))]
    if png_compression == 0:  # Stored rows: the size follows from the image's.
        height, width, channels = shape
        depth = 1 if channels == 3 else 2  # RGB bytes, or 16-bit grayscale.
        num_bytes = len(chosen) * (height * (width * channels * depth + 1) + 100)
    else:
        num_bytes = sum(storage.size(s.png_path) for s in chosen)
    count = _num_shards(num_bytes, len(chosen), shard_megabytes, min_shards)
    names = [shard_name(side, i, count, pack_id) for i in range(count)]
    per_shard, per_class, tracks, stats = _write_records(
        chosen, [join(out_dir, n) for n in names], classes, skipped, bar, png_compression,
        shape)
    entry = {
        "records": sum(per_shard),
        "counts": {c: per_class[c] for c in classes},
        "shards": _shard_entries(out_dir, names, per_shard),
        "tracks": sorted(tracks),
    }
    return entry, stats


def build_manifest(data_dir: str, classes: list[str], splits: dict, skipped: collections.Counter,
                   feature_stats: FeatureStats, seed: int, val_fraction: float,
                   groups_file: str | None, pack_id: str = "", png_compression=KEEP) -> dict:
    """The manifest.json content of a pack: schema, classes, splits, skips, the PNG
    compression asked for (KEEP: as extracted, see "extraction") and the feature mean
    and std (of the train split, given as feature_stats)."""
    mean, std = feature_stats.mean_std()
    extraction = _extraction_settings(data_dir)
    backbone = audio.backbone_of_settings(extraction)
    return {
        "schema_version": SCHEMA_VERSION,
        "tclf_version": tclf.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pack_id": pack_id,
        "data_dir": data_dir,
        "classes": classes,
        "image_size": list(spectrogram_shape_of(extraction)),
        "backbone": backbone,
        "spectrogram_scale": audio.MUSICNN_SCALE if backbone == audio.MUSICNN else None,
        "feature_shape": list(FEATURE_SHAPE),
        "seed": seed,
        "val_fraction": val_fraction,
        "groups_file": groups_file,
        "png_compression": png_compression,
        "splits": splits,
        "skipped": dict(skipped),
        "extraction": extraction,
        "feature_mean": [float(x) for x in mean],
        "feature_std": [float(x) for x in std],
    }


# ---------------------------------------------------------------------------
# One pack at a time per folder, and what killed runs leave behind.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _pack_lock(records_dir: str):
    """Hold RECORDS_DIR/.pack.lock for the whole pack; yields whether a lock is held.

    The lock is an advisory ``flock``, which the kernel releases however its process ends,
    so a killed run never leaves a stale lock and the holder knows no live pack works in the
    folder. A second pack fails at once with a FileExistsError naming the holder (pid and
    host, written in the file). Remote paths and filesystems without flock get no lock
    (False): two packs are then caught only by the checks before the final move, and killed
    runs' leftovers stay (:func:`_clean_leftovers`). On NFS, Linux maps flock to NFS locks.
    """
    if is_remote(records_dir):
        yield False
        return
    try:
        import fcntl
    except ImportError:  # Not a POSIX system.
        yield False
        return
    path = join(records_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "starting"
            os.close(fd)
            raise FileExistsError(f"{records_dir} is being packed by another tclf-pack "
                                  f"({holder}); wait for it to end, or pack into another "
                                  f"folder") from None
        except OSError:  # No locks on this filesystem (ENOLCK, EOPNOTSUPP).
            os.close(fd)
            fd = None
            break
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # The holder removed this file as it ended: lock the one at the path now.
    if fd is None:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield True
    finally:
        try:
            os.remove(path)  # Still locked: a run that opened it meanwhile re-checks (above).
        except OSError:
            pass
        os.close(fd)


def _clean_leftovers(records_dir: str) -> None:
    """Remove what killed packs left in RECORDS_DIR; call only while holding :func:`_pack_lock`
    (then no live pack works in the folder): hidden ``.tmp-pack-*`` staging folders, and shards
    (``<split>-NNNNN-of-NNNNN-<pack id>.tfrecord``) that the folder's manifest does not list
    (a run killed while moving its shards in, or before it deleted the old pack's). If the
    manifest exists but cannot be read, no shard is deleted: which ones it lists is unknown.
    """
    names = storage.listdir(records_dir)
    for name in names:
        if name.startswith(STAGING_PREFIX):
            storage.rmtree(join(records_dir, name))
    listed = set()
    if storage.exists(join(records_dir, MANIFEST_NAME)):
        try:
            listed = set(_shard_files(load_manifest(records_dir)))
        except (OSError, ValueError):
            return
    for name in names:
        if _OWN_SHARD.match(name) and name not in listed:
            storage.remove(join(records_dir, name))


def _shard_files(manifest: dict) -> list[str]:
    return [s["file"] for side in SPLITS for s in manifest["splits"][side]["shards"]]


@contextlib.contextmanager
def _staging_dir(records_dir: str):
    """A new hidden .tmp-pack-<pid>-* folder in records_dir, deleted again if the block fails.

    A SIGKILL leaves it behind; the next pack into the folder deletes it
    (see :func:`_clean_leftovers`).
    """
    tmp_dir = join(records_dir, f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    storage.makedirs(tmp_dir)
    try:
        yield tmp_dir
    except BaseException:
        storage.rmtree(tmp_dir)
        raise


def _check_records_dir(records_dir: str) -> None:
    """NotADirectoryError if RECORDS_DIR is a file; InputError if it holds a ``.old-pack-*``
    folder, which only a killed tclf-pack of an older tclf leaves."""
    if storage.exists(records_dir) and not storage.isdir(records_dir):
        raise NotADirectoryError(f"{records_dir}: is a file, not a folder")
    old = sorted(n for n in storage.listdir(records_dir) if n.startswith(".old-pack-"))
    if old:
        raise InputError(f"{records_dir} holds {old[0]}, left by a killed tclf-pack of an "
                         f"older tclf; pack into another folder")


def _refuse_existing(records_dir: str, overwrite: bool) -> None:
    if _existing_pack(records_dir) and not overwrite:
        raise FileExistsError(f"{records_dir} already holds packed records; "
                              f"use --overwrite to replace them")


def _warn_missing_classes(classes: list[str], samples: list[Sample], split: dict,
                          val_fraction: float) -> None:
    """A warning for each class with no track in a split (val only when val_fraction > 0):
    training would not learn it, or its validation accuracy could not be measured."""
    label_of = {s.track_id: s.label for s in samples}
    tracks = collections.Counter(label_of.values())
    for side in SPLITS:
        if side == "val" and val_fraction == 0:
            continue
        present = {label_of[t] for t in split[side]}
        for label, name in enumerate(classes):
            if label not in present:
                effect = ("training will not learn it" if side == "train"
                          else "its validation results will be missing")
                plural = "s" if tracks[label] != 1 else ""
                report_skip(f"class {name} has no track in the {side} split (it has "
                            f"{tracks[label]} valid track{plural} in all): {effect}; "
                            f"add tracks of {name} or change --val-fraction")


# ---------------------------------------------------------------------------
# The pack.
# ---------------------------------------------------------------------------


def pack(data_dir: str, records_dir: str, val_fraction: float = 0.2, seed: int = 0,
         groups_file: str | None = None, shard_megabytes: float = 128.0, min_shards: int = 8,
         overwrite: bool = False, progress: bool = True, png_compression=KEEP) -> dict:
    """Pack DATA_DIR into sharded TFRecords and a manifest in RECORDS_DIR; returns the manifest.

    Every pair is checked first (:func:`validate_samples`) and the split drawn over the tracks
    with valid pairs. The shards are written into a hidden folder in RECORDS_DIR and moved in
    manifest last (:func:`_move_into_place`): a folder with a manifest always holds a whole
    pack, whenever a run is killed. Samples are streamed (each file is read twice). One pack
    at a time per folder (:func:`_pack_lock`); it first removes what killed runs left.

    val_fraction: each class's share of tracks in the validation split. seed: of the split and
    of the record order. groups_file: CSV `track_id,group`, a group's tracks on one side.
    shard_megabytes, min_shards: the shard size aimed at, and at least this many shards a
    split (at most one a sample). overwrite: replace a pack in RECORDS_DIR. png_compression:
    KEEP copies each PNG's bytes, a zlib level 0-9 encodes it again (the same pixels).

    Raises FileExistsError (RECORDS_DIR holds a pack and not overwrite, or another pack runs
    in it), InputError (fewer than two classes with valid pairs; RECORDS_DIR left by an older
    tclf) and RunError (no valid sample).
    """
    from tqdm import tqdm

    start_time = time.perf_counter()
    if png_compression != KEEP:
        png_compression = audio.check_png_compression(png_compression)
    _check_records_dir(records_dir)
    _check_data_dir(data_dir)  # Before RECORDS_DIR is created.
    storage.makedirs(records_dir)
    with _pack_lock(records_dir) as locked:
        if locked:
            _clean_leftovers(records_dir)
        _refuse_existing(records_dir, overwrite)
        classes, samples, skipped = scan_data(data_dir)
        if not samples:
            raise RunError(f"no samples found in {data_dir} (expected "
                           f"DATA_DIR/<class>/<track>/part_N.png + part_N.npy)")
        found = len(samples)
        shape = spectrogram_shape_of(_extraction_settings(data_dir))
        classes, samples = validate_samples(data_dir, classes, samples, skipped, progress,
                                            shape)
        if not samples:
            raise RunError(f"no valid sample in {data_dir}: all {found} were skipped")
        if len(classes) < 2:
            raise InputError(f"{data_dir}: at least two classes are needed, found only "
                             f"{classes[0]!r} (a class is a sub-folder with valid "
                             f"<track>/part_N.png + part_N.npy pairs)")
        groups = read_groups(groups_file) if groups_file else None
        split = split_tracks({s.track_id: s.label for s in samples}, val_fraction, seed, groups)
        _warn_missing_classes(classes, samples, split, val_fraction)
        side_of = {track: side for side, tracks in split.items() for track in tracks}
        standard = (_extraction_settings(data_dir) or {}).get("num_segments")
        samples = standard_segments(samples, set(split["val"]), standard)
        pack_id = uuid.uuid4().hex[:8]

        with _staging_dir(records_dir) as tmp_dir:
            rng = np.random.default_rng(seed)
            bar = tqdm(total=len(samples), unit="segment", desc="pack", disable=not progress)
            splits, stats = {}, {}
            for side in SPLITS:
                chosen = [s for s in samples if side_of[s.track_id] == side]
                splits[side], stats[side] = write_split(side, chosen, classes, tmp_dir, rng,
                                                        skipped, bar, shard_megabytes,
                                                        min_shards, pack_id, png_compression,
                                                        shape)
            bar.close()
            if not sum(entry["records"] for entry in splits.values()):
                raise RunError(f"no valid sample in {data_dir}: all {found} were skipped")
            manifest = build_manifest(data_dir, classes, splits, skipped, stats["train"],
                                      seed=seed, val_fraction=val_fraction,
                                      groups_file=groups_file, pack_id=pack_id,
                                      png_compression=png_compression)
            manifest["val_segments"] = standard
            storage.write_atomic(join(tmp_dir, MANIFEST_NAME), json.dumps(manifest, indent=1))
            _move_into_place(tmp_dir, records_dir, overwrite)
    manifest["seconds"] = time.perf_counter() - start_time
    return manifest


def standard_segments(samples: list[Sample], tracks: set, count: int | None) -> list[Sample]:
    """``samples`` without the training-only segments of ``tracks`` (the validation split's):
    those numbered after the ``count`` standard ones (tclf-extract --training-segments).
    None (data not written by tclf-extract): every segment is kept."""
    if not count:
        return samples
    return [s for s in samples if s.track_id not in tracks or s.segment <= count]


def spectrogram_shape_of(extraction: dict | None) -> tuple:
    """The stored spectrograms' (height, width, channels) of extraction settings."""
    extraction = extraction or {}
    return audio.spectrogram_shape(audio.backbone_of_settings(extraction),
                                   extraction.get("segment_seconds", 10.0))


def _extraction_settings(data_dir: str) -> dict | None:
    """DATA_DIR/extract.json written by tclf-extract, if any (None for hand-made data)."""
    path = join(data_dir, EXTRACTION_SETTINGS_NAME)
    return storage.read_json(path) if storage.exists(path) else None


def _place_manifest(source: str, target: str, overwrite: bool) -> None:
    """Move the new manifest to target in one step: replacing the old one (overwrite), or only
    if there is none, atomically where the filesystem allows (:func:`storage.rename`), so that
    of two packs that got this far only one publishes."""
    try:
        storage.rename(source, target, overwrite)
    except FileExistsError:
        raise FileExistsError(f"{os.path.dirname(target)} already holds packed records "
                              f"(another tclf-pack finished first); use --overwrite to "
                              f"replace them") from None


def _move_into_place(tmp_dir: str, records_dir: str, overwrite: bool = True) -> None:
    """Publish the pack staged in tmp_dir in records_dir, replacing an old one if overwrite.

    The new shards have names of their own (the pack id), so they move in beside
    the old pack without touching it; then the manifest is put in place in one
    atomic step (:func:`_place_manifest`) and only then are the old shards
    deleted. At every moment the folder's manifest lists shards that all exist:
    the old pack's until the manifest moves, the new one's after. A failure
    before that (remote storage) takes the new shards out again; a hard kill
    leaves unlisted shards, which the next run deletes (:func:`_clean_leftovers`).
    """
    old = _existing_pack(records_dir)
    if old and not overwrite:
        _refuse_existing(records_dir, overwrite)
    new = sorted(n for n in storage.listdir(tmp_dir) if n != MANIFEST_NAME)
    placed = []
    try:
        for name in new:
            storage.rename(join(tmp_dir, name), join(records_dir, name))
            placed.append(name)
            faults.point("pack.moving")
        _place_manifest(join(tmp_dir, MANIFEST_NAME), join(records_dir, MANIFEST_NAME),
                        overwrite)
    except BaseException:
        for name in placed:
            storage.remove_quietly(join(records_dir, name))
        raise
    faults.point("pack.manifest_placed")
    for name in old:
        if name != MANIFEST_NAME and name not in new:
            storage.remove(join(records_dir, name))
    storage.rmtree(tmp_dir)


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
