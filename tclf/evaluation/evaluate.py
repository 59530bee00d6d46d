"""Evaluation: a model's predictions over a packed split, and segment- and track-level metrics.

Used after training and by `tclf-eval`; `tclf-predict` shares the track aggregation
(:func:`mean_by_track`: a track's probabilities are the mean of its segments').
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tclf import InputError, RunError, storage
from tclf.data import reader, schema
from tclf.evaluation.calibration import apply_temperature, expected_calibration_error
from tclf.model import backbone_name, check_backbone_matches, image_size_of


def _as_probabilities(probabilities, num_classes: int | None = None) -> np.ndarray:
    """Validate and convert probabilities to a float64 array of shape [N, C]."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(
            f"probabilities must have shape [N, C], got shape {probs.shape}"
        )
    if probs.shape[1] == 0:
        raise ValueError("probabilities must have at least one class column (C >= 1)")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(
            f"probabilities have {probs.shape[1]} columns but {num_classes} "
            "class names were given"
        )
    if not np.all(np.isfinite(probs)):
        raise RunError("the model's probabilities contain NaN or infinite values: training "
                       "diverged (try a lower learning rate, or --precision float32)")
    return probs


def _one_per_segment(name: str, values, num_segments: int, dtype=None) -> np.ndarray:
    """``values`` as an array of shape [num_segments], or a ValueError naming it."""
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got shape {arr.shape}")
    if arr.shape[0] != num_segments:
        raise ValueError(f"{name} has length {arr.shape[0]} but probabilities has "
                         f"{num_segments} rows")
    return arr


def _as_labels(labels, num_segments: int, num_classes: int | None = None) -> np.ndarray:
    """Validate and convert integer labels to an int64 array of shape [N]."""
    arr = _one_per_segment("labels", labels, num_segments)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if num_classes is not None and arr.size:
        bad = (arr < 0) | (arr >= num_classes)
        if np.any(bad):
            raise ValueError(
                f"labels must be in [0, {num_classes}), found "
                f"{sorted(set(arr[bad].tolist()))[:10]}"
            )
    return arr


def _as_track_ids(track_ids, num_segments: int) -> list[str]:
    """Convert track ids (str or UTF-8 bytes) to a list of ``num_segments`` str."""
    ids = _one_per_segment("track_ids", track_ids, num_segments, dtype=object)
    out = []
    for tid in ids.tolist():
        if isinstance(tid, (bytes, bytearray, np.bytes_)):
            tid = bytes(tid).decode("utf-8")
        elif not isinstance(tid, str):
            raise ValueError(
                f"track_ids must be str or bytes, got {type(tid).__name__}: {tid!r}"
            )
        out.append(str(tid))
    return out


def track_level(
    probabilities, labels, track_ids
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate segment predictions into track predictions.

    Per segment: ``probabilities`` [N, C], ``labels`` (class index) [N] and ``track_ids``
    [N] (str, or UTF-8 bytes as tf.data yields them). Returns (track probabilities float64
    [T, C], the mean of each track's segments'; true classes int64 [T]; track ids str [T], in
    order of first appearance). ValueError if shapes or lengths disagree or a track's
    segments have different labels.
    """
    probs = _as_probabilities(probabilities)
    n = probs.shape[0]
    labs = _as_labels(labels, n)
    track_probs, unique_ids, inverse = mean_by_track(probs, _as_track_ids(track_ids, n))
    t = len(unique_ids)
    lo = np.full(t, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(t, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, inverse, labs)
    np.maximum.at(hi, inverse, labs)
    mixed = np.flatnonzero(lo != hi)
    if mixed.size:
        examples = ", ".join(
            f"{unique_ids[i]!r} (labels {sorted(set(labs[inverse == i].tolist()))})"
            for i in mixed[:5]
        )
        raise ValueError(
            f"{mixed.size} track(s) have segments with different labels: {examples}"
        )
    return track_probs, lo, unique_ids


def mean_by_track(probabilities: np.ndarray, track_ids) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """A track's probabilities: the mean of its segments'.

    Returns (track probabilities [T, C] float64, the T track ids in order of first
    appearance, and each segment's track index [N]).
    """
    index: dict = {}
    inverse = np.fromiter((index.setdefault(tid, len(index)) for tid in track_ids),
                          dtype=np.int64, count=len(probabilities))
    sums = np.zeros((len(index), probabilities.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, probabilities)
    counts = np.bincount(inverse, minlength=len(index)).astype(np.float64)
    ids = np.array(list(index), dtype=str) if index else np.array([], dtype=str)
    return sums / counts[:, None], ids, inverse


@dataclasses.dataclass
class Evaluation:
    """Everything a report needs, at segment and track level, for C classes.

    The confusion matrices are int counts [C, C], rows true classes, columns predicted; the
    reports are ``sklearn.metrics.classification_report`` text.
    """

    class_names: list[str]
    segment_accuracy: float
    segment_macro_f1: float
    track_accuracy: float
    track_macro_f1: float
    segment_confusion: np.ndarray
    track_confusion: np.ndarray
    segment_report: str
    track_report: str
    num_segments: int
    num_tracks: int
    track_ece: float = float("nan")  # Expected calibration error of the track probabilities.
    temperature: float = 1.0  # Applied to the probabilities (tclf.evaluation.calibration).
    # Per level: sklearn's classification report as a dict (per class, macro and weighted avg).
    segment_classes: dict = dataclasses.field(default_factory=dict)
    track_classes: dict = dataclasses.field(default_factory=dict)
    # Per track, in order of first appearance: id, true class index, probabilities [T, C].
    track_ids: list = dataclasses.field(default_factory=list)
    track_labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
    track_probabilities: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0)))

    def track_rows(self) -> list[dict]:
        """One row per track for fixing labels: the wrong ones first, most confident first,
        then the right ones, least confident first (the closest calls)."""
        rows = []
        for track, label, probs in zip(self.track_ids, self.track_labels,
                                       self.track_probabilities):
            predicted = int(np.argmax(probs))
            rows.append({"track": str(track), "true": self.class_names[int(label)],
                         "predicted": self.class_names[predicted],
                         "confidence": float(probs[predicted]),
                         "correct": bool(predicted == int(label)),
                         "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)}})
        return sorted(rows, key=lambda r: (r["correct"],
                                           r["confidence"] * (1 if r["correct"] else -1),
                                           r["track"]))

    def mistakes(self, count: int = 10) -> list[dict]:
        """The ``count`` most confident wrong tracks."""
        return [row for row in self.track_rows() if not row["correct"]][:count]

    def to_dict(self) -> dict:
        """A JSON-serializable summary: class names, segment and track counts, the four
        headline metrics, both confusion matrices (nested int lists [C, C]), the track ECE
        and the temperature; no report text."""
        return {
            "class_names": [str(name) for name in self.class_names],
            "num_segments": int(self.num_segments),
            "num_tracks": int(self.num_tracks),
            "segment_accuracy": float(self.segment_accuracy),
            "segment_macro_f1": float(self.segment_macro_f1),
            "track_accuracy": float(self.track_accuracy),
            "track_macro_f1": float(self.track_macro_f1),
            "segment_confusion": np.asarray(self.segment_confusion).astype(int).tolist(),
            "track_confusion": np.asarray(self.track_confusion).astype(int).tolist(),
            "track_ece": float(self.track_ece),
            "temperature": float(self.temperature),
        }


def _classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> tuple[float, float, np.ndarray, str, dict]:
    """Accuracy, macro F1, confusion [C, C], report text and report dict for one level."""
    from sklearn import metrics as skmetrics

    label_ids = list(range(len(class_names)))
    accuracy = float(skmetrics.accuracy_score(y_true, y_pred))
    macro_f1 = float(
        skmetrics.f1_score(
            y_true, y_pred, labels=label_ids, average="macro", zero_division=0
        )
    )
    confusion = skmetrics.confusion_matrix(y_true, y_pred, labels=label_ids)
    options = dict(labels=label_ids, target_names=class_names, zero_division=0)
    report = skmetrics.classification_report(y_true, y_pred, digits=4, **options)
    table = skmetrics.classification_report(y_true, y_pred, output_dict=True, **options)
    table = {name: {key: float(value) for key, value in row.items()}
             for name, row in table.items() if isinstance(row, dict)}  # Not "accuracy".
    return accuracy, macro_f1, confusion.astype(np.int64), report, table


def evaluate_predictions(probabilities, labels, track_ids, class_names,
                         temperature: float = 1.0) -> Evaluation:
    """Segment- and track-level metrics of ``probabilities`` [N, C] against ``labels`` [N]
    (in [0, C)), with ``track_ids`` [N] (str or bytes) and C distinct ``class_names``.

    A segment's prediction is its argmax, a track's the argmax of its segments' mean.
    ``temperature`` scales the segment probabilities first (tclf.evaluation.calibration):
    accuracies do not depend on it, the track ECE does. ValueError on empty input,
    inconsistent shapes, out-of-range labels, duplicate class names or tracks with mixed
    labels; RunError for NaN or infinite probabilities (training diverged).
    """
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    probs = _as_probabilities(probabilities, num_classes=len(names))
    if probs.shape[0] == 0:
        raise ValueError("cannot evaluate an empty set of segments (N == 0)")
    labs = _as_labels(labels, probs.shape[0], num_classes=len(names))
    probs = apply_temperature(probs, temperature)
    track_probs, track_labels, unique_ids = track_level(probs, labs, track_ids)

    seg = _classification_metrics(labs, probs.argmax(axis=1), names)
    trk = _classification_metrics(track_labels, track_probs.argmax(axis=1), names)
    return Evaluation(
        class_names=names,
        segment_accuracy=seg[0],
        segment_macro_f1=seg[1],
        track_accuracy=trk[0],
        track_macro_f1=trk[1],
        segment_confusion=seg[2],
        track_confusion=trk[2],
        segment_report=seg[3],
        track_report=trk[3],
        num_segments=int(probs.shape[0]),
        num_tracks=int(unique_ids.shape[0]),
        track_ece=expected_calibration_error(track_probs, track_labels),
        temperature=float(temperature),
        segment_classes=seg[4],
        track_classes=trk[4],
        track_ids=[str(t) for t in unique_ids],
        track_labels=np.asarray(track_labels, np.int64),
        track_probabilities=np.asarray(track_probs, np.float64),
    )


def predict_records(model, records, split: str = "val", batch_size: int = 32,
                    image_size: int | None = None):
    """Run a model over one split of ``records`` (a Pack or its folder), in fixed order:
    (probabilities [n, classes], labels [n], track ids: a list of n str)."""
    if image_size is None:  # Feed the size the model was built for.
        image_size = image_size_of(model)
    pack = schema.as_pack(records)
    dataset = reader.make_dataset(pack, split, batch_size=batch_size, training=False,
                                  image_size=image_size, include_track_id=True)
    probabilities, labels, track_ids = [], [], []
    with reader.naming_corrupt_shards(pack, split):
        for inputs, label, track in dataset:
            probabilities.append(np.asarray(model(inputs, training=False), np.float64))
            labels.append(label.numpy())
            track_ids.extend(t.decode() for t in track.numpy())
    return np.concatenate(probabilities), np.concatenate(labels), track_ids


def evaluate_records(model, class_names, records, split: str = "val",
                     batch_size: int = 32, temperature: float = 1.0) -> Evaluation:
    """Segment- and track-level metrics of a model on a packed split, its probabilities at
    ``temperature`` (the one stored in its model.h5: tclf.model.load_temperature)."""
    pack = schema.as_pack(records)
    check_backbone_matches(backbone_name(model), pack.backbone,
                           storage.join(pack.path, schema.MANIFEST_NAME))
    if list(pack.classes) != list(class_names):
        raise InputError(f"the model's classes {list(class_names)} differ from those of "
                         f"{storage.join(pack.path, schema.MANIFEST_NAME)} "
                         f"{list(pack.classes)}: evaluate a model on records of its classes")
    probabilities, labels, track_ids = predict_records(model, pack, split, batch_size)
    return evaluate_predictions(probabilities, labels, track_ids, class_names, temperature)
