"""Classify new music: the library behind `tclf-predict`.

Inputs may be audio files, folders searched recursively for audio, or track
folders in the data/ layout (part_N.png + part_N.npy). Audio goes through
:func:`tclf.data.audio.analyze_file`, the code `tclf-extract` uses, in memory. A
track's prediction is the mean of its segments' probabilities. The class
names come from the model file, so any model.h5 written by tclf-train works
on its own.

Output formats (stable; ``model`` is the model file used):

* JSON: ``{"model", "classes", "tracks": [{"source", "style", "probabilities":
  {class: p}, "num_segments", "segments": [{"index", "start", "style",
  "probabilities"}]}], "failed": [{"source", "error"}]}``; ``segments`` only
  with ``--segments``; ``start`` is in seconds, null for data/ folders.
* CSV: header ``model,source,segment,start,style,p_<class>...``; one row per
  track with segment ``all``, and with ``--segments`` one row per segment
  (segment = its index) after it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time

import numpy as np

import tensorflow as tf
from tqdm import tqdm

from tclf import InputError, library_versions, report_skip
from tclf.data import audio, records
from tclf.data.reader import resize_image
from tclf.data.schema import FEATURES_KEY, SPECTROGRAM_KEY
from tclf.evaluation.calibration import apply_temperature
from tclf.evaluation.evaluate import mean_by_track
from tclf.model import (backbone_name, check_backbone_matches, image_size_of, load_config,
                        load_model, load_temperature, warn_if_librosa_differs)

UNKNOWN = "unknown"  # The style of a track below --min-confidence.
# The extraction settings prediction takes from a model: its standard segments, without the
# training-only ones (tclf-extract --training-segments).
ANALYSIS_SETTINGS = ("num_segments", "segment_seconds", "sample_rate", "skip_fraction",
                     "backbone")


@dataclasses.dataclass
class SegmentPrediction:
    index: int
    start: float | None
    probabilities: np.ndarray  # [classes]


@dataclasses.dataclass
class TrackPrediction:
    source: str
    style: str
    probabilities: np.ndarray  # [classes], mean over segments
    segments: list[SegmentPrediction]


@dataclasses.dataclass
class PredictionResult:
    model: str
    classes: list[str]
    tracks: list[TrackPrediction]
    failed: list[tuple[str, str]]
    seconds: float = 0.0
    analysis_seconds: float = 0.0  # Audio decoding and feature extraction.
    model_seconds: float = 0.0  # Running the network.

    def to_dict(self, segments: bool = False) -> dict:
        def probs(p):
            return {c: round(float(x), 6) for c, x in zip(self.classes, p)}

        tracks = []
        for track in self.tracks:
            item = {"source": track.source, "style": track.style,
                    "probabilities": probs(track.probabilities),
                    "num_segments": len(track.segments)}
            if segments:
                item["segments"] = [
                    {"index": s.index, "start": s.start,
                     "style": self.classes[int(np.argmax(s.probabilities))],
                     "probabilities": probs(s.probabilities)} for s in track.segments]
            tracks.append(item)
        return {"model": self.model, "classes": self.classes, "tracks": tracks,
                "failed": [{"source": s, "error": e} for s, e in self.failed]}


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def is_track_folder(path: str) -> bool:
    return bool(records.track_parts(path))


def collect_inputs(paths) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Expand PATHs into ("audio" | "track", path) items, and (path, error) for missing ones.

    Folders are searched recursively; a folder holding part_N.png files is a
    track folder (data/ layout), anything else is searched for audio files.
    """
    items, missing = [], []
    for path in paths:
        if os.path.isfile(path):
            items.append(("audio", path))
        elif is_track_folder(path):
            items.append(("track", path))
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                if is_track_folder(root):
                    items.append(("track", root))
                    continue
                items.extend(("audio", os.path.join(root, f)) for f in sorted(files)
                             if audio.is_audio_file(f) and not f.startswith("."))
        else:
            missing.append((path, f"{path}: no such file or folder"))
    return items, missing


def read_track_folder(path: str, backbone: str = audio.EFFICIENTNET,
                      segment_seconds: float = 10.0) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(index, spectrogram, features [10, 68]) per valid part of a data/ track whose
    spectrograms ``backbone`` reads (one line naming both when they are the other's)."""
    parts = []
    shape = audio.spectrogram_shape(backbone, segment_seconds)
    for index, png_path, npy_path in records.track_parts(path):
        try:
            _, features, image = records.read_pair(png_path, npy_path, shape)
        except records.OtherBackbone as error:
            check_backbone_matches(backbone, error.backbone, path)
        except (ValueError, OSError) as error:
            report_skip(f"skipped {error}")
            continue
        parts.append((index, image, features))
    if not parts:
        raise InputError(f"{path}: no usable part_N.png + part_N.npy pair")
    return parts


# ---------------------------------------------------------------------------
# Prediction.
# ---------------------------------------------------------------------------


def extraction_settings(model_path: str) -> dict:
    """The tclf-extract settings the model's training data was made with (stored in model.h5)."""
    settings = (load_config(model_path) or {}).get("extraction") or {}
    return {k: v for k, v in settings.items() if k in ANALYSIS_SETTINGS}


def predict_paths(paths, model_path: str = "models/latest.h5", batch_size: int = 32,
                  progress: bool = False, model=None, class_names=None,
                  min_confidence: float = 0.0, temperature: float | None = None
                  ) -> PredictionResult:
    """Classify the tracks of ``paths`` (audio files, folders of audio, data/ track folders).

    - ``model_path``: a model.h5 or model.keras written by tclf-train, its class names,
      temperature and extraction settings read from it; or an already loaded ``model`` and
      its ``class_names`` (audio then analysed with the default settings).
    - ``batch_size``: segments per forward pass; segments of several tracks share batches.
    - ``min_confidence``: a track whose highest probability is below it is ``UNKNOWN``.
    - ``temperature``: overrides the stored one (tclf.evaluation.calibration).
    Files that cannot be used are in the result's ``failed``, each also reported.
    """
    started = time.perf_counter()
    extraction, config = {}, None
    if model is None:
        model, class_names = load_model(model_path)
        config = load_config(model_path) or {}
        extraction = extraction_settings(model_path)
        if temperature is None:
            temperature = load_temperature(model_path)
    # The spectrogram is the one the model's backbone reads, whatever else is stored.
    extraction = {**extraction, "backbone": backbone_name(model)}
    items, failed = collect_inputs(paths)
    for _, error in failed:
        report_skip(error)
    if config is not None and any(kind == "audio" for kind, _ in items):
        warn_if_librosa_differs(model_path, config, library_versions()["librosa"],
                                "this tclf-predict analyses audio with")
    result = PredictionResult(model_path, list(class_names), [], failed)
    batches = _Batches(model, 1.0 if temperature is None else temperature, batch_size, result)
    for kind, path in tqdm(items, unit="track", desc="predict", disable=not progress):
        tick = time.perf_counter()
        try:
            parts = _parts(kind, path, extraction)
        except Exception as error:  # One bad file must not lose the others' results.
            message = str(error) if path in str(error) else f"{path}: {error}"
            result.failed.append((path, message))
            report_skip(f"skipped {message}")
            continue
        finally:
            result.analysis_seconds += time.perf_counter() - tick
        batches.add(path, parts)
    batches.flush()
    result.tracks = _track_predictions(batches.tracks, result.classes, min_confidence)
    result.seconds = time.perf_counter() - started
    return result


def _parts(kind: str, path: str, extraction: dict) -> list[tuple]:
    """(index, start in seconds or None, image, features) of each segment of one input."""
    if kind == "audio":
        return [(s.index, s.start, s.image, s.features)
                for s in audio.analyze_file(path, **extraction)]
    return [(i, None, image, f) for i, image, f in read_track_folder(
        path, extraction.get("backbone", audio.EFFICIENTNET),
        extraction.get("segment_seconds", 10.0))]


class _Batches:
    """Segments of several tracks, run through the model ``batch_size`` at a time."""

    def __init__(self, model, temperature: float, batch_size: int, result: PredictionResult):
        self.model, self.temperature, self.batch_size = model, temperature, batch_size
        self.image_size = image_size_of(model)
        self.result = result
        self.tracks = []  # (source, [SegmentPrediction])
        self.pending = []  # (track number, index, start, image, features)

    def add(self, source: str, parts: list[tuple]) -> None:
        self.tracks.append((source, []))
        for part in parts:
            self.pending.append((len(self.tracks) - 1, *part))
            if len(self.pending) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tick = time.perf_counter()
        images = np.stack([p[3] for p in self.pending])
        if self.image_size != images.shape[1]:
            images = resize_image(tf.constant(images), self.image_size).numpy()
        inputs = {SPECTROGRAM_KEY: images, FEATURES_KEY: np.stack([p[4] for p in self.pending])}
        probabilities = apply_temperature(
            np.asarray(self.model(inputs, training=False), np.float64), self.temperature)
        for (track, index, start, _, _), p in zip(self.pending, probabilities):
            self.tracks[track][1].append(SegmentPrediction(index, start, p))
        self.result.model_seconds += time.perf_counter() - tick
        self.pending = []


def _track_predictions(tracks, classes, min_confidence: float) -> list[TrackPrediction]:
    """Each track's style from the mean of its segments' probabilities."""
    segments = [(number, s) for number, (_, track) in enumerate(tracks) for s in track]
    if not segments:
        return []
    means, _, _ = mean_by_track(np.array([s.probabilities for _, s in segments]),
                                [str(number) for number, _ in segments])
    return [TrackPrediction(source, classes[int(np.argmax(mean))]
                            if mean.max() >= min_confidence else UNKNOWN, mean, track)
            for (source, track), mean in zip(tracks, means)]


# ---------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------


def format_json(result: PredictionResult, segments: bool = False) -> str:
    return json.dumps(result.to_dict(segments), indent=1) + "\n"


def format_csv(result: PredictionResult, segments: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "source", "segment", "start", "style"]
                    + [f"p_{c}" for c in result.classes])
    for track in result.tracks:
        writer.writerow([result.model, track.source, "all", "", track.style]
                        + [f"{p:.6f}" for p in track.probabilities])
        if segments:
            for s in track.segments:
                writer.writerow([result.model, track.source, s.index,
                                 "" if s.start is None else f"{s.start:.2f}",
                                 result.classes[int(np.argmax(s.probabilities))]]
                                + [f"{p:.6f}" for p in s.probabilities])
    return buffer.getvalue()


def format_table(result: PredictionResult, segments: bool = False) -> str:
    width = max([len("track")] + [len(t.source) for t in result.tracks]) + 2
    style_width = max([len("style")] + [len(c) for c in result.classes]) + 2
    columns = [max(len(c), 6) + 2 for c in result.classes]
    header = "track".ljust(width) + "style".ljust(style_width) + "".join(
        c.rjust(w) for c, w in zip(result.classes, columns))
    lines = [f"model: {result.model}", header, "-" * len(header)]
    for track in result.tracks:
        lines.append(track.source.ljust(width) + track.style.ljust(style_width) + "".join(
            f"{p:.4f}".rjust(w) for p, w in zip(track.probabilities, columns)))
        if segments:
            for s in track.segments:
                where = f"  part {s.index}" + ("" if s.start is None else f" @ {s.start:.1f} s")
                lines.append(where.ljust(width)
                             + result.classes[int(np.argmax(s.probabilities))].ljust(style_width)
                             + "".join(f"{p:.4f}".rjust(w)
                                       for p, w in zip(s.probabilities, columns)))
    return "\n".join(lines) + "\n"


FORMATTERS = {"table": format_table, "json": format_json, "csv": format_csv}
