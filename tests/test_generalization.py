"""What helps on real music (docs/real-music.md): the random backbone's
statistics, stage 2 skipped on a random backbone, calibrated probabilities, `--min-confidence`
and validation tracks kept at 6 segments."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from tclf.data import audio, records
from tclf.evaluation import calibration
from tclf import cli, predict
from tclf.data.schema import Pack
from tclf.training import session, train
from tclf import model as tclf_model
from tests.conftest import TINY_TRAINING


def _norm_statistics(model):
    """The moving means and variances of a model's backbone (or of a backbone itself)."""
    backbone = model if model.name == tclf_model.BACKBONE_NAME else tclf_model.backbone_of(model)
    return [w for layer in backbone.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.moving_mean.numpy(), layer.moving_variance.numpy())]


def _config(records_dir, tmp_path, **options):
    return train.TrainConfig(records=records_dir, models=str(tmp_path / "models"),
                             **{**TINY_TRAINING, **options})


def test_random_backbone_statistics_come_from_the_training_spectrograms(records_dir, tmp_path):
    pack = Pack.load(records_dir)
    keras.utils.set_random_seed(0)
    untouched = session.model_for(_config(records_dir, tmp_path, random_backbone_stats=0),
                                pack)
    keras.utils.set_random_seed(0)
    calibrated = session.model_for(_config(records_dir, tmp_path, random_backbone_stats=8),
                                 pack)
    images = session.first_spectrograms(_config(records_dir, tmp_path), Pack.load(records_dir), 8)
    before = tclf_model.image_encoder(untouched)(images, training=False).numpy()
    after = tclf_model.image_encoder(calibrated)(images, training=False).numpy()
    # The initial statistics shrink the pooled output to nothing; calibrated, it is O(0.1).
    assert before.std() < 1e-3 < 0.01 < after.std()
    # Only the BatchNormalization statistics differ: the same seed built the same weights.
    stats = {id(w) for layer in tclf_model.backbone_of(calibrated).layers
             if isinstance(layer, keras.layers.BatchNormalization)
             for w in (layer.moving_mean, layer.moving_variance)}
    for a, b, variable in zip(untouched.get_weights(), calibrated.get_weights(),
                              calibrated.weights):
        if id(variable) not in stats:
            np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(_norm_statistics(untouched),
                                                      _norm_statistics(calibrated)))
    # In training mode the backbone is not touched again: inference mode in both stages.
    assert all(layer.momentum == 0.99 for layer in tclf_model.backbone_of(calibrated).layers
               if isinstance(layer, keras.layers.BatchNormalization))


def test_statistics_are_averaged_over_batches(records_dir, tmp_path):
    pack = Pack.load(records_dir)
    images = session.first_spectrograms(_config(records_dir, tmp_path), Pack.load(records_dir), 8)
    first = []
    for batch_size in (8, 4):
        keras.utils.set_random_seed(0)
        model = session.model_for(_config(records_dir, tmp_path, random_backbone_stats=0),
                                pack)
        tclf_model.calibrate_backbone(model, images, batch_size=batch_size)
        first.append(_norm_statistics(model)[0])  # The first layer's: the mean of its input.
    # Two batches of 4 with momenta 0 and 1/2: the mean of the two means, that of all 8.
    np.testing.assert_allclose(first[1], first[0], rtol=1e-4, atol=1e-6)


def test_a_pretrained_backbone_keeps_its_statistics(records_dir, tmp_path):
    weights = tmp_path / "backbone.weights.h5"
    tclf_model.build_backbone(32, None).save_weights(str(weights))
    pack = Pack.load(records_dir)
    config = _config(records_dir, tmp_path, weights=str(weights), random_backbone_stats=8)
    model = session.model_for(config, pack)
    reference = tclf_model.build_backbone(32, str(weights))
    for a, b in zip(_norm_statistics(model), _norm_statistics(reference)):
        np.testing.assert_array_equal(a, b)


def test_trained_model_is_calibrated_and_its_temperature_is_applied(trained):
    temperature = tclf_model.load_temperature(trained.model_path)
    assert temperature == pytest.approx(trained.evaluation.temperature)
    assert temperature != 1.0 and calibration.TEMPERATURE_RANGE[0] <= temperature
    config = json.load(open(os.path.join(trained.version_dir, "config.json")))
    assert config["evaluation"]["temperature"] == pytest.approx(temperature)
    assert "calibration temperature:" in open(
        os.path.join(trained.version_dir, "training_log.txt")).read()


def test_predict_applies_the_stored_temperature_and_min_confidence(trained, audio_dir):
    track = os.path.join(audio_dir, "goa", sorted(os.listdir(os.path.join(audio_dir, "goa")))[0])
    temperature = tclf_model.load_temperature(trained.model_path)
    stored = predict.predict_paths([track], trained.model_path).tracks[0]
    raw = predict.predict_paths([track], model=trained.model,
                                class_names=trained.evaluation.class_names).tracks[0]
    for s, r in zip(stored.segments, raw.segments):
        np.testing.assert_allclose(
            s.probabilities, calibration.apply_temperature(r.probabilities[None], temperature)[0],
            atol=1e-6)
    assert stored.style == raw.style  # The temperature never changes the ranking.
    top = stored.probabilities.max()
    assert predict.predict_paths([track], trained.model_path,
                                 min_confidence=top - 1e-6).tracks[0].style == stored.style
    unsure = predict.predict_paths([track], trained.model_path, min_confidence=top + 1e-6)
    assert unsure.tracks[0].style == predict.UNKNOWN
    done = CliRunner().invoke(cli.predict_command, [track, "--model", trained.model_path,
                                                    "--format", "json", "-q",
                                                    "--min-confidence", "1"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["tracks"][0]["style"] == "unknown"


def test_options_off_a_random_backbone_run_as_before(records_dir, tmp_path):
    """--random-backbone-stats 0, --no-calibrate and stage 2 on its default (skipped)."""
    result = train.train(_config(records_dir, tmp_path, random_backbone_stats=0,
                                 calibrate=False, stage2_random_backbone=False))
    stage2 = result.stages[1]
    assert stage2.epochs_run == 0 and stage2.stop_reason.startswith("skipped")
    progress = open(os.path.join(result.version_dir, "training_progress.txt")).read()
    assert "stage1" in progress and "stage2" not in progress
    log = open(os.path.join(result.version_dir, "training_log.txt")).read()
    assert "stage2: skipped: the backbone is random" in log
    assert tclf_model.load_temperature(result.model_path) == 1.0
    with h5py.File(result.model_path) as f:
        assert float(f.attrs["tclf_temperature"]) == 1.0
    # The backbone's statistics are the initial ones: mean 0, variance 1.
    for i, values in enumerate(_norm_statistics(result.model)):
        np.testing.assert_allclose(values, 0.0 if i % 2 == 0 else 1.0)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 3))
    true = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    temperature = calibration.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.0, rel=0.1)
    scaled = calibration.apply_temperature(overconfident, temperature)
    assert (scaled.argmax(1) == overconfident.argmax(1)).all()
    assert (calibration.expected_calibration_error(scaled, labels)
            < calibration.expected_calibration_error(overconfident, labels) / 2)
    assert calibration.apply_temperature(overconfident, 1.0) is not None
    np.testing.assert_allclose(calibration.apply_temperature(overconfident, 1.0), overconfident)


def test_expected_calibration_error():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    # Bin 0.9: both right (|1 - 0.9|); bin 0.6: one of two right (|0.5 - 0.6|).
    assert calibration.expected_calibration_error(probabilities, [0, 0, 0, 1]) == pytest.approx(
        0.5 * 0.1 + 0.5 * 0.1)
    assert calibration.expected_calibration_error(np.eye(2), [0, 1]) == 0.0


def test_training_segments_come_after_the_standard_ones_and_never_repeat_them():
    starts = audio._starts(200.0, 6, 10.0, 0.1, 24)
    standard = audio.segment_starts(200.0, 6, 10.0, 0.1)
    assert starts[:6] == standard  # The standard ones, where they always were.
    extra = starts[6:]
    assert len(extra) == 14 and all(min(abs(t - s) for s in standard) >= 5 for t in extra)
    assert all(b - a >= 10 for a, b in zip(extra, extra[1:]))  # Non-overlapping.
    assert min(extra) == 0.0 and max(extra) == 190.0  # Over the whole track.
    assert audio._starts(200.0, 6, 10.0, 0.1, 0) == standard  # Off.
    assert audio._starts(40.0, 6, 10.0, 0.1, 24) == audio.segment_starts(40.0, 6, 10.0, 0.1)


def test_extracted_training_segments_stay_out_of_validation_and_prediction(tmp_path):
    from tclf import demo
    from tclf.data import extract

    demo.make_demo_audio(str(tmp_path / "audio"), tracks_per_style=2, duration=100.0, seed=3,
                         styles=("goa", "psy"))
    for name, extra in (("plain", 0), ("more", 3)):
        extract.extract(str(tmp_path / "audio"), str(tmp_path / name), jobs=1, progress=False,
                        training_segments=extra)
    track = os.path.join("goa", sorted(os.listdir(tmp_path / "plain" / "goa"))[0])
    plain = sorted(os.listdir(tmp_path / "plain" / track))
    more = sorted(os.listdir(tmp_path / "more" / track))
    assert len([n for n in plain if n.endswith(".png")]) == 6
    assert len([n for n in more if n.endswith(".png")]) == 9
    for n in range(1, 7):  # The standard segments are the same audio either way.
        np.testing.assert_array_equal(np.load(tmp_path / "plain" / track / f"part_{n}.npy"),
                                      np.load(tmp_path / "more" / track / f"part_{n}.npy"))
    # One track of each style in validation: it keeps the standard 6 of each.
    manifest = records.pack(str(tmp_path / "more"), str(tmp_path / "r"), val_fraction=0.5,
                            seed=0, min_shards=1, progress=False)
    assert manifest["val_segments"] == 6
    assert manifest["splits"]["val"]["records"] == 2 * 6
    assert manifest["splits"]["train"]["records"] == 2 * 9
    # Prediction analyses the standard segments only (the settings it takes from a model).
    settings = dict(manifest["extraction"])
    assert settings["training_segments"] == 3
    kept = {k: v for k, v in settings.items() if k in predict.ANALYSIS_SETTINGS}
    source = os.path.join(tmp_path, "audio", "goa", os.listdir(tmp_path / "audio" / "goa")[0])
    assert len(audio.analyze_file(source, **kept)) == 6


def test_pack_keeps_training_only_segments_out_of_validation(data_copy, tmp_path):
    # Every track gets parts 7-9 after its standard ones (extract.json: num_segments 6).
    for root, _, files in os.walk(data_copy):
        if "part_1.png" in files:
            for n in (7, 8, 9):
                for ext in ("png", "npy"):
                    shutil.copy(os.path.join(root, f"part_1.{ext}"),
                                os.path.join(root, f"part_{n}.{ext}"))
    manifest = records.pack(data_copy, str(tmp_path / "r"), val_fraction=0.25, seed=0,
                            min_shards=1, progress=False)
    val, training = (manifest["splits"][side] for side in ("val", "train"))
    assert manifest["val_segments"] == 6
    assert val["records"] == 2 * len(val["tracks"])  # Parts 1 and 2 of each.
    assert training["records"] == 5 * len(training["tracks"])
    samples = [records.Sample(0, "t", n, "", "") for n in range(1, 10)]
    assert [s.segment for s in records.standard_segments(samples, {"t"}, 6)] == list(range(1, 7))
    assert records.standard_segments(samples, set(), 6) == samples
    assert records.standard_segments(samples, {"t"}, None) == samples


def _small_model():
    image = keras.Input((2, 2, 1), dtype="uint8", name="spectrogram")
    features = keras.Input((3,), name="features")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1.0)(image))
    out = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Concatenate()([flat, features]))
    return keras.Model({"spectrogram": image, "features": features}, out)


def test_label_smoothing_loss_and_accuracy_take_indices_and_probabilities():
    from tclf.training import augment

    loss, accuracy = augment.loss_and_accuracy(3, label_smoothing=0.1)
    p = np.array([[0.7, 0.2, 0.1]], np.float32)
    target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    expected = -(target * np.log(p[0])).sum()
    assert float(loss(np.array([0]), p)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(loss(np.array([[0]]), p)[0]) == pytest.approx(expected, rel=1e-5)  # As Keras.
    assert float(loss(np.array([[1.0, 0, 0]], np.float32), p)[0]) == pytest.approx(expected,
                                                                                 rel=1e-5)
    plain, _ = augment.loss_and_accuracy(3, 0.0)  # Off: the ordinary cross-entropy.
    assert float(plain(np.array([0]), p)[0]) == pytest.approx(-np.log(0.7), rel=1e-5)
    accuracy.update_state(np.array([0, 2]), np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    accuracy.update_state(np.array([[0.6, 0.4, 0.0]]), np.array([[0.7, 0.2, 0.1]]))
    assert float(accuracy.result()) == pytest.approx(2 / 3)


def test_mixup_mixes_training_batches_only_and_is_off_at_zero():
    import tensorflow as tf

    from tclf.training import augment

    model = _small_model()
    loss, accuracy = augment.loss_and_accuracy(3, 0.0)
    model.compile(keras.optimizers.SGD(0.0), loss=loss, metrics=[accuracy])
    seen = []
    own = model.train_step

    def recorder(data):
        x, y = data[0], data[1]
        tf.numpy_function(lambda s, f, t: seen.append((s, f, t)) or np.int64(0),
                          [x["spectrogram"], x["features"], y], tf.int64, stateful=True)
        return own(data)

    model.train_step = recorder
    x = {"spectrogram": np.stack([np.full((2, 2, 1), v, np.uint8) for v in (0, 1, 2, 3)]),
         "features": np.eye(4, 3, dtype=np.float32) * 10}
    y = np.array([0, 1, 2, 0])
    before = model.predict(x, verbose=0)
    with augment.mixup(model, 0.4, 3, seed=0):
        model.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False)
        inside = model.predict(x, verbose=0)
        evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert model.train_step is recorder  # The instance's own step is back.
    np.testing.assert_array_equal(inside, before)  # Prediction never mixes (and lr 0).
    assert evaluated["loss"] == pytest.approx(float(np.mean(loss(y, before))), rel=1e-5)
    assert len(seen) == 3
    for spectrogram, features, labels in seen:
        # Labels: blends of two one-hot rows; features and pixels: blends of two rows, within
        # the originals' range (features are 10 * one-hot rows, or zeros), pixels still uint8.
        assert spectrogram.dtype == np.uint8 and labels.shape == (4, 3)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
        assert (features >= 0).all() and (features.sum(axis=1) <= 10.0 + 1e-4).all()
    assert any(not np.allclose(labels.max(axis=1), 1.0) for _, _, labels in seen)
    assert any(not np.isin(features, (0.0, 10.0)).all() for _, features, _ in seen)
    assert all(s.max() <= 3 for s, _, _ in seen)
    seen.clear()
    model.train_step = own
    with augment.mixup(model, 0.0, 3, seed=0):  # Off: Keras' own step, the batch as it is.
        assert "train_step" in model.__dict__ and model.train_step is own
    del model.train_step
    with augment.mixup(model, 0.0, 3):
        assert "train_step" not in model.__dict__
