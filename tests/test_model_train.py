"""The model builder, the two stages and the version folder written by training."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tclf import model as tclf_model
from tclf.data import records
from tclf.evaluation import reports
from tclf.training import schedule as stages
from tclf.training import config as config_module
from tclf.training import train, versions
from tests.conftest import STYLES, TINY_TRAINING


def _inputs(count, size, seed=0):
    rng = np.random.default_rng(seed)
    return {"spectrogram": rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
            "features": rng.standard_normal((count, 10, 68)).astype(np.float32)}


def test_output_shape_classes_and_trainable_layers_per_stage():
    model = tclf_model.build_model(4, np.zeros(68), np.ones(68), image_size=32, weights="none")
    output = model.predict(_inputs(3, 32), verbose=0)
    assert output.shape == (3, 4) and output.dtype == np.float32
    np.testing.assert_allclose(output.sum(axis=1), 1.0, atol=1e-5)

    backbone = tclf_model.backbone_of(model)
    tclf_model.freeze_backbone(model)
    backbone_weights = {id(w) for w in backbone.weights}
    assert not any(id(w) in backbone_weights for w in model.trainable_weights)
    assert len(model.trainable_weights) > 0  # The heads still train.

    unfrozen = tclf_model.unfreeze_top(model, 20)
    last20 = backbone.layers[-20:]
    expected = [layer.name for layer in last20
                if not isinstance(layer, keras.layers.BatchNormalization)]
    assert unfrozen == expected
    trainable_layers = {layer.name for layer in backbone.layers if layer.trainable}
    assert trainable_layers == set(expected)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in last20)
    assert all(not layer.trainable for layer in backbone.layers
               if isinstance(layer, keras.layers.BatchNormalization))
    trainable_backbone = {id(w) for w in backbone.trainable_weights}
    expected_weights = {id(w) for layer in last20 if layer.name in expected
                        for w in layer.trainable_weights}
    assert trainable_backbone == expected_weights and expected_weights


def test_missing_weights_file_gives_actionable_error(tmp_path):
    with pytest.raises(tclf_model.WeightsError, match="--weights none"):
        tclf_model.build_backbone(32, str(tmp_path / "nope.h5"))


def test_weights_from_a_local_file(tmp_path):
    source = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                               input_shape=(32, 32, 3), pooling="avg")
    path = str(tmp_path / "b0.weights.h5")
    source.save_weights(path)
    loaded = tclf_model.build_backbone(32, path)
    np.testing.assert_array_equal(loaded.get_layer("stem_conv").get_weights()[0],
                                  source.get_layer("stem_conv").get_weights()[0])


def test_class_weights_are_balanced():
    weights = stages.class_weights({"a": 10, "b": 30, "c": 20}, ["a", "b", "c"])
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(2 / 3)
    # Each class contributes the same total weight.
    totals = [weights[i] * n for i, n in enumerate([10, 30, 20])]
    assert max(totals) == pytest.approx(min(totals))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown option"):
        train.TrainConfig().replace(learning_rate=1)


def test_learning_rate_warms_up_then_decays():
    schedule = stages.learning_rate_schedule(1e-4, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    values = [float(schedule(step)) for step in range(50)]
    assert values[0] == 0.0 and values[10] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))  # Warm-up rises.
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # Cosine falls.
    assert values[-1] < 1e-5


def test_early_stopping_respects_minimum_epochs():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    y = np.arange(16) % 2
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    # A zero learning rate never improves val_loss: patience 1 would stop after epoch 2.
    result = stages.run_stage(model, (dataset.repeat(), dataset), stages.Stage(
        name="s", learning_rate=0.0, epochs=6, steps_per_epoch=2, min_epochs=4, patience=1,
        verbose=0))
    assert result.epochs_run == 4 and "early stopping" in result.stop_reason
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    result = stages.run_stage(model, (dataset.repeat(), dataset), stages.Stage(
        name="s", learning_rate=0.0, epochs=6, steps_per_epoch=2, min_epochs=0, patience=1,
        verbose=0))
    assert result.epochs_run == 2


def test_early_stopping_ignores_falls_below_min_delta():
    inputs = keras.Input((4,))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    runs = {}
    for min_delta in (0.0, 10.0):
        keras.utils.set_random_seed(0)
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
        runs[min_delta] = stages.run_stage(model, (dataset.repeat(), dataset), stages.Stage(
            name="s", learning_rate=0.05, epochs=5, steps_per_epoch=2, warmup_epochs=0,
            patience=2, min_epochs=0, min_delta=min_delta, verbose=0))
    losses = runs[0.0].history["val_loss"]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # Every epoch improves...
    assert runs[0.0].epochs_run == 5
    # ...but by less than 10: only the first epoch counts, and patience 2 ends it after 3.
    assert runs[10.0].epochs_run == 3
    assert "did not improve by more than 10 for 2 epochs" in runs[10.0].stop_reason
    assert "best epoch, 1" in runs[10.0].stop_reason


def test_version_numbering(tmp_path):
    models = str(tmp_path / "models")
    assert versions.claim_version_dir(models) == (os.path.join(models, "v1"), 1)
    assert versions.claim_version_dir(models)[1] == 2
    gaps = tmp_path / "gaps"
    for name in ("v1", "v5", "notes", "v7x", "version9", "v0.1"):
        (gaps / name).mkdir(parents=True)
    (gaps / "v8").write_text("a file, not a folder")  # Still a taken name.
    assert versions.claim_version_dir(str(gaps))[1] == 9
    shutil.rmtree(gaps / "v5")
    os.remove(gaps / "v8")
    assert versions.claim_version_dir(str(gaps))[1] == 10  # v9 now exists.


def test_concurrent_claims_get_different_folders(tmp_path):
    models = str(tmp_path / "models")
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(versions.claim_version_dir(models)[1])

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(1, 9))


def test_full_run_writes_every_file(trained):
    folder = trained.version_dir
    expected = ["model.h5", "model.keras", "accuracy.png", "loss.png", "confusion_matrix.png",
                "report.txt", "metrics.json", "predictions.csv", "training_log.txt",
                "training_progress.txt", "config.json"]
    for name in expected:
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    for name in ["accuracy.png", "loss.png", "confusion_matrix.png", "report.txt",
                 "metrics.json", "predictions.csv", "training_log.txt"]:
        assert os.path.getsize(os.path.join(folder, "analysis", name)) > 0, name
    for name in ["accuracy.png", "loss.png", "confusion_matrix.png"]:
        with Image.open(os.path.join(folder, name)) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert os.listdir(os.path.join(folder, "logs"))  # TensorBoard.

    progress = open(os.path.join(folder, "training_progress.txt")).read().splitlines()
    stages = [line.split()[0] for line in progress]
    assert stages.count("stage1") == trained.stages[0].epochs_run >= 1
    assert stages.count("stage2") == trained.stages[1].epochs_run >= 1
    for key in ("accuracy", "loss", "val_accuracy", "val_loss", "lr", "seconds"):
        assert all(f" {key} " in line for line in progress), key

    report = open(os.path.join(folder, "report.txt")).read()
    for style in STYLES:
        assert report.count(style) >= 2  # In the segment and the track sections.
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    assert metrics["segment"]["accuracy"] == trained.evaluation.segment_accuracy
    assert metrics["track"]["accuracy"] == trained.evaluation.track_accuracy
    assert metrics["segment"]["count"] == trained.evaluation.num_segments
    headline = {f"{level}_{name}": round(metrics[level][name], 4)
                for level in ("segment", "track") for name in ("accuracy", "macro_f1")}
    assert reports.parse_report_metrics(report) == headline  # metrics.json says what it says.
    with open(os.path.join(folder, "predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == trained.evaluation.num_tracks == len({r["track"] for r in rows})
    assert {r["true_style"] for r in rows} <= set(STYLES)
    order = [(r["correct"] == "1", float(r["confidence"]) * (1 if r["correct"] == "1" else -1))
             for r in rows]  # Wrong ones first, most confident first; then the right ones.
    assert order == sorted(order)
    log = open(os.path.join(folder, "training_log.txt")).read()
    for needle in ("devices: CPU", "precision: float32", "class weights:", "stage1: ",
                   "stage2: ", "stopped: ", "validation accuracy (tracks)", "image_size: 32"):
        assert needle in log, needle
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["classes"] == list(STYLES) and config["image_size"] == 32
    latest = os.path.join(os.path.dirname(folder), "latest.h5")
    assert open(latest, "rb").read() == open(trained.model_path, "rb").read()
    assert tclf_model.load_class_names(trained.model_path) == list(STYLES)


def test_saving_model_h5_logs_no_legacy_format_notice(trained, tmp_path, caplog):
    path = str(tmp_path / "model.h5")
    with caplog.at_level(logging.INFO):
        tclf_model.save_model(trained.model, path, ["x", "y", "z"])
    assert "HDF5" not in caplog.text
    assert tclf_model.load_class_names(path) == ["x", "y", "z"]


def test_model_h5_loads_in_a_process_without_tclf(trained, tmp_path):
    inputs = _inputs(4, 32, seed=3)
    np.savez(tmp_path / "inputs.npz", **inputs)
    expected = trained.model.predict(inputs, verbose=0)
    script = f"""
import sys, json, h5py, numpy as np, keras
model = keras.models.load_model({trained.model_path!r}, compile=False)
data = np.load({str(tmp_path / 'inputs.npz')!r})
np.save({str(tmp_path / 'out.npy')!r}, model.predict(dict(data), verbose=0))
with h5py.File({trained.model_path!r}) as f:
    print(json.loads(f.attrs["tclf_class_names"]))
assert not any(name == "tclf" or name.startswith("tclf.") for name in sys.modules)
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(list(STYLES)) in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def test_failing_run_leaves_latest_untouched(trained, records_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(trained.version_dir), models)
    before = (models / "latest.h5").read_bytes()
    config = train.TrainConfig(records=records_dir, models=str(models),
                               **{**TINY_TRAINING, "weights": str(tmp_path / "missing.h5")})
    with pytest.raises(tclf_model.WeightsError):
        train.train(config)
    assert (models / "latest.h5").read_bytes() == before
    failed = models / "v2"
    assert not (failed / "model.h5").exists()
    assert "FAILED: WeightsError" in (failed / "training_log.txt").read_text()
    assert not [n for n in os.listdir(models) if ".tmp" in n]


def test_hparams_file_overrides_options(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"dropout": 0.25, "stage1_lr": 3e-4}))
    config = train.TrainConfig().replace(**config_module.load_hparams(str(path)))
    assert config.dropout == 0.25 and config.stage1_lr == 3e-4
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        config_module.load_hparams(str(path))


def test_records_schema_manifest_is_used_for_normalization(trained, records_dir):
    manifest = records.load_manifest(records_dir)
    layer = trained.model.get_layer("feature_normalization")
    np.testing.assert_allclose(np.ravel(layer.mean), manifest["feature_mean"], rtol=1e-5)


def test_deterministic_runs_repeat_bit_for_bit(records_dir, tmp_path):
    """--deterministic: the same command twice gives the same weights (fresh processes: op
    determinism stays on in a process once set)."""
    hparams = tmp_path / "tiny.json"
    hparams.write_text(json.dumps({**TINY_TRAINING, "stage1_epochs": 2, "gpus": "none"}))
    weights = []
    for run in ("a", "b"):
        done = subprocess.run(
            [sys.executable, "-m", "tclf", "train", "--records", records_dir, "--models-dir",
             str(tmp_path / run), "--hparams", str(hparams), "--deterministic", "-q"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert done.returncode == 0, done.stderr[-3000:]
        model, _ = tclf_model.load_model(str(tmp_path / run / "latest.h5"))
        weights.append(model.get_weights())
        assert json.load(open(tmp_path / run / "v1" / "config.json"))["deterministic"] is True
    assert len(weights[0]) == len(weights[1])
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)
