"""The report set of an evaluation: report.txt (segment and track level), metrics.json (its
figures, for programs), predictions.csv (a row per track, for fixing labels) and the figures.

Training (models/vX/ and models/vX/analysis/, via tclf.training.versions.write_report_set) and
`tclf-eval` both write them with :func:`write_evaluation`, so the formats are the same.
:func:`parse_report_metrics` reads report.txt's headline numbers back. Metrics are computed in
tclf.evaluation.evaluate, figures drawn in tclf.evaluation.plots.
"""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np

from tclf.evaluation import plots
from tclf.evaluation.evaluate import Evaluation
from tclf.storage import join, makedirs, write_atomic

REPORT_FILENAME = "report.txt"
METRICS_FILENAME = "metrics.json"
PREDICTIONS_FILENAME = "predictions.csv"
MISTAKES_SHOWN = 10
CONFUSION_FILENAME = "confusion_matrix.png"
TRACK_SECTION_TITLE = "Track level (mean of segment probabilities)"
SEGMENT_SECTION_TITLE = "Segment level"
CONFUSION_CHOICES = ("segment", "track", "both")

_METRIC_LINE = re.compile(r"^(accuracy|macro F1): (\S+)\s*$")


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
    """The text of report.txt, ending in a newline, headed ``title`` (default "Evaluation
    report"). Each section's ``accuracy: X.XXXX`` and ``macro F1: X.XXXX`` lines are what
    :func:`parse_report_metrics` reads back. ValueError unless given an Evaluation."""
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
        f"calibration: temperature {ev.temperature:.3f}; expected calibration error of the "
        f"track probabilities {ev.track_ece:.4f}",
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
    lines += ["", *_format_mistakes(ev)]
    return "\n".join(lines) + "\n"


def _format_mistakes(evaluation: Evaluation) -> list[str]:
    """The most confident wrong tracks, the first to listen to when fixing labels."""
    mistakes = evaluation.mistakes(MISTAKES_SHOWN)
    lines = _underlined(f"Most confident mistakes (tracks; all in {PREDICTIONS_FILENAME})", "-")
    if not mistakes:
        return lines + ["none"]
    width = max(len(row["track"]) for row in mistakes)
    return lines + [f"{row['track']:<{width}}  true {row['true']}, predicted {row['predicted']} "
                    f"({row['confidence']:.4f})" for row in mistakes]


def metrics_dict(evaluation: Evaluation, title: str = "") -> dict:
    """Every figure of report.txt, as metrics.json holds it."""
    ev = evaluation

    def level(count, accuracy, macro_f1, classes, confusion):
        return {"count": int(count), "accuracy": float(accuracy), "macro_f1": float(macro_f1),
                "per_class": {name: classes[name] for name in ev.class_names if name in classes},
                "macro_avg": classes.get("macro avg", {}),
                "weighted_avg": classes.get("weighted avg", {}),
                "confusion": np.asarray(confusion).astype(int).tolist()}

    return {"title": title, "classes": list(ev.class_names),
            "temperature": float(ev.temperature), "track_ece": float(ev.track_ece),
            "segment": level(ev.num_segments, ev.segment_accuracy, ev.segment_macro_f1,
                             ev.segment_classes, ev.segment_confusion),
            "track": level(ev.num_tracks, ev.track_accuracy, ev.track_macro_f1,
                           ev.track_classes, ev.track_confusion),
            "mistakes": ev.mistakes(MISTAKES_SHOWN)}


def format_predictions_csv(evaluation: Evaluation) -> str:
    """predictions.csv: a row per track, wrong ones first by confidence (Evaluation.track_rows)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["track", "true_style", "predicted_style", "correct", "confidence"]
                    + [f"p_{name}" for name in evaluation.class_names])
    for row in evaluation.track_rows():
        writer.writerow([row["track"], row["true"], row["predicted"], int(row["correct"]),
                         f"{row['confidence']:.6f}"]
                        + [f"{row['probabilities'][name]:.6f}" for name in evaluation.class_names])
    return buffer.getvalue()


def parse_report_metrics(text: str) -> dict:
    """The headline metrics in ``text``, a report.txt (:func:`format_report`): a dict of
    segment_accuracy, segment_macro_f1, track_accuracy and track_macro_f1 (floats with 4
    decimals). ValueError if a section or one of its metric lines is missing."""
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


def write_evaluation(
    evaluation: Evaluation, out_dir: str, title: str = "", confusion: str = "segment"
) -> list[str]:
    """Write report.txt, confusion_matrix.png, metrics.json and predictions.csv into
    ``out_dir`` (created if missing; local or remote); return their paths in that order.

    ``title`` heads the report and the figure. ``confusion`` ("segment", "track" or "both")
    picks the matrix drawn; "both" puts the two side by side. ValueError for another
    ``confusion``, a non-Evaluation or an empty ``out_dir``.
    """
    if confusion not in CONFUSION_CHOICES:
        raise ValueError(f"confusion must be one of {CONFUSION_CHOICES}, got {confusion!r}")
    if not isinstance(evaluation, Evaluation):
        raise ValueError(
            f"evaluation must be an Evaluation, got {type(evaluation).__name__}"
        )
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"out_dir must be a non-empty string, got {out_dir!r}")
    makedirs(out_dir)

    report_path = join(out_dir, REPORT_FILENAME)
    write_atomic(report_path, format_report(evaluation, title=title))

    panels = []
    if confusion in ("segment", "both"):
        panels.append((evaluation.segment_confusion,
                       f"segment level ({evaluation.num_segments} segments)"))
    if confusion in ("track", "both"):
        panels.append((evaluation.track_confusion,
                       f"track level ({evaluation.num_tracks} tracks)"))
    confusion_path = join(out_dir, CONFUSION_FILENAME)
    plots.plot_confusion_panels(panels, evaluation.class_names, confusion_path,
                                title=title or "Confusion matrix")
    metrics_path = join(out_dir, METRICS_FILENAME)
    write_atomic(metrics_path, json.dumps(metrics_dict(evaluation, title), indent=1) + "\n")
    predictions_path = join(out_dir, PREDICTIONS_FILENAME)
    write_atomic(predictions_path, format_predictions_csv(evaluation))
    return [report_path, confusion_path, metrics_path, predictions_path]
