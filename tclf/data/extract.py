"""`tclf-extract`: AUDIO_DIR/<class>/<file> -> DATA_DIR/<class>/<track_id>/part_N.{png,npy}.

Tracks are processed in parallel, one track per task. Each track is written
into a hidden temporary folder beside its final place and renamed when
complete, so an interrupted run never leaves a half track: a re-run finds
either the whole track (and skips it) or nothing. Each track folder records
its source file (source.json), so a re-run matches files to folders by that
record, not by names that shift when files are added (see plan_tracks).
A track that cannot be written (disk full) stops the run with one error;
a file that cannot be used is skipped with a DataWarning naming it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid

import numpy as np
from tqdm import tqdm

from tclf import InputError, RunError, faults, library_versions, report_skip, storage
from tclf.data import audio, schema

TMP_PREFIX = ".tmp-"


@dataclasses.dataclass
class ExtractSummary:
    extracted: collections.Counter  # class -> tracks written
    segments: collections.Counter  # class -> segments written
    existing: collections.Counter  # class -> tracks skipped because complete
    failed: list  # (path, reason)
    seconds: float

    def line(self) -> str:
        per_class = ", ".join(f"{c}: {self.extracted[c]}" for c in sorted(
            set(self.extracted) | set(self.existing)))
        return (f"extracted {sum(self.extracted.values())} tracks "
                f"({sum(self.segments.values())} segments; {per_class}), "
                f"{sum(self.existing.values())} already complete, {len(self.failed)} failed, "
                f"in {self.seconds:.1f} s")


def track_id_for(filename: str) -> str:
    """A folder-safe track id from an audio file name (its stem)."""
    stem = os.path.splitext(filename)[0]
    return re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "track"


SOURCE_NAME = "source.json"  # In each track folder: {"source": "<path in AUDIO_DIR/<class>/>"}.

# What a track of the listing is, against DATA_DIR (see plan_tracks).
NEW, COMPLETE, REDO = "new", "complete", "redo"


@dataclasses.dataclass
class Track:
    class_name: str
    track_id: str
    path: str  # The audio file, as found under AUDIO_DIR.
    source: str  # Its path inside AUDIO_DIR/<class>/, with "/": what source.json records.
    state: str  # NEW, COMPLETE or REDO.


def _check_folder(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: is a file, not a folder (expected {what})")


def _class_files(class_dir: str) -> list[tuple[str, str]]:
    """(source, path) of every non-hidden file under one class folder, in sorted walk order.

    Symbolic links to folders are followed (each real folder once: a link loop ends).
    """
    found, visited = [], set()
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            found.append((os.path.relpath(path, class_dir).replace(os.sep, "/"), path))
    return found


_BROKEN = object()  # A source.json that cannot be read: the folder belongs to no file.


def read_source(track_dir: str):
    """The source recorded in a track folder: its path in AUDIO_DIR/<class>/, None if the
    folder has no record, or _BROKEN if the record is damaged."""
    path = os.path.join(track_dir, SOURCE_NAME)
    if not os.path.exists(path):
        return None
    try:
        source = storage.read_json(path)["source"]
    except (InputError, OSError, KeyError, TypeError):
        return _BROKEN
    return source if isinstance(source, str) else _BROKEN


def _existing(class_data_dir: str) -> tuple[dict, set]:
    """(track folder -> recorded source, every non-hidden name) of DATA_DIR/<class>/."""
    if not os.path.isdir(class_data_dir):
        return {}, set()
    names = {n for n in os.listdir(class_data_dir) if not n.startswith(".")}
    folders = {}
    for name in sorted(names):
        track_dir = os.path.join(class_data_dir, name)
        if os.path.isdir(track_dir):
            folders[name] = read_source(track_dir)
            if folders[name] is _BROKEN:
                report_skip(f"{track_dir}/{SOURCE_NAME} is damaged: that folder is matched to "
                            f"no audio file and left as it is (delete it to extract it again)")
    return folders, names


def _plan_class(class_name: str, files: list[tuple[str, str]], class_data_dir: str,
                overwrite: bool) -> list[Track]:
    folders, names = _existing(class_data_dir)
    unrecorded = sorted(name for name, source in folders.items() if source is None)
    if unrecorded and not overwrite:
        more = f" (and {len(unrecorded) - 1} more there)" if len(unrecorded) > 1 else ""
        raise InputError(f"{os.path.join(class_data_dir, unrecorded[0])}{more} has no "
                         f"{SOURCE_NAME}: written by an older tclf; re-extract with "
                         f"--overwrite, or into another DATA_DIR")
    recorded = {source: name for name, source in folders.items() if isinstance(source, str)}
    # Case-insensitive filesystems too. With overwrite, a folder without a record is re-used.
    taken = {name.casefold() for name in names} - {name.casefold() for name in unrecorded}
    plan: dict[str, Track] = {}
    for source, path in files:
        if source in recorded:
            plan[source] = Track(class_name, recorded[source], path, source,
                                 REDO if overwrite else COMPLETE)
    for source, path in files:
        if source in plan:
            continue
        base = track_id = track_id_for(source.rsplit("/", 1)[-1])
        number = 2
        while track_id.casefold() in taken:
            track_id, number = f"{base}_{number}", number + 1
        taken.add(track_id.casefold())
        plan[source] = Track(class_name, track_id, path, source,
                             REDO if track_id in unrecorded else NEW)
    left = sorted(set(unrecorded) - {track.track_id for track in plan.values()})
    if left:
        report_skip(f"{class_data_dir}/{{{', '.join(left)}}}: left as they are; they have no "
                    f"{SOURCE_NAME} (written by an older tclf) and no file of AUDIO_DIR goes "
                    f"there: delete them")
    return [plan[source] for source, _ in files]


def plan_tracks(audio_dir: str, data_dir: str | None = None,
                overwrite: bool = False) -> list[Track]:
    """Every non-hidden file under AUDIO_DIR/<class>/, with its track folder in DATA_DIR.

    Files are not filtered by extension: what does not decode is reported by the extraction.
    A file is matched to the folder whose ``source.json`` records it (COMPLETE; REDO with
    ``overwrite``), whatever was added or removed since. Any other file gets a new folder
    (NEW) named by its cleaned stem (:func:`track_id_for`), with _2, _3 ... when that name is
    taken, so two files never share a folder. A folder without ``source.json`` is an
    InputError; with ``overwrite`` it is extracted again (REDO) if a file's new id names it.

    Raises FileNotFoundError if AUDIO_DIR does not exist, InputError if AUDIO_DIR or DATA_DIR
    is a file.
    """
    _check_folder(audio_dir, "AUDIO_DIR/<class>/<files>")
    if data_dir is not None:
        _check_folder(data_dir, "DATA_DIR, where the track folders go")
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"{audio_dir}: no such folder (expected AUDIO_DIR/<class>/<files>)")
    tracks = []
    for class_name in sorted(os.listdir(audio_dir)):
        class_dir = os.path.join(audio_dir, class_name)
        if class_name.startswith("."):
            continue
        if not os.path.isdir(class_dir):
            report_skip(f"skipped {class_dir}: not in a class folder (audio files go in "
                        f"AUDIO_DIR/<class>/)")
            continue
        files = _class_files(class_dir)
        if not files:
            report_skip(f"skipped class folder {class_dir}: it holds no files")
            continue
        class_data_dir = os.path.join(data_dir, class_name) if data_dir else ""
        tracks.extend(_plan_class(class_name, files, class_data_dir, overwrite))
    return tracks


def list_tracks(audio_dir: str, data_dir: str | None = None) -> list[tuple[str, str, str]]:
    """(class_name, track_id, path) for every file :func:`plan_tracks` finds."""
    return [(t.class_name, t.track_id, t.path) for t in plan_tracks(audio_dir, data_dir)]


def write_track(segments: list[audio.Segment], track_dir: str, overwrite: bool = False,
                source: str | None = None,
                png_compression: int = audio.PNG_COMPRESSION) -> None:
    """Write part_N.png/.npy (and source.json, if ``source``) into a hidden temporary
    folder beside track_dir, then rename it to track_dir: the track appears whole or not
    at all. The PNGs are encoded at ``png_compression`` (see :func:`audio.encode_png`)."""
    parent = os.path.dirname(track_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(track_dir)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        if source is not None:
            with open(os.path.join(tmp, SOURCE_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps({"source": source}, ensure_ascii=False))
        for segment in segments:
            with open(os.path.join(tmp, f"part_{segment.index}.png"), "wb") as f:
                f.write(segment.png_bytes(png_compression))
            np.save(os.path.join(tmp, f"part_{segment.index}.npy"), segment.features)
            faults.point("extract.part_written")
        if os.path.exists(track_dir):
            if not overwrite:
                raise FileExistsError(f"{track_dir} already exists")
            old = tmp + ".old"
            os.rename(track_dir, old)
            os.rename(tmp, track_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, track_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.point("extract.track_written")


def _extract_one(task):
    """(class, id, path, segments, error, fatal) for one track. A file that cannot be used is
    an error; a track that cannot be written (disk full, read-only, permissions) is fatal:
    every other track would fail the same way."""
    class_name, track_id, path, track_dir, options, overwrite, source, png_compression = task
    try:
        segments = audio.analyze_file(path, **options)
    except audio.AudioError as error:
        return class_name, track_id, path, 0, str(error), False
    except Exception as error:  # One bad file must not stop the run.
        return class_name, track_id, path, 0, f"{path}: {type(error).__name__}: {error}", False
    try:
        write_track(segments, track_dir, overwrite, source, png_compression)
    except FileExistsError as error:  # Another tclf-extract on this DATA_DIR got there first.
        return class_name, track_id, path, 0, f"{path}: {error}", False
    except OSError as error:
        reason = error.strerror or str(error)
        return class_name, track_id, path, 0, f"cannot write {track_dir}: {reason}", True
    except Exception as error:
        return class_name, track_id, path, 0, f"{path}: {type(error).__name__}: {error}", False
    return class_name, track_id, path, len(segments), None, False


def _thread_limits():
    """Limit BLAS/OpenMP pools of this process to one thread; returns the undo handle."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1)
    except ImportError:
        return None


def _init_worker():
    # One BLAS thread per worker: the parallelism is across tracks.
    _thread_limits()


def _warm_up(options):
    """Import and JIT-compile the analysis once, before workers are forked from us."""
    sample_rate = options.get("sample_rate", audio.SAMPLE_RATE)
    audio.analyze_segment(np.random.default_rng(0).standard_normal(sample_rate).astype(np.float32),
                          sample_rate, image_size=8)


SETTINGS_NAME = schema.EXTRACTION_SETTINGS_NAME
PNG_COMPRESSION_KEY = "png_compression"  # In extract.json: the zlib level of the folder's PNGs.
# In extract.json: the librosa version that computed the features, for tclf-eval's check.
# Like the PNG level, it is recorded, not compared: a folder may be extended after an upgrade.
LIBROSA_KEY = "librosa_version"
RECORDED_KEYS = (PNG_COMPRESSION_KEY, LIBROSA_KEY)
BACKBONE_KEY = "backbone"  # In extract.json: the backbone the spectrograms are made for.


def record_settings(data_dir: str, options: dict, png_compression: int | None = None,
                    overwrite: bool = False) -> int:
    """Write DATA_DIR/extract.json, or check that the folder's matches; returns the PNG
    compression (:func:`audio.encode_png`) of the folder's tracks.

    tclf-pack copies the settings into the manifest and tclf-train into model.h5, so that
    tclf-predict analyses new audio as the training data was. Other analysis settings than
    the folder's are refused, and so is another PNG compression (None: the folder's, or
    ``audio.PNG_COMPRESSION`` for a new folder): re-encode while packing instead. An
    extract.json without the PNG compression is refused unless ``overwrite``, which
    rewrites it.
    """
    if png_compression is not None:
        png_compression = audio.check_png_compression(png_compression)
    path = os.path.join(data_dir, SETTINGS_NAME)
    if os.path.exists(path):
        existing = storage.read_json(path)
        analysis = ({k: v for k, v in existing.items() if k not in RECORDED_KEYS}
                    if isinstance(existing, dict) else existing)
        if isinstance(analysis, dict):  # Folders from before the choice: efficientnetb0's.
            analysis.setdefault(BACKBONE_KEY, audio.backbone_of_settings(analysis))
            theirs, ours = analysis[BACKBONE_KEY], options.get(BACKBONE_KEY)
            if ours is not None and theirs != ours:
                raise InputError(f"{data_dir} holds spectrograms for the {theirs} backbone, not "
                                 f"--backbone {ours}; extract into another DATA_DIR")
        if analysis != options:
            raise InputError(f"{data_dir} was extracted with {analysis}, not {options}; use the "
                             f"same settings or another DATA_DIR")
        if PNG_COMPRESSION_KEY in existing:
            recorded = existing[PNG_COMPRESSION_KEY]
            if png_compression is not None and png_compression != recorded:
                raise InputError(f"{data_dir} was extracted with --png-compression {recorded}, "
                                 f"not --png-compression {png_compression}; leave the option "
                                 f"out to go on with the folder's, use another DATA_DIR, or "
                                 f"re-encode while packing (tclf-pack --png-compression "
                                 f"{png_compression})")
            return recorded
        if not overwrite:
            raise InputError(f"{path} has no {PNG_COMPRESSION_KEY}: {data_dir} was written by "
                             f"an older tclf; re-extract with --overwrite, or into another "
                             f"DATA_DIR")
    if png_compression is None:
        png_compression = audio.PNG_COMPRESSION
    os.makedirs(data_dir, exist_ok=True)
    storage.write_atomic(path, json.dumps({**options, PNG_COMPRESSION_KEY: png_compression,
                                           LIBROSA_KEY: library_versions()["librosa"]},
                                          indent=1))
    return png_compression


def clean_temporary(data_dir: str) -> int:
    """Remove temporary track folders left by an interrupted run. Returns how many."""
    removed = 0
    if not os.path.isdir(data_dir):
        return 0
    for class_name in os.listdir(data_dir):
        class_dir = os.path.join(data_dir, class_name)
        if not os.path.isdir(class_dir):
            continue
        for name in os.listdir(class_dir):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(class_dir, name), ignore_errors=True)
                removed += 1
    return removed


def extract(audio_dir: str, data_dir: str, num_segments: int = 6, segment_seconds: float = 10.0,
            sample_rate: int = audio.SAMPLE_RATE, image_size: int = audio.IMAGE_SIZE,
            skip_fraction: float = 0.1, jobs: int | None = None, overwrite: bool = False,
            progress: bool = True, png_compression: int | None = None,
            training_segments: int = audio.TRAINING_SEGMENTS,
            backbone: str = audio.EFFICIENTNET) -> ExtractSummary:
    """Extract every track of AUDIO_DIR into DATA_DIR (see :func:`plan_tracks`).

    jobs: worker processes, default all cores; 1 runs in this process. png_compression: zlib
    level 0-9 of the PNGs; None: the folder's own (:func:`record_settings`). training_segments:
    up to this many more segments a track, for training only, numbered after the standard
    ones (:func:`audio.training_segment_starts`). backbone: the one the spectrograms are made
    for (:data:`audio.BACKBONES`). A file that cannot be used is reported by a DataWarning
    naming it.

    Raises InputError if AUDIO_DIR or DATA_DIR is a file or DATA_DIR holds other settings
    or an older tclf's tracks; RunError if no track could be extracted and none was complete,
    if a track cannot be written (a full disk: the run stops there, the tracks written
    before are complete), or if a worker process died.
    """
    start_time = time.perf_counter()
    options = dict(num_segments=num_segments, segment_seconds=segment_seconds,
                   sample_rate=sample_rate, image_size=image_size, skip_fraction=skip_fraction,
                   training_segments=training_segments,
                   backbone=audio.check_backbone(backbone))
    for path in (audio_dir, data_dir):
        if "://" in path:
            raise InputError(f"{path}: tclf-extract works on local folders; copy the result "
                             f"to remote storage afterwards (tclf-pack reads and writes gs://)")
    _check_folder(audio_dir, "AUDIO_DIR/<class>/<files>")
    _check_folder(data_dir, "DATA_DIR, where the track folders go")
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"{audio_dir}: no such folder (expected AUDIO_DIR/<class>/<files>)")
    png_compression = record_settings(data_dir, options, png_compression, overwrite)
    clean_temporary(data_dir)
    tracks = plan_tracks(audio_dir, data_dir, overwrite)
    summary = ExtractSummary(collections.Counter(), collections.Counter(),
                             collections.Counter(), [], 0.0)
    tasks = []
    for track in tracks:
        track_dir = os.path.join(data_dir, track.class_name, track.track_id)
        if track.state == COMPLETE:
            summary.existing[track.class_name] += 1
        else:
            tasks.append((track.class_name, track.track_id, track.path, track_dir, options,
                          track.state == REDO, track.source, png_compression))
    bar = tqdm(total=len(tasks), unit="track", desc="extract", disable=not progress)
    try:
        with _running(tasks, jobs, options) as results:
            for class_name, track_id, path, count, error, fatal in results:
                if fatal:
                    done = sum(summary.extracted.values())
                    raise RunError(f"{error}; stopped after {done} of {len(tasks)} tracks "
                                   f"(those are complete and kept): fix that and re-run to go "
                                   f"on")
                if error:
                    summary.failed.append((path, error))
                    report_skip(f"skipped {error}")
                else:
                    summary.extracted[class_name] += 1
                    summary.segments[class_name] += count
                bar.update(1)
    except concurrent.futures.process.BrokenProcessPool as error:
        done = sum(summary.extracted.values())
        raise RunError(
            f"an extraction worker process died (killed; out of memory?) after {done} of "
            f"{len(tasks)} tracks; the finished tracks are kept: re-run to go on, with fewer "
            f"--jobs if memory is short") from error
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start_time
    if not summary.extracted and not summary.existing:
        raise RunError(f"no track could be extracted from {audio_dir} "
                       f"({len(tracks)} files found, {len(summary.failed)} failed)")
    return summary


@contextlib.contextmanager
def _running(tasks: list, jobs: int | None, options: dict):
    """The results of :func:`_extract_one` over ``tasks``, as they finish: in this process
    with ``jobs`` 1, else in a pool of worker processes (shut down when the block ends)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks) or 1))
    if jobs == 1:  # One core, as each worker of a pool: BLAS must not spread to the others.
        limits = _thread_limits()  # None without threadpoolctl.
        try:
            yield map(_extract_one, tasks)
        finally:
            if limits is not None:
                limits.restore_original_limits()
        return
    _warm_up(options)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # An executor, not multiprocessing.Pool: a worker that dies (the OOM killer) breaks it
    # with an error, where a Pool would wait forever for the lost task.
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                  initializer=_init_worker)
    try:
        yield (future.result() for future in concurrent.futures.as_completed(
            [pool.submit(_extract_one, task) for task in tasks]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
