"""Evaluation reports shared by training and ``tclf-eval``.

Everything that turns model outputs into files on disk lives here, so that
training (``models/vX/``, ``models/vX/analysis/``) and the ``tclf-eval``
command produce identical formats through a single code path:

* :func:`evaluate` computes segment- and track-level metrics into an
  :class:`Evaluation`.
* :func:`format_report` renders ``report.txt``; :func:`parse_report_metrics`
  reads the headline numbers back.
* :func:`plot_confusion_matrix` and :func:`plot_history` render PNG figures.
* :func:`write_evaluation` writes ``report.txt`` and ``confusion_matrix.png``.

All files are written with :func:`tclf.storage.write_atomic` through ``tf.io.gfile``
so that remote paths such as ``gs://`` work as well as local ones.
"""

from __future__ import annotations

import dataclasses
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn import metrics as skmetrics  # noqa: E402

from tclf.storage import join, write_atomic  # noqa: E402

REPORT_FILENAME = "report.txt"
CONFUSION_FILENAME = "confusion_matrix.png"
TRACK_SECTION_TITLE = "Track level (mean of segment probabilities)"
SEGMENT_SECTION_TITLE = "Segment level"
CONFUSION_CHOICES = ("segment", "track", "both")

_DPI = 120
_METRIC_LINE = re.compile(r"^(accuracy|macro F1): (\S+)\s*$")


# --------------------------------------------------------------------------
# File output
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


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
        raise ValueError("probabilities contain NaN or infinite values")
    return probs


def _as_labels(labels, num_segments: int, num_classes: int | None = None) -> np.ndarray:
    """Validate and convert integer labels to an int64 array of shape [N]."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {arr.shape}")
    if arr.shape[0] != num_segments:
        raise ValueError(
            f"labels has length {arr.shape[0]} but probabilities has "
            f"{num_segments} rows"
        )
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
    ids = np.asarray(track_ids, dtype=object)
    if ids.ndim != 1:
        raise ValueError(f"track_ids must have shape [N], got shape {ids.shape}")
    if ids.shape[0] != num_segments:
        raise ValueError(
            f"track_ids has length {ids.shape[0]} but probabilities has "
            f"{num_segments} rows"
        )
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

    Parameters
    ----------
    probabilities : array-like of float, shape [N, C]
        Per-segment class probabilities.
    labels : array-like of int, shape [N]
        Per-segment true class index.
    track_ids : array-like of str or bytes, shape [N]
        Track each segment belongs to. Bytes are decoded as UTF-8 (as produced
        by ``tf.data`` string tensors).

    Returns
    -------
    track_probs : np.ndarray of float64, shape [T, C]
        Mean of each track's segment probabilities.
    track_labels : np.ndarray of int64, shape [T]
        True class of each track.
    unique_ids : np.ndarray of str, shape [T]
        Track ids in order of first appearance.

    Raises
    ------
    ValueError
        If shapes or lengths disagree, or a track has segments with different
        labels.
    """
    probs = _as_probabilities(probabilities)
    n, c = probs.shape
    labs = _as_labels(labels, n)
    ids = _as_track_ids(track_ids, n)

    index: dict[str, int] = {}
    inverse = np.fromiter(
        (index.setdefault(tid, len(index)) for tid in ids), dtype=np.int64, count=n
    )
    t = len(index)
    sums = np.zeros((t, c), dtype=np.float64)
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=t).astype(np.float64)

    lo = np.full(t, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(t, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, inverse, labs)
    np.maximum.at(hi, inverse, labs)
    mixed = np.flatnonzero(lo != hi)
    unique_ids = np.array(list(index), dtype=str) if t else np.array([], dtype=str)
    if mixed.size:
        examples = ", ".join(
            f"{unique_ids[i]!r} (labels {sorted(set(labs[inverse == i].tolist()))})"
            for i in mixed[:5]
        )
        raise ValueError(
            f"{mixed.size} track(s) have segments with different labels: {examples}"
        )
    track_probs = sums / counts[:, None]
    return track_probs, lo, unique_ids


@dataclasses.dataclass
class Evaluation:
    """Everything a report needs, at segment and track level.

    Attributes
    ----------
    class_names : list of str, length C
    segment_accuracy, segment_macro_f1 : float
    track_accuracy, track_macro_f1 : float
    segment_confusion : np.ndarray of int, shape [C, C]
        Counts; rows are true classes, columns predicted classes.
    track_confusion : np.ndarray of int, shape [C, C]
        Same at track level.
    segment_report, track_report : str
        ``sklearn.metrics.classification_report`` text.
    num_segments, num_tracks : int
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

    def to_dict(self) -> dict:
        """Return a JSON-serializable summary (report text omitted).

        Returns
        -------
        dict
            Class names, the four headline metrics, both confusion matrices as
            nested lists of int (shape [C, C]), and the segment/track counts.
        """
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
        }


def _classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> tuple[float, float, np.ndarray, str]:
    """Accuracy, macro F1, confusion [C, C] and report text for one level."""
    label_ids = list(range(len(class_names)))
    accuracy = float(skmetrics.accuracy_score(y_true, y_pred))
    macro_f1 = float(
        skmetrics.f1_score(
            y_true, y_pred, labels=label_ids, average="macro", zero_division=0
        )
    )
    confusion = skmetrics.confusion_matrix(y_true, y_pred, labels=label_ids)
    report = skmetrics.classification_report(
        y_true,
        y_pred,
        labels=label_ids,
        target_names=class_names,
        digits=4,
        zero_division=0,
    )
    return accuracy, macro_f1, confusion.astype(np.int64), report


def evaluate(probabilities, labels, track_ids, class_names) -> Evaluation:
    """Compute segment- and track-level metrics.

    Predictions are the argmax of the probabilities; a track's prediction is
    the argmax of the mean of its segments' probabilities.

    Parameters
    ----------
    probabilities : array-like of float, shape [N, C]
    labels : array-like of int, shape [N]
        Values in ``[0, C)``.
    track_ids : array-like of str or bytes, shape [N]
    class_names : sequence of str, length C

    Returns
    -------
    Evaluation

    Raises
    ------
    ValueError
        On empty input, inconsistent shapes, out-of-range labels, duplicate
        class names or tracks with mixed labels.
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
    )


# --------------------------------------------------------------------------
# Text report
# --------------------------------------------------------------------------


def _underlined(text: str, char: str) -> list[str]:
    """Return ``text`` and an underline of the same length."""
    return [text, char * len(text)]


def _format_confusion_text(confusion: np.ndarray, class_names: list[str]) -> list[str]:
    """Render a [C, C] confusion matrix as aligned text lines."""
    width = max([len(name) for name in class_names] + [len(str(int(confusion.max(initial=0)))), 4])
    lines = ["confusion matrix (rows = true, columns = predicted):"]
    lines.append(" " * (width + 3) + " ".join(f"{name:>{width}}" for name in class_names))
    for name, row in zip(class_names, confusion):
        lines.append(f"  {name:>{width}} " + " ".join(f"{int(v):>{width}}" for v in row))
    return lines


def _format_section(
    heading: str,
    accuracy: float,
    macro_f1: float,
    report: str,
    confusion: np.ndarray,
    class_names: list[str],
) -> list[str]:
    """Lines of one report section (segment or track level)."""
    lines = _underlined(heading, "-")
    lines += [f"accuracy: {accuracy:.4f}", f"macro F1: {macro_f1:.4f}", ""]
    lines += report.rstrip("\n").splitlines()
    lines.append("")
    lines += _format_confusion_text(np.asarray(confusion), class_names)
    return lines


def format_report(evaluation: Evaluation, title: str = "") -> str:
    """Render the content of ``report.txt``.

    Parameters
    ----------
    evaluation : Evaluation
    title : str, optional
        First line of the report; ``"Evaluation report"`` if empty.

    Returns
    -------
    str
        The report, ending in a newline. The lines ``accuracy: X.XXXX`` and
        ``macro F1: X.XXXX`` of each section can be read back with
        :func:`parse_report_metrics`.
    """
    if not isinstance(evaluation, Evaluation):
        raise ValueError(
            f"evaluation must be an Evaluation, got {type(evaluation).__name__}"
        )
    ev = evaluation
    lines = _underlined(title or "Evaluation report", "=")
    lines += [
        f"classes: {', '.join(ev.class_names)}",
        f"segments: {ev.num_segments}",
        f"tracks: {ev.num_tracks}",
        "",
    ]
    lines += _format_section(
        SEGMENT_SECTION_TITLE,
        ev.segment_accuracy,
        ev.segment_macro_f1,
        ev.segment_report,
        ev.segment_confusion,
        ev.class_names,
    )
    lines.append("")
    lines += _format_section(
        TRACK_SECTION_TITLE,
        ev.track_accuracy,
        ev.track_macro_f1,
        ev.track_report,
        ev.track_confusion,
        ev.class_names,
    )
    return "\n".join(lines) + "\n"


def parse_report_metrics(text: str) -> dict:
    """Read the headline metrics back from :func:`format_report` output.

    Parameters
    ----------
    text : str
        Content of a ``report.txt``.

    Returns
    -------
    dict
        ``{"segment_accuracy", "segment_macro_f1", "track_accuracy",
        "track_macro_f1"}`` mapped to floats (4 decimals of precision).

    Raises
    ------
    ValueError
        If a section or one of its metric lines is missing.
    """
    keys = {"accuracy": "accuracy", "macro F1": "macro_f1"}
    result: dict[str, float] = {}
    section = None
    for line in text.splitlines():
        if line.startswith(SEGMENT_SECTION_TITLE):
            section = "segment"
        elif line.startswith("Track level"):
            section = "track"
        elif section is not None:
            match = _METRIC_LINE.match(line)
            if match:
                name = f"{section}_{keys[match.group(1)]}"
                result.setdefault(name, float(match.group(2)))
    expected = ["segment_accuracy", "segment_macro_f1", "track_accuracy", "track_macro_f1"]
    missing = [key for key in expected if key not in result]
    if missing:
        raise ValueError(f"report text is missing metrics {missing}; is it a tclf report.txt?")
    return {key: result[key] for key in expected}


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _save_figure(fig, path: str) -> None:
    """Render ``fig`` to PNG in memory, close it and write it to ``path``."""
    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _validate_confusion(confusion, class_names) -> tuple[np.ndarray, list[str]]:
    """Check a confusion matrix [C, C] against C class names."""
    matrix = np.asarray(confusion)
    names = [str(name) for name in class_names]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {matrix.shape}")
    if matrix.shape[0] != len(names):
        raise ValueError(
            f"confusion is {matrix.shape[0]}x{matrix.shape[1]} but "
            f"{len(names)} class names were given"
        )
    if matrix.size and (not np.all(np.isfinite(matrix)) or np.any(matrix < 0)):
        raise ValueError("confusion must contain non-negative finite counts")
    return matrix, names


def row_normalized(confusion) -> np.ndarray:
    """Row-normalize a confusion matrix.

    Parameters
    ----------
    confusion : array-like, shape [C, C]
        Counts, rows = true class.

    Returns
    -------
    np.ndarray of float64, shape [C, C]
        Each row divided by its total; rows with zero total are all 0.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def _draw_confusion(ax, confusion: np.ndarray, class_names: list[str], title: str) -> None:
    """Draw one annotated confusion heatmap on ``ax``."""
    rates = row_normalized(confusion)
    annotations = np.empty(confusion.shape, dtype=object)
    for (i, j), count in np.ndenumerate(confusion):
        count_text = f"{int(count)}" if float(count).is_integer() else f"{count:g}"
        annotations[i, j] = f"{count_text}\n({rates[i, j]:.1%})"
    sns.heatmap(
        rates,
        annot=annotations,
        fmt="",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        square=True,
        linewidths=0.5,
        linecolor="white",
        xticklabels=class_names,
        yticklabels=class_names,
        cbar_kws={"label": "row-normalized rate"},
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    ax.tick_params(axis="y", labelrotation=0)


def _confusion_figure(panels: list[tuple[np.ndarray, str]], class_names: list[str], suptitle: str = ""):
    """Create a figure with one confusion heatmap per (matrix, title) panel."""
    side = max(4.0, 1.1 * len(class_names) + 2.5)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(
            1, len(panels), figsize=(side * 1.25 * len(panels), side), squeeze=False
        )
        for ax, (matrix, title) in zip(axes[0], panels):
            _draw_confusion(ax, matrix, class_names, title)
        if suptitle:
            fig.suptitle(suptitle)
    return fig


def plot_confusion_matrix(
    confusion, class_names, path: str, title: str = "Confusion matrix (validation)"
) -> None:
    """Save an annotated confusion-matrix heatmap as PNG.

    Cells are coloured by the row-normalized rate and annotated with the count
    and the rate, e.g. ``"12\\n(85.7%)"``. Rows with zero total get rate 0.

    Parameters
    ----------
    confusion : array-like of int, shape [C, C]
        Counts; rows are true classes, columns predicted classes.
    class_names : sequence of str, length C
    path : str
        Output PNG path (written atomically through ``tf.io.gfile``).
    title : str, optional

    Raises
    ------
    ValueError
        If the matrix is not square, does not match ``class_names`` or holds
        negative/non-finite values.
    """
    matrix, names = _validate_confusion(confusion, class_names)
    fig = _confusion_figure([(matrix, title)], names)
    _save_figure(fig, path)


def _history_dict(history, index: int) -> dict:
    """Return the metrics dict of one stage (dict or Keras History)."""
    history = getattr(history, "history", history)
    if history is None:
        return {}
    if not isinstance(history, dict):
        raise ValueError(
            f"histories[{index}] must be a dict (Keras History.history), "
            f"got {type(history).__name__}"
        )
    return history


def _stage_length(history: dict) -> int:
    """Number of epochs recorded in one stage's history dict."""
    return max((len(np.atleast_1d(v)) for v in history.values()), default=0)


def _series(history: dict, key: str, length: int) -> np.ndarray:
    """Values of ``key`` padded with NaN to ``length`` (all NaN if absent)."""
    out = np.full(length, np.nan)
    if key in history:
        values = np.asarray(history[key], dtype=np.float64).ravel()
        out[: values.size] = values
    return out


def plot_history(
    histories: list[dict], metric: str, path: str, stage_names=None
) -> None:
    """Plot training curves of all stages on one axis and save as PNG.

    Epochs are numbered continuously ``1..total`` across stages; a dashed
    vertical line marks the start of each later stage, and every stage is
    labelled with its name. Missing ``val_<metric>`` keys and empty stages are
    tolerated (the curve is simply absent there).

    Parameters
    ----------
    histories : list of dict
        One Keras ``History.history`` dict (or ``History`` object) per stage,
        mapping keys such as ``"accuracy"``/``"val_accuracy"`` to per-epoch
        value lists of shape [E_i].
    metric : str
        Base metric name, e.g. ``"accuracy"`` or ``"loss"``; ``"val_" + metric``
        is plotted as the validation curve.
    path : str
        Output PNG path (written atomically through ``tf.io.gfile``).
    stage_names : sequence of str, optional
        One name per stage; defaults to ``"stage 1"``, ``"stage 2"``, ...

    Raises
    ------
    ValueError
        If ``histories`` is not a list of dicts, ``stage_names`` has the wrong
        length, or epochs were recorded but none for ``metric``.
    """
    if isinstance(histories, dict) or not isinstance(histories, (list, tuple)):
        raise ValueError(
            "histories must be a list with one History.history dict per stage, "
            f"got {type(histories).__name__}"
        )
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty string, got {metric!r}")
    stages = [_history_dict(h, i) for i, h in enumerate(histories)]
    names = (
        [f"stage {i + 1}" for i in range(len(stages))]
        if stage_names is None
        else [str(name) for name in stage_names]
    )
    if len(names) != len(stages):
        raise ValueError(
            f"got {len(names)} stage_names for {len(stages)} histories"
        )
    val_key = f"val_{metric}"
    available = sorted({key for stage in stages for key in stage})
    if available and metric not in available and val_key not in available:
        raise ValueError(
            f"metric {metric!r} not found in any history; available keys: {available}"
        )

    lengths = [_stage_length(stage) for stage in stages]
    total = int(sum(lengths))
    epochs = np.arange(1, total + 1)
    train = np.concatenate([_series(s, metric, n) for s, n in zip(stages, lengths)] or [np.zeros(0)])
    val = np.concatenate([_series(s, val_key, n) for s, n in zip(stages, lengths)] or [np.zeros(0)])

    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        marker = "o" if total <= 60 else None
        if np.any(np.isfinite(train)):
            ax.plot(epochs, train, marker=marker, markersize=3, color="C0", label="train")
        if np.any(np.isfinite(val)):
            ax.plot(epochs, val, marker=marker, markersize=3, color="C1", label="val")
        _mark_stages(ax, lengths, names)
        if total == 0:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_xlim(0.5, total + 0.5)
            ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    _save_figure(fig, path)


def _mark_stages(ax, lengths: list[int], names: list[str]) -> None:
    """Draw dashed stage boundaries and stage-name labels on ``ax``."""
    transform = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    offset = 0
    for length, name in zip(lengths, names):
        if length == 0:
            continue
        start = offset + 0.5
        if offset > 0:
            ax.axvline(start, color="0.4", linestyle="--", linewidth=1)
        ax.text(
            start, 0.98, f" {name}", transform=transform,
            ha="left", va="top", fontsize=9, color="0.25",
        )
        offset += length


# --------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------


def write_evaluation(
    evaluation: Evaluation, out_dir: str, title: str = "", confusion: str = "segment"
) -> list[str]:
    """Write ``report.txt`` and ``confusion_matrix.png`` into ``out_dir``.

    Parameters
    ----------
    evaluation : Evaluation
    out_dir : str
        Output directory (created with ``tf.io.gfile.makedirs``).
    title : str, optional
        Report title, also used as the figure's title.
    confusion : {"segment", "track", "both"}, optional
        Which confusion matrix to draw; ``"both"`` puts the segment and track
        heatmaps side by side in the same figure.

    Returns
    -------
    list of str
        Paths written: ``[report.txt, confusion_matrix.png]``.

    Raises
    ------
    ValueError
        If ``confusion`` is not one of the choices or ``evaluation`` is not an
        :class:`Evaluation`.
    """
    if confusion not in CONFUSION_CHOICES:
        raise ValueError(f"confusion must be one of {CONFUSION_CHOICES}, got {confusion!r}")
    if not isinstance(evaluation, Evaluation):
        raise ValueError(
            f"evaluation must be an Evaluation, got {type(evaluation).__name__}"
        )
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"out_dir must be a non-empty string, got {out_dir!r}")
    tf.io.gfile.makedirs(out_dir)

    report_path = join(out_dir, REPORT_FILENAME)
    write_atomic(report_path, format_report(evaluation, title=title))

    panels = []
    if confusion in ("segment", "both"):
        matrix, names = _validate_confusion(evaluation.segment_confusion, evaluation.class_names)
        panels.append((matrix, f"segment level ({evaluation.num_segments} segments)"))
    if confusion in ("track", "both"):
        matrix, names = _validate_confusion(evaluation.track_confusion, evaluation.class_names)
        panels.append((matrix, f"track level ({evaluation.num_tracks} tracks)"))
    fig = _confusion_figure(panels, names, suptitle=title or "Confusion matrix")
    confusion_path = join(out_dir, CONFUSION_FILENAME)
    _save_figure(fig, confusion_path)
    return [report_path, confusion_path]
