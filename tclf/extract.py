"""`tclf-extract`: AUDIO_DIR/<class>/<file> -> DATA_DIR/<class>/<track_id>/part_N.{png,npy}.

Tracks are processed in parallel, one track per task. Each track is written
into a hidden temporary folder beside its final place and renamed when
complete, so an interrupted run never leaves a half track: a re-run finds
either the whole track (and skips it) or nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import shutil
import time
import uuid

import numpy as np

from tclf import InputError, RunError, audio, report_skip, schema, storage

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


def list_tracks(audio_dir: str) -> list[tuple[str, str, str]]:
    """(class_name, track_id, path) for every non-hidden file under AUDIO_DIR/<class>/.

    Files are not filtered by extension: anything that does not decode is
    reported as such by the extraction. Two files of one class with the same
    stem get the extension appended to keep their ids apart.
    """
    if not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"{audio_dir}: no such folder (expected AUDIO_DIR/<class>/<files>)")
    tracks = []
    for class_name in sorted(os.listdir(audio_dir)):
        class_dir = os.path.join(audio_dir, class_name)
        if class_name.startswith(".") or not os.path.isdir(class_dir):
            continue
        seen = set()
        for root, dirs, files in os.walk(class_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                base = track_id = track_id_for(name)
                number = 2
                while track_id in seen:
                    track_id, number = f"{base}_{number}", number + 1
                seen.add(track_id)
                tracks.append((class_name, track_id, os.path.join(root, name)))
    return tracks


def write_track(segments: list[audio.Segment], track_dir: str, overwrite: bool = False) -> None:
    """Write part_N.png/.npy into a temporary folder, then rename it to track_dir."""
    parent = os.path.dirname(track_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(track_dir)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for segment in segments:
            with open(os.path.join(tmp, f"part_{segment.index}.png"), "wb") as f:
                f.write(segment.png_bytes())
            np.save(os.path.join(tmp, f"part_{segment.index}.npy"), segment.features)
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


def _extract_one(task):
    class_name, track_id, path, track_dir, options, overwrite = task
    try:
        segments = audio.analyze_file(path, **options)
        write_track(segments, track_dir, overwrite)
        return class_name, track_id, path, len(segments), None
    except audio.AudioError as error:
        return class_name, track_id, path, 0, str(error)
    except Exception as error:  # One bad file must not stop the run.
        return class_name, track_id, path, 0, f"{path}: {type(error).__name__}: {error}"


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


def record_settings(data_dir: str, options: dict) -> None:
    """Write DATA_DIR/extract.json; refuse to mix settings in one data folder.

    tclf-pack copies it into the manifest and tclf-train into model.h5, so
    that tclf-predict analyses new audio exactly as the training data was.
    """
    import json

    path = os.path.join(data_dir, SETTINGS_NAME)
    if os.path.exists(path):
        existing = storage.read_json(path)
        if existing != options:
            raise InputError(f"{data_dir} was extracted with {existing}, not {options}; use the "
                             f"same settings or another DATA_DIR")
        return
    os.makedirs(data_dir, exist_ok=True)
    storage.write_atomic(path, json.dumps(options, indent=1))


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
            progress: bool = True) -> ExtractSummary:
    """Extract every track of AUDIO_DIR into DATA_DIR.

    Parameters
    ----------
    jobs : int, optional
        Worker processes; default all cores. 1 runs in this process.
    progress : bool
        Show a progress bar.

    Every file that cannot be used is reported by a DataWarning naming it.

    Returns
    -------
    ExtractSummary

    Raises
    ------
    RuntimeError
        If no track could be extracted and none was already complete.
    """
    start_time = time.perf_counter()
    options = dict(num_segments=num_segments, segment_seconds=segment_seconds,
                   sample_rate=sample_rate, image_size=image_size, skip_fraction=skip_fraction)
    for path in (audio_dir, data_dir):
        if "://" in path:
            raise InputError(f"{path}: tclf-extract works on local folders; copy the result "
                             f"to remote storage afterwards (tclf-pack reads and writes gs://)")
    tracks = list_tracks(audio_dir)
    record_settings(data_dir, options)
    clean_temporary(data_dir)
    summary = ExtractSummary(collections.Counter(), collections.Counter(),
                             collections.Counter(), [], 0.0)
    tasks = []
    for class_name, track_id, path in tracks:
        track_dir = os.path.join(data_dir, class_name, track_id)
        if os.path.isdir(track_dir) and not overwrite:
            summary.existing[class_name] += 1
        else:
            tasks.append((class_name, track_id, path, track_dir, options, overwrite))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks) or 1))

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="track", desc="extract", disable=not progress)
    limits = None
    if jobs == 1:  # One core, as each worker of a pool: BLAS must not spread to the others.
        limits = _thread_limits()
        results = map(_extract_one, tasks)
        pool = None
    else:
        _warm_up(options)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # An executor, not multiprocessing.Pool: a worker that dies (the OOM killer) breaks
        # it with an error, where a Pool would wait forever for the lost task.
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                      initializer=_init_worker)
        results = (future.result() for future in concurrent.futures.as_completed(
            [pool.submit(_extract_one, task) for task in tasks]))
    try:
        for class_name, track_id, path, count, error in results:
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
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if limits is not None:
            limits.restore_original_limits()
    summary.seconds = time.perf_counter() - start_time
    if not summary.extracted and not summary.existing:
        raise RunError(f"no track could be extracted from {audio_dir} "
                           f"({len(tracks)} files found, {len(summary.failed)} failed)")
    return summary
