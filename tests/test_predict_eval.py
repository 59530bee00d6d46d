"""`tclf-predict` and `tclf-eval`."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tclf import DataWarning, cli, predict
from tclf.data import reader, records
from tclf.data.schema import Pack


def _audio_file(audio_dir, style="goa"):
    name = sorted(os.listdir(os.path.join(audio_dir, style)))[0]
    return os.path.join(audio_dir, style, name), f"{style}/{os.path.splitext(name)[0]}"


def _segments_from_records(records_dir, track_id, image_size):
    """The track's segments as the reader decodes them, keyed by segment index."""
    manifest = records.load_manifest(records_dir)
    description = records.feature_description(manifest["feature_shape"])
    found = {}
    for split in records.SPLITS:
        for path in Pack.load(records_dir).shard_paths(split):
            for serialized in tf.data.TFRecordDataset(path):
                parsed = tf.io.parse_single_example(serialized, description)
                if parsed["track_id"].numpy().decode() == track_id:
                    inputs, _ = reader.decode_example(serialized, manifest["feature_shape"],
                                                    image_size)
                    found[int(parsed["segment"])] = inputs
    return found


def test_audio_prediction_equals_extract_pack_reader_path(trained, audio_dir, records_dir):
    path, track_id = _audio_file(audio_dir)
    result = predict.predict_paths([path], model=trained.model,
                                   class_names=trained.evaluation.class_names)
    [track] = result.tracks
    segments = _segments_from_records(records_dir, track_id, 32)
    assert sorted(segments) == [s.index for s in track.segments]
    for segment in track.segments:
        inputs = {k: v[None] for k, v in segments[segment.index].items()}
        expected = trained.model(inputs, training=False).numpy()[0]
        np.testing.assert_allclose(segment.probabilities, expected, atol=1e-5)
        assert segment.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(track.probabilities,
                               np.mean([s.probabilities for s in track.segments], axis=0))
    assert track.style == result.classes[int(np.argmax(track.probabilities))]


def test_data_layout_folder_gives_the_same_prediction(trained, audio_dir, data_dir):
    path, track_id = _audio_file(audio_dir, "psy")
    from_audio, from_folder = (
        predict.predict_paths([p], model=trained.model,
                              class_names=trained.evaluation.class_names).tracks[0]
        for p in (path, os.path.join(data_dir, track_id)))
    np.testing.assert_allclose(from_folder.probabilities, from_audio.probabilities, atol=1e-5)
    assert from_folder.segments[0].start is None


def test_unreadable_file_among_good_ones_is_skipped(trained, audio_dir, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really")
    good, _ = _audio_file(audio_dir)
    with pytest.warns(DataWarning) as caught:
        result = predict.predict_paths([good, str(bad), str(tmp_path / "missing.flac")],
                                       model=trained.model,
                                       class_names=trained.evaluation.class_names)
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.wav" in messages and "missing.flac: no such file" in messages
    assert [t.source for t in result.tracks] == [good]
    assert sorted(os.path.basename(s) for s, _ in result.failed) == ["broken.wav",
                                                                     "missing.flac"]


def test_folders_are_searched_recursively(trained, audio_dir):
    result = predict.predict_paths([audio_dir], model=trained.model,
                                   class_names=trained.evaluation.class_names, batch_size=5)
    assert len(result.tracks) == sum(len(os.listdir(os.path.join(audio_dir, d)))
                                     for d in os.listdir(audio_dir))
    for track in result.tracks:
        assert track.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_json_csv_and_table_agree(trained, audio_dir):
    result = predict.predict_paths([os.path.join(audio_dir, "dark")], model=trained.model,
                                   class_names=trained.evaluation.class_names)
    result.model = "m.h5"
    parsed = json.loads(predict.format_json(result, segments=True))
    rows = list(csv.DictReader(io.StringIO(predict.format_csv(result, segments=True))))
    table = predict.format_table(result, segments=True).splitlines()
    assert parsed["model"] == "m.h5" and parsed["classes"] == result.classes
    track_rows = [r for r in rows if r["segment"] == "all"]
    assert len(track_rows) == len(parsed["tracks"]) == len(result.tracks)
    for item, row in zip(parsed["tracks"], track_rows):
        assert row["source"] == item["source"] and row["style"] == item["style"]
        assert row["model"] == "m.h5"
        line = next(x for x in table if x.startswith(item["source"]))
        assert item["style"] in line.split()
        numbers = [float(x) for x in line.split()[-len(result.classes):]]
        for value, c in zip(numbers, result.classes):
            assert value == pytest.approx(item["probabilities"][c], abs=1e-4)
            assert float(row[f"p_{c}"]) == pytest.approx(item["probabilities"][c], abs=1e-6)
        assert len(item["segments"]) == item["num_segments"] == sum(
            1 for r in rows if r["source"] == item["source"] and r["segment"] != "all")


def test_predict_cli(trained, audio_dir, tmp_path):
    runner = CliRunner()
    good, _ = _audio_file(audio_dir)
    done = runner.invoke(cli.predict_command, [good, "--model", trained.model_path,
                                               "--format", "json", "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["tracks"][0]["source"] == good
    assert done.stdout.endswith("}\n")  # A line like any other command's output.
    (tmp_path / "x.wav").write_text("nope")
    done = runner.invoke(cli.predict_command, [str(tmp_path / "x.wav"), "--model",
                                               trained.model_path, "-q"])
    assert done.exit_code != 0 and "no track could be classified" in done.stderr
    shown = json.loads(done.stdout)  # A script still gets the failed list, as JSON.
    assert shown["tracks"] == [] and [f["source"] for f in shown["failed"]] == [
        str(tmp_path / "x.wav")]
    done = runner.invoke(cli.predict_command, [good, "--model", str(tmp_path / "none.h5")])
    assert done.exit_code == 1 and "not found" in done.output and "Traceback" not in done.output


def test_eval_equals_the_training_report(trained, records_dir, tmp_path):
    done = CliRunner().invoke(cli.eval_command, ["--model", trained.model_path, "--records",
                                                 records_dir, "--out", str(tmp_path / "ev")])
    assert done.exit_code == 0, done.output
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    trained_report = open(os.path.join(trained.version_dir, "report.txt")).read()
    trained_metrics = json.load(open(os.path.join(trained.version_dir, "metrics.json")))
    rounded = lambda value: json.loads(json.dumps(value), parse_float=lambda x: round(float(x), 6))  # noqa: E731
    assert rounded({**evaluated, "title": ""}) == rounded({**trained_metrics, "title": ""})
    assert ((tmp_path / "ev" / "predictions.csv").read_text()
            == open(os.path.join(trained.version_dir, "predictions.csv")).read())
    assert os.path.getsize(tmp_path / "ev" / "confusion_matrix.png") > 0
    body = lambda text: text[text.index("classes:"):]  # noqa: E731 - all but the title.
    assert body((tmp_path / "ev" / "report.txt").read_text()) == body(trained_report)


def test_model_carries_the_extraction_settings(trained):
    assert predict.extraction_settings(trained.model_path) == {
        "num_segments": 6, "segment_seconds": 10.0, "sample_rate": 22050, "skip_fraction": 0.1,
        "backbone": "efficientnetb0"}


def test_model_keras_and_model_h5_carry_the_same_model(trained, audio_dir, tmp_path):
    from tclf import library_versions
    from tclf import model as tclf_model

    h5 = trained.model_path
    keras_file = os.path.join(trained.version_dir, "model.keras")
    for path in (h5, keras_file):  # Both name the classes and keep the options and versions.
        assert tclf_model.load_class_names(path) == trained.evaluation.class_names
        config = tclf_model.load_config(path)
        assert config["library_versions"] == library_versions()
        assert config["extraction"]["librosa_version"] == library_versions()["librosa"]
        assert config["seed"] == 0 and config["image_size"] == 32
    assert tclf_model.load_temperature(keras_file) == tclf_model.load_temperature(h5)
    assert json.load(open(os.path.join(trained.version_dir, "config.json")))[
        "library_versions"] == library_versions()
    good, _ = _audio_file(audio_dir)
    results = [predict.predict_paths([good], path) for path in (h5, keras_file)]
    np.testing.assert_array_equal(results[0].tracks[0].probabilities,
                                  results[1].tracks[0].probabilities)
    # --model takes either, whatever its name.
    renamed = str(tmp_path / "mine.bin")
    open(renamed, "wb").write(open(keras_file, "rb").read())
    done = CliRunner().invoke(cli.predict_command,
                              [good, "--model", renamed, "--format", "json", "-q"])
    assert done.exit_code == 0, done.output
    shown = json.loads(done.stdout)["tracks"][0]["probabilities"]
    assert list(shown.values()) == pytest.approx(list(results[0].tracks[0].probabilities),
                                                 abs=1e-6)
    done = CliRunner().invoke(cli.eval_command, ["--model", trained.version_dir, "-q"])
    assert done.exit_code == 1 and "is a folder" in done.output


def test_a_model_trained_with_another_librosa_is_said_once(trained, audio_dir, records_dir,
                                                          tmp_path):
    import h5py

    from tclf import model as tclf_model

    old = str(tmp_path / "old.h5")
    open(old, "wb").write(open(trained.model_path, "rb").read())
    config = tclf_model.load_config(old)
    config["extraction"]["librosa_version"] = "0.9.0"
    with h5py.File(old, "a") as f:
        f.attrs[tclf_model.CONFIG_ATTRIBUTE] = json.dumps(config)
    good, _ = _audio_file(audio_dir)
    runner = CliRunner()
    for model, said in ((trained.model_path, 0), (old, 1)):
        done = runner.invoke(cli.predict_command, [good, good, "--model", model, "-q"])
        assert done.exit_code == 0, done.output
        assert done.stderr.count("trained on features computed by librosa 0.9.0") == said
        done = runner.invoke(cli.eval_command, ["--model", model, "--records", records_dir, "-q"])
        assert done.exit_code == 0, done.output
        assert done.stderr.count("trained on features computed by librosa 0.9.0") == said
