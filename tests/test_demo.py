"""Tests for tclf.demo (synthetic demo audio) and tools/make_demo_data.py."""

import importlib.util
import os

import numpy as np
import pytest
import soundfile as sf

from tclf import demo
from tclf.demo import STYLES, TEMPO_RANGES, make_demo_audio, synthesize_track, track_seed

SR = 22050
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("style", STYLES)
def test_shape_dtype_range(style):
    y = synthesize_track(style, seed=3, duration=4.0, sample_rate=SR)
    assert y.shape == (4 * SR,)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))
    assert np.max(np.abs(y)) == pytest.approx(0.9, abs=1e-3)
    assert np.sqrt(np.mean(y.astype(np.float64) ** 2)) > 0.02  # not near-silent


@pytest.mark.parametrize("duration,sample_rate", [(2.5, 22050), (1.001, 16000), (0.3, 22050)])
def test_duration_respected(duration, sample_rate):
    y = synthesize_track("goa", seed=0, duration=duration, sample_rate=sample_rate)
    assert y.shape == (int(round(duration * sample_rate)),)


@pytest.mark.parametrize("style", STYLES)
def test_deterministic_for_seed(style):
    a = synthesize_track(style, seed=11, duration=3.0)
    b = synthesize_track(style, seed=11, duration=3.0)
    np.testing.assert_array_equal(a, b)


def _correlation(a, b):
    return abs(float(np.corrcoef(a, b)[0, 1]))


def test_different_seeds_and_styles_differ():
    tracks = {(style, seed): synthesize_track(style, seed, duration=2.0)
              for style in STYLES for seed in (1, 2)}
    keys = list(tracks)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:
            assert not np.array_equal(tracks[first], tracks[second]), (first, second)
            assert _correlation(tracks[first], tracks[second]) < 0.9, (first, second)


def test_track_seed_is_stable_and_distinct():
    seeds = {(style, i): track_seed(0, style, i) for style in STYLES for i in range(5)}
    assert len(set(seeds.values())) == len(seeds)
    assert track_seed(0, "psy", 3) == seeds[("psy", 3)]
    assert track_seed(1, "psy", 3) != seeds[("psy", 3)]


@pytest.mark.parametrize("kwargs", [
    {"style": "trance", "seed": 0},
    {"style": "Goa", "seed": 0},
    {"style": "goa", "seed": 0, "duration": 0.0},
    {"style": "goa", "seed": 0, "duration": -1.0},
    {"style": "goa", "seed": -1},
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        synthesize_track(**kwargs)


@pytest.mark.parametrize("style", STYLES)
def test_tempo_grid_stays_in_range(style):
    lo, hi = TEMPO_RANGES[style]
    for bpm in np.linspace(lo, hi, 25):
        grid = demo._Grid(bpm, SR, TEMPO_RANGES[style])
        assert lo <= grid.bpm <= hi
        assert abs(grid.bpm - bpm) / bpm < 0.011


def _no_tmp_files(directory):
    return [name for name in os.listdir(directory) if ".tmp-" in name]


def test_make_demo_audio_writes_tree(tmp_path):
    out_dir = str(tmp_path / "audio")
    paths = make_demo_audio(out_dir, tracks_per_style=2, duration=3.0, seed=5, sample_rate=16000)
    expected = [os.path.join(out_dir, style, f"{style}_{i:02d}.wav")
                for style in STYLES for i in range(2)]
    assert paths == expected
    assert sorted(os.listdir(out_dir)) == sorted(STYLES)
    for style in STYLES:
        assert sorted(os.listdir(os.path.join(out_dir, style))) == [
            f"{style}_00.wav", f"{style}_01.wav"]
        assert not _no_tmp_files(os.path.join(out_dir, style))
    for path in paths:
        info = sf.info(path)
        assert info.samplerate == 16000
        assert info.channels == 1
        assert info.frames == 3 * 16000
        assert info.subtype == "PCM_16"
    # The file is the 16-bit version of synthesize_track with the derived seed.
    y, sr = sf.read(paths[3], dtype="float32")
    expected_audio = synthesize_track("psy", track_seed(5, "psy", 1), 3.0, 16000)
    np.testing.assert_allclose(y, expected_audio, atol=1.0 / 32768 + 1e-6)

    # Re-running overwrites (skips nothing) and gives identical files.
    psy_paths = paths[2:4]
    before = [sf.read(p)[0] for p in psy_paths]
    os.utime(psy_paths[0], (0, 0))
    again = make_demo_audio(out_dir, tracks_per_style=2, duration=3.0, seed=5, sample_rate=16000,
                            styles=("psy",))
    assert again == psy_paths
    assert os.path.getmtime(psy_paths[0]) > 0
    for old, path in zip(before, psy_paths):
        np.testing.assert_array_equal(old, sf.read(path)[0])
    assert not _no_tmp_files(os.path.join(out_dir, "psy"))


def test_make_demo_audio_subset_and_errors(tmp_path):
    paths = make_demo_audio(str(tmp_path), tracks_per_style=1, duration=1.0, styles=["dark"])
    assert paths == [os.path.join(str(tmp_path), "dark", "dark_00.wav")]
    assert os.listdir(str(tmp_path)) == ["dark"]
    with pytest.raises(ValueError):
        make_demo_audio(str(tmp_path / "x"), tracks_per_style=1, duration=1.0, styles=["house"])
    with pytest.raises(ValueError):
        make_demo_audio(str(tmp_path / "y"), tracks_per_style=1, duration=0.0)


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", os.path.join(REPO_ROOT, "tools", "make_demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(tmp_path):
    from click.testing import CliRunner

    cli = _load_cli()
    runner = CliRunner()
    help_result = runner.invoke(cli.main, ["--help"])
    assert help_result.exit_code == 0
    for option in ("--tracks-per-style", "--duration", "--seed", "--sample-rate"):
        assert option in help_result.output
    result = runner.invoke(cli.main, [str(tmp_path), "--tracks-per-style", "1",
                                      "--duration", "1.5", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 files" in result.output
    for style in STYLES:
        assert sf.info(str(tmp_path / style / f"{style}_00.wav")).frames == int(1.5 * SR)
    assert runner.invoke(cli.main, [str(tmp_path), "--duration", "0"]).exit_code != 0


# --------------------------------------------------------------------------
# The styles differ in the intended direction (measured with librosa)
# --------------------------------------------------------------------------


def _fold_tempo(bpm):
    """Fold a tempo estimate into [100, 200) BPM to forgive octave errors."""
    bpm = float(bpm)
    while bpm < 100.0:
        bpm *= 2.0
    while bpm >= 200.0:
        bpm /= 2.0
    return bpm


@pytest.fixture(scope="module")
def style_measurements():
    librosa = pytest.importorskip("librosa")
    measurements = {}
    for style in STYLES:
        centroids, tempos = [], []
        for index in range(2):
            y = synthesize_track(style, track_seed(0, style, index), duration=20.0)
            centroids.append(float(librosa.feature.spectral_centroid(y=y, sr=SR).mean()))
            tempos.append(_fold_tempo(librosa.feature.tempo(y=y, sr=SR)[0]))
        measurements[style] = {"centroid": np.mean(centroids), "tempos": tempos}
    return measurements


def test_styles_brightness_order(style_measurements):
    centroid = {style: m["centroid"] for style, m in style_measurements.items()}
    assert centroid["goa"] > centroid["psy"] > centroid["dark"], centroid
    assert centroid["goa"] > 1.5 * centroid["dark"], centroid


def test_styles_tempo_plausible(style_measurements):
    for style, m in style_measurements.items():
        lo, hi = TEMPO_RANGES[style]
        for bpm in m["tempos"]:
            # librosa's tempo grid is ~5% coarse at hop 512: allow that much.
            assert 0.95 * lo <= bpm <= 1.05 * hi, (style, m["tempos"])
    assert np.mean(style_measurements["dark"]["tempos"]) > np.mean(
        style_measurements["goa"]["tempos"])
