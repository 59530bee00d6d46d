"""The musicnn backbone: the port against the original's outputs, its stored input, a tiny
run with its real weights from audio to prediction, and the one-line errors around it."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from tests.conftest import TINY_TRAINING

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "musicnn_reference.npz")


def test_the_port_gives_the_original_outputs():
    """tools/make_musicnn_reference.py ran the original musicnn 0.1.0 (its TF1 graph, restored
    strictly from its checkpoint) on two 3 s patches of real music."""
    from tclf import musicnn

    reference = np.load(FIXTURE)
    tagger = musicnn.build(None, tags=True)
    outputs = tagger.predict(reference["mel"][..., None], verbose=0)
    np.testing.assert_allclose(outputs["penultimate"], reference["penultimate"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs["tags"], reference["tags"], rtol=1e-4, atol=1e-5)


def test_the_stored_log_mel_is_musicnns_input_to_the_quantum():
    import librosa
    import tensorflow as tf
    from PIL import Image

    from tclf.data import audio

    rng = np.random.default_rng(0)
    t = np.arange(10 * audio.SAMPLE_RATE) / audio.SAMPLE_RATE
    y = (0.5 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    stored = audio.musicnn_input(y)
    assert stored.dtype == np.uint16 and stored.shape == audio.spectrogram_shape("musicnn")[:2]

    y16 = librosa.resample(y, orig_sr=audio.SAMPLE_RATE, target_sr=16000, res_type="soxr_hq")
    mel = librosa.feature.melspectrogram(y=y16, sr=16000, n_fft=512, hop_length=256, n_mels=96)
    expected = np.log10(1 + 10000 * mel.T.astype(np.float32))
    assert expected.max() > 3  # Loud enough for the scale to matter.
    np.testing.assert_allclose(stored / audio.MUSICNN_SCALE, expected, atol=1e-3)

    png = audio.encode_png(stored, 6)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), stored)
    decoded = tf.io.decode_png(png, channels=1, dtype=tf.uint16).numpy()[:, :, 0]
    np.testing.assert_array_equal(decoded, stored)


@pytest.fixture(scope="module")
def musicnn_run(audio_dir, tmp_path_factory):
    """The shared synthetic audio extracted for musicnn, packed and trained (tiny heads, the
    real MSD weights, both stages)."""
    from tclf.data import extract, records
    from tclf.training import train

    root = tmp_path_factory.mktemp("musicnn")
    data, packed, models = (str(root / name) for name in ("data", "records", "models"))
    extract.extract(audio_dir, data, jobs=1, progress=False, backbone="musicnn")
    records.pack(data, packed, val_fraction=0.25, seed=0, min_shards=2, progress=False)
    options = {**TINY_TRAINING, "weights": "imagenet", "stage2_random_backbone": False}
    result = train.train(train.TrainConfig(records=packed, models=models, **options))
    return data, packed, result


def test_a_musicnn_run_from_audio_to_prediction(musicnn_run, audio_dir):
    from tclf import musicnn, predict
    from tclf.data.schema import Pack
    from tclf.evaluation import evaluate
    from tclf.model import backbone_of, load_config, load_model

    data, packed, result = musicnn_run
    pack = Pack.load(packed)
    assert pack.backbone == "musicnn" and pack.spectrogram_shape == (626, 96, 1)
    assert pack.spectrogram_scale == 4096
    assert [s.name for s in result.stages] == ["stage1", "stage2"]
    assert result.stages[1].epochs_run >= 1  # Pretrained: stage 2 fine-tunes its top.

    model, classes = load_model(result.model_path)
    assert load_config(result.model_path)["extraction"]["backbone"] == "musicnn"
    # The front end stays frozen in both stages: still the checkpoint's numbers.
    reference = musicnn.build(626, weights="msd")
    for name in ("timbral_38", "temporal_128", "input_norm"):
        for ours, theirs in zip(backbone_of(model).get_layer(name).get_weights(),
                                reference.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)

    evaluation = evaluate.evaluate_records(model, classes, pack)
    assert evaluation.num_tracks == len(pack.split("val").tracks)
    tracks = sorted(os.path.join(audio_dir, style, name) for style in ("dark", "psy")
                    for name in os.listdir(os.path.join(audio_dir, style))[:1])
    folder = os.path.join(data, "goa", sorted(os.listdir(os.path.join(data, "goa")))[0])
    found = predict.predict_paths(tracks + [folder], result.model_path)
    assert not found.failed and len(found.tracks) == 3
    for track in found.tracks:
        assert track.style in classes and len(track.segments) == 2
        assert np.isclose(sum(track.probabilities), 1.0)


def test_the_other_backbone_is_one_line_naming_both(musicnn_run, records_dir, data_copy,
                                                    audio_dir):
    from tclf import InputError, predict
    from tclf.data import extract
    from tclf.evaluation import evaluate
    from tclf.model import load_model

    _, _, result = musicnn_run
    model, classes = load_model(result.model_path)
    with pytest.raises(InputError, match="efficientnetb0 backbone, and the model is a musicnn"):
        evaluate.evaluate_records(model, classes, records_dir)
    track = os.path.join(data_copy, "dark", sorted(os.listdir(os.path.join(data_copy, "dark")))[0])
    found = predict.predict_paths([track], result.model_path)
    assert len(found.failed) == 1
    assert "efficientnetb0 backbone, and the model is a musicnn" in found.failed[0][1]
    before = sorted(os.listdir(data_copy))
    with pytest.raises(InputError, match="efficientnetb0 backbone, not --backbone musicnn"):
        extract.extract(audio_dir, data_copy, jobs=1, progress=False, backbone="musicnn")
    assert sorted(os.listdir(data_copy)) == before


def test_without_the_package_musicnn_says_how_to_install_it(monkeypatch):
    from tclf import RunError, musicnn
    from tclf.model import build_model

    monkeypatch.setattr(musicnn, "_package_folders", lambda: [])
    with pytest.raises(RunError, match=r"pip install --no-deps musicnn==0\.1\.0"):
        build_model(3, backbone="musicnn")


def test_layer_counts_are_per_backbone():
    from tclf import InputError
    from tclf.training.config import TrainConfig
    from tclf.tune.space import for_backbone, search_space

    config = TrainConfig(stage2_layers=60)
    config.validate_model_options("efficientnetb0")
    with pytest.raises(InputError, match="0-40 for the musicnn backbone"):
        config.validate_model_options("musicnn")
    space = for_backbone(search_space(), "musicnn", 40)
    assert space["stage2_layers"]["max"] == 40
    assert space["stage2_layers"]["default"] == TrainConfig().stage2_layers
    assert for_backbone(search_space(), "efficientnetb0", 238)["stage2_layers"]["max"] == 80
    with pytest.raises(InputError, match="more than the 40 layers"):
        for_backbone(search_space({"stage2_layers": [10, 60]}), "musicnn", 40)


def test_a_search_on_a_musicnn_pack_searches_its_layers(musicnn_run, tmp_path):
    """tclf-tune with the pretrained musicnn: its range of stage2_layers, both stages a trial."""
    from tclf.training.config import TrainConfig
    from tclf.tune import search
    from tclf.tune import space as tune_space

    _, packed, _ = musicnn_run
    options = {**TINY_TRAINING, "weights": "imagenet", "stage2_random_backbone": False}
    base = TrainConfig(records=packed, **options)
    fixed = set(options) - {"stage2_layers", "gpus", "verbose"}
    space = tune_space.search_space({"stage1_lr": 1e-4, "stage2_lr": 1e-5, "dropout": 0.4,
                                     "stage1_warmup_epochs": 1.0, "stage2_warmup_epochs": 1.0},
                                    fixed=fixed, base=base)
    result = search.tune(base, str(tmp_path / "search"), max_trials=1, space=space,
                         progress=False, echo=lambda line: None)
    assert [row["status"] for row in result.rows] == ["COMPLETED"]
    best = json.load(open(tmp_path / "search" / "best_hparams.json"))
    assert 0 <= best["stage2_layers"] <= 40 and best["stage2_layers"] % 5 == 0
