"""Tests for tclf.evaluation.reports."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skmetrics

from tclf.evaluation import evaluate, plots, reports

CLASSES = ["Goa", "Psy", "Dark"]


def _assert_png(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode in ("RGB", "RGBA")
        assert image.size[0] > 100 and image.size[1] > 100


def _no_tmp_files(directory):
    return [name for name in os.listdir(directory) if ".tmp-" in name]


def _random_example(seed=0, num_tracks=12, num_classes=3):
    rng = np.random.default_rng(seed)
    track_labels = rng.integers(0, num_classes, size=num_tracks)
    segments = rng.integers(2, 6, size=num_tracks)
    labels = np.repeat(track_labels, segments)
    track_ids = np.repeat([f"track-{i:02d}" for i in range(num_tracks)], segments)
    logits = rng.normal(size=(labels.size, num_classes))
    logits[np.arange(labels.size), labels] += 1.0  # better than chance
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    order = rng.permutation(labels.size)  # segments of a track need not be contiguous
    return probs[order], labels[order], track_ids[order]


# ----------------------------------------------------------------- track_level


def test_track_level_averages_segments_in_first_appearance_order():
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # b
            [0.2, 0.8, 0.0],  # a
            [0.5, 0.3, 0.2],  # b
            [0.0, 0.4, 0.6],  # a
            [0.1, 0.1, 0.8],  # c
        ]
    )
    labels = np.array([0, 1, 0, 1, 2])
    track_ids = np.array([b"b", b"a", b"b", b"a", b"c"])  # bytes, as from tf.data

    track_probs, track_labels, ids = evaluate.track_level(probs, labels, track_ids)

    assert ids.tolist() == ["b", "a", "c"]
    np.testing.assert_allclose(
        track_probs,
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]],
    )
    assert track_labels.tolist() == [0, 1, 2]


def test_track_level_str_and_bytes_ids_are_the_same_track():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    track_probs, track_labels, ids = evaluate.track_level(probs, [1, 1], ["x", b"x"])
    assert ids.tolist() == ["x"]
    np.testing.assert_allclose(track_probs, [[0.5, 0.5]])
    assert track_labels.tolist() == [1]


def test_track_level_mixed_labels_raises():
    probs = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="different labels.*'t1'"):
        evaluate.track_level(probs, [0, 1, 2], ["t1", "t1", "t2"])


@pytest.mark.parametrize(
    "labels, track_ids",
    [([0, 1], ["a", "b", "c"]), ([0, 1, 2], ["a", "b"])],
)
def test_track_level_length_mismatch_raises(labels, track_ids):
    with pytest.raises(ValueError, match="length"):
        evaluate.track_level(np.full((3, 3), 1 / 3), labels, track_ids)


def test_track_level_rejects_1d_probabilities():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        evaluate.track_level([0.1, 0.9], [0, 1], ["a", "b"])


# -------------------------------------------------------------------- evaluate


def test_evaluate_matches_sklearn():
    probs, labels, track_ids = _random_example()
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES)

    pred = probs.argmax(axis=1)
    assert ev.segment_accuracy == pytest.approx(skmetrics.accuracy_score(labels, pred))
    assert ev.segment_macro_f1 == pytest.approx(
        skmetrics.f1_score(labels, pred, average="macro", labels=[0, 1, 2], zero_division=0)
    )
    np.testing.assert_array_equal(
        ev.segment_confusion, skmetrics.confusion_matrix(labels, pred, labels=[0, 1, 2])
    )
    assert ev.segment_confusion.sum() == labels.size == ev.num_segments

    track_probs, track_labels, ids = evaluate.track_level(probs, labels, track_ids)
    track_pred = track_probs.argmax(axis=1)
    assert ev.num_tracks == 12 == ids.size
    assert ev.track_confusion.shape == (3, 3)
    assert ev.track_confusion.sum() == 12
    assert ev.track_accuracy == pytest.approx(
        skmetrics.accuracy_score(track_labels, track_pred)
    )
    assert ev.track_macro_f1 == pytest.approx(
        skmetrics.f1_score(
            track_labels, track_pred, average="macro", labels=[0, 1, 2], zero_division=0
        )
    )
    for name in CLASSES:
        assert name in ev.segment_report and name in ev.track_report


def test_evaluate_to_dict_is_json_serializable():
    probs, labels, track_ids = _random_example(seed=1)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids.astype(bytes), CLASSES)
    summary = json.loads(json.dumps(ev.to_dict()))
    assert summary["class_names"] == CLASSES
    assert summary["num_segments"] == labels.size
    assert summary["segment_accuracy"] == pytest.approx(ev.segment_accuracy)
    assert np.array(summary["track_confusion"]).sum() == summary["num_tracks"]


def test_evaluate_class_never_present_keeps_full_confusion():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    ev = evaluate.evaluate_predictions(probs, [0, 1], ["a", "b"], CLASSES)
    assert ev.segment_confusion.shape == (3, 3)
    assert ev.segment_accuracy == 1.0
    assert "Dark" in ev.segment_report


@pytest.mark.parametrize(
    "probs, labels, names, match",
    [
        (np.full((2, 3), 1 / 3), [0, 3], CLASSES, r"\[0, 3\)"),
        (np.full((2, 2), 0.5), [0, 1], CLASSES, "3 class names"),
        (np.zeros((0, 3)), [], CLASSES, "empty"),
        (np.full((2, 3), 1 / 3), [0, 1], ["a", "a", "b"], "unique"),
    ],
)
def test_evaluate_bad_input_raises(probs, labels, names, match):
    with pytest.raises(ValueError, match=match):
        evaluate.evaluate_predictions(probs, labels, ["t"] * len(labels), names)


# ------------------------------------------------------------ format / parse


def test_format_report_sections_and_round_trip():
    probs, labels, track_ids = _random_example(seed=2)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES)
    text = reports.format_report(ev, title="v3 validation")

    assert text.startswith("v3 validation\n")
    assert f"segments: {ev.num_segments}" in text
    assert f"tracks: {ev.num_tracks}" in text
    segment_part, track_part = text.split("Track level (mean of segment probabilities)")
    assert "Segment level" in segment_part
    for name in CLASSES:
        assert name in segment_part.split("Segment level", 1)[1]
        assert name in track_part
    assert f"accuracy: {ev.segment_accuracy:.4f}\n" in segment_part
    assert f"macro F1: {ev.track_macro_f1:.4f}\n" in track_part

    parsed = reports.parse_report_metrics(text)
    assert set(parsed) == {
        "segment_accuracy",
        "segment_macro_f1",
        "track_accuracy",
        "track_macro_f1",
    }
    for key, value in parsed.items():
        assert value == pytest.approx(getattr(ev, key), abs=5e-5)
        assert value == round(getattr(ev, key), 4)


def test_parse_report_metrics_rejects_foreign_text():
    with pytest.raises(ValueError, match="missing metrics"):
        reports.parse_report_metrics("accuracy: 0.5\n")


# --------------------------------------------------------------------- figures


def test_row_normalized_handles_empty_rows():
    rates = plots.row_normalized([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
    np.testing.assert_allclose(rates, [[0.75, 0.25, 0], [0, 0, 0], [0, 0.5, 0.5]])


def test_plot_confusion_matrix_png(tmp_path):
    path = str(tmp_path / "cm.png")
    plots.plot_confusion_matrix(np.array([[12, 2, 0], [0, 0, 0], [1, 3, 9]]), CLASSES, path)
    _assert_png(path)
    assert _no_tmp_files(tmp_path) == []


def test_plot_confusion_matrix_shape_mismatch_raises(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix(np.eye(2), CLASSES, str(tmp_path / "cm.png"))
    assert not (tmp_path / "cm.png").exists()


def test_plot_history_two_stages_second_without_val(tmp_path):
    histories = [
        {
            "accuracy": [0.4, 0.5, 0.6],
            "val_accuracy": [0.35, 0.45, 0.5],
            "loss": [1.2, 1.0, 0.9],
            "val_loss": [1.3, 1.1, 1.0],
        },
        {"accuracy": [0.7, 0.8], "loss": [0.7, 0.6]},
    ]
    for metric in ("accuracy", "loss"):
        path = str(tmp_path / f"{metric}.png")
        plots.plot_history(histories, metric, path, stage_names=["head", "fine-tune"])
        _assert_png(path)
    assert _no_tmp_files(tmp_path) == []


def test_plot_history_empty_stage_and_no_data(tmp_path):
    path = str(tmp_path / "h.png")
    plots.plot_history([{}, {"loss": [1.0, 0.5], "val_loss": [1.1, 0.9]}], "loss", path)
    _assert_png(path)
    plots.plot_history([{}], "loss", path)  # nothing recorded at all
    _assert_png(path)


def test_plot_history_bad_input_raises(tmp_path):
    path = str(tmp_path / "h.png")
    with pytest.raises(ValueError, match="available keys"):
        plots.plot_history([{"loss": [1.0]}], "acuracy", path)
    with pytest.raises(ValueError, match="stage_names"):
        plots.plot_history([{"loss": [1.0]}], "loss", path, stage_names=["a", "b"])
    with pytest.raises(ValueError, match="list"):
        plots.plot_history({"loss": [1.0]}, "loss", path)


# ---------------------------------------------------------------------- output


@pytest.mark.parametrize("confusion", ["segment", "both"])
def test_write_evaluation(tmp_path, confusion):
    probs, labels, track_ids = _random_example(seed=3)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES)
    out_dir = str(tmp_path / "models" / "v1" / "analysis")  # created on demand

    paths = reports.write_evaluation(ev, out_dir, title="v1", confusion=confusion)

    assert paths == [
        os.path.join(out_dir, "report.txt"),
        os.path.join(out_dir, "confusion_matrix.png"),
        os.path.join(out_dir, "metrics.json"),
        os.path.join(out_dir, "predictions.csv"),
    ]
    with open(paths[0], encoding="utf-8") as f:
        text = f.read()
    assert text == reports.format_report(ev, title="v1")
    assert reports.parse_report_metrics(text)["track_accuracy"] == round(ev.track_accuracy, 4)
    _assert_png(paths[1])
    assert sorted(os.listdir(out_dir)) == ["confusion_matrix.png", "metrics.json",
                                           "predictions.csv", "report.txt"]


def test_write_evaluation_bad_confusion_choice(tmp_path):
    probs, labels, track_ids = _random_example(seed=4)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES)
    with pytest.raises(ValueError, match="confusion must be one of"):
        reports.write_evaluation(ev, str(tmp_path), confusion="tracks")


def _report_figures(text):
    """Every number of a report.txt, read from the text: per section the headline figures,
    each row of the classification report and the confusion matrix."""
    sections, section = {}, None
    for line in text.splitlines():
        if line.startswith(reports.SEGMENT_SECTION_TITLE):
            section = sections.setdefault("segment", {"rows": {}, "confusion": []})
        elif line.startswith("Track level"):
            section = sections.setdefault("track", {"rows": {}, "confusion": []})
        elif line.startswith("Most confident"):
            section = None
        elif section is not None:
            words = line.split()
            if line.startswith(("accuracy: ", "macro F1: ")):
                section[line.split(":")[0]] = float(words[-1])
            elif len(words) >= 5 and words[-4].replace(".", "").isdigit():
                section["rows"][" ".join(words[:-4])] = [float(w) for w in words[-4:]]
            elif words[:1] and words[0] in CLASSES and words[1:] and all(
                    w.isdigit() for w in words[1:]):
                section["confusion"].append([int(w) for w in words[1:]])
    return sections


def test_metrics_json_holds_every_figure_of_report_txt(tmp_path):
    probs, labels, track_ids = _random_example(seed=5, num_tracks=20)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES, temperature=0.8)
    reports.write_evaluation(ev, str(tmp_path), title="v1")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    text = (tmp_path / "report.txt").read_text()

    figures = _report_figures(text)
    assert metrics["classes"] == CLASSES and metrics["title"] == "v1"
    assert f"temperature {metrics['temperature']:.3f}" in text
    assert f"track probabilities {metrics['track_ece']:.4f}" in text
    for level, count in (("segment", len(labels)), ("track", 20)):
        got, read = metrics[level], figures[level]
        assert got["count"] == count and f"{level}s: {count}" in text
        assert round(got["accuracy"], 4) == read["accuracy"]
        assert round(got["macro_f1"], 4) == read["macro F1"]
        assert got["confusion"] == read["confusion"]
        rows = {**got["per_class"], "macro avg": got["macro_avg"],
                "weighted avg": got["weighted_avg"]}
        assert set(rows) == set(read["rows"]) == {*CLASSES, "macro avg", "weighted avg"}
        for name, row in rows.items():
            assert [round(row["precision"], 4), round(row["recall"], 4), round(row["f1-score"], 4),
                    row["support"]] == read["rows"][name], name
    # The mistakes section lists the first (at most) 10 of metrics.json's, in that order.
    listed = text.split("Most confident mistakes")[1].splitlines()[2:]
    assert metrics["mistakes"] and len(metrics["mistakes"]) <= 10
    assert [line.split()[0] for line in listed] == [m["track"] for m in metrics["mistakes"]]


def test_predictions_csv_lists_every_track_wrong_ones_first_by_confidence(tmp_path):
    probs, labels, track_ids = _random_example(seed=6, num_tracks=30)
    ev = evaluate.evaluate_predictions(probs, labels, track_ids, CLASSES)
    reports.write_evaluation(ev, str(tmp_path))
    import csv
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    assert sorted(r["track"] for r in rows) == sorted(set(track_ids))
    track_probs, track_labels, ids = evaluate.track_level(probs, labels, track_ids)
    truth = {t: (CLASSES[l], p) for t, l, p in zip(ids, track_labels, track_probs)}
    for row in rows:
        true, p = truth[row["track"]]
        assert row["true_style"] == true
        assert row["predicted_style"] == CLASSES[int(np.argmax(p))]
        assert row["correct"] == str(int(row["true_style"] == row["predicted_style"]))
        assert [float(row[f"p_{c}"]) for c in CLASSES] == pytest.approx(p, abs=1e-6)
    correct = [r["correct"] == "1" for r in rows]
    wrong = sum(not c for c in correct)
    assert 0 < wrong < len(rows) and correct == [False] * wrong + [True] * (len(rows) - wrong)
    confidence = [float(r["confidence"]) for r in rows]
    assert confidence[:wrong] == sorted(confidence[:wrong], reverse=True)
    assert confidence[wrong:] == sorted(confidence[wrong:])


def test_importing_tclf_leaves_matplotlibs_backend_alone():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); "
            "import tclf.evaluation.plots, tclf.evaluation.reports, tclf.cli; print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
