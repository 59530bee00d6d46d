"""Figures of a training run: confusion matrices and the accuracy / loss curves of both stages.

Seaborn "whitegrid" style, tight layout, PNG written atomically (tclf.storage).
"""

from __future__ import annotations

import io

import matplotlib.ticker as mticker
import matplotlib.transforms as mtransforms
import numpy as np
import seaborn as sns
# Figures made with the object API render without pyplot's global backend, which stays the
# user's (a notebook importing tclf keeps its inline plots).
from matplotlib.figure import Figure

from tclf.storage import write_atomic

_DPI = 120


def _save_figure(fig, path: str) -> None:
    """Render ``fig`` to PNG in memory and write it to ``path``."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
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
    """A confusion matrix of counts [C, C] (rows: true class) with each row divided by its
    total, as float64; a row with a zero total stays all 0."""
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


def _confusion_figure(panels: list[tuple[np.ndarray, str]], class_names: list[str],
                      suptitle: str = ""):
    """Create a figure with one confusion heatmap per (matrix, title) panel."""
    side = max(4.0, 1.1 * len(class_names) + 2.5)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(side * 1.25 * len(panels), side))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (matrix, title) in zip(axes[0], panels):
            _draw_confusion(ax, matrix, class_names, title)
        if suptitle:
            fig.suptitle(suptitle)
    return fig


def plot_confusion_matrix(
    confusion, class_names, path: str, title: str = "Confusion matrix (validation)"
) -> None:
    """Save a heatmap of ``confusion`` (counts [C, C]; rows true, columns predicted classes)
    as the PNG ``path`` (written atomically, local or remote).

    Cells are coloured by the row-normalized rate (0 in a row with no counts) and show the
    count and the rate, e.g. ``"12\\n(85.7%)"``. ValueError if the matrix is not square,
    does not match ``class_names`` or holds negative or non-finite values.
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
    """Plot ``metric`` (e.g. "accuracy") and ``"val_" + metric`` over every stage on one axis
    and save the PNG ``path`` (written atomically, local or remote).

    ``histories``: per stage, a Keras History or its ``.history`` dict (key -> per-epoch
    values). Epochs are numbered 1..total across stages; a dashed line marks each later
    stage's start, and each stage is labelled by ``stage_names`` (default "stage 1", ...).
    Missing keys and empty stages leave gaps. ValueError if ``histories`` is not such a list,
    ``stage_names`` has another length, or epochs were recorded but none for ``metric``.
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
    train = np.concatenate([_series(s, metric, n) for s, n in zip(stages, lengths)]
                           or [np.zeros(0)])
    val = np.concatenate([_series(s, val_key, n) for s, n in zip(stages, lengths)] or [np.zeros(0)])

    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 4.5))
        ax = fig.subplots()
        marker = "o" if total <= 60 else None
        if np.any(np.isfinite(train)):
            ax.plot(epochs, train, marker=marker, markersize=3, color="C0", label="train")
        if np.any(np.isfinite(val)):
            ax.plot(epochs, val, marker=marker, markersize=3, color="C1", label="val")
        _mark_stages(ax, lengths, names)
        if total == 0:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center",
                    transform=ax.transAxes)
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


def plot_confusion_panels(panels, class_names, path: str, title: str = "") -> None:
    """Save one figure with a heatmap per (confusion [C, C], subtitle) panel, side by side."""
    checked = [(_validate_confusion(matrix, class_names)[0], subtitle)
               for matrix, subtitle in panels]
    _save_figure(_confusion_figure(checked, [str(n) for n in class_names], suptitle=title), path)
