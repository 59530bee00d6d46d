"""Audio analysis and `tclf-extract`."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tclf import DataWarning
from tclf.data import audio, extract
from tests.conftest import STYLES, TRACKS_PER_STYLE


def test_segment_starts_spread_over_body_without_overlap():
    starts = audio.segment_starts(300.0, 6, 10.0)
    assert len(starts) == 6
    assert starts[0] == pytest.approx(30.0) and starts[-1] + 10.0 == pytest.approx(270.0)
    assert all(b - a >= 10.0 for a, b in zip(starts, starts[1:]))
    # The body (48 s) cannot hold 6; the whole 60 s can, exactly.
    assert audio.segment_starts(60.0, 6, 10.0) == pytest.approx([0, 10, 20, 30, 40, 50])
    # Shorter: as many non-overlapping segments as fit; under one segment: none.
    short = audio.segment_starts(35.0, 6, 10.0)
    assert len(short) == 3 and all(b - a >= 10.0 for a, b in zip(short, short[1:]))
    assert short[-1] + 10.0 <= 35.0
    assert audio.segment_starts(9.9, 6, 10.0) == []


def test_analyze_segment_shapes_dtypes_and_finiteness():
    rng = np.random.default_rng(0)
    t = np.arange(10 * audio.SAMPLE_RATE) / audio.SAMPLE_RATE
    y = (0.4 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2.2 * t) > 0)
         + 0.002 * rng.standard_normal(len(t))).astype(np.float32)
    image, features = audio.analyze_segment(y)
    assert image.shape == (299, 299, 3) and image.dtype == np.uint8
    assert features.shape == (10, 68) and features.dtype == np.float32
    assert np.all(np.isfinite(features))
    assert len(audio.FEATURE_NAMES) == 68
    # Columns mean what the table says: they agree with librosa's own functions.
    import librosa

    reference = {
        "centroid_mean": librosa.feature.spectral_centroid(y=y, sr=audio.SAMPLE_RATE)[0],
        "rolloff_mean": librosa.feature.spectral_rolloff(y=y, sr=audio.SAMPLE_RATE)[0],
        "mfcc_mean_02": librosa.feature.mfcc(y=y, sr=audio.SAMPLE_RATE, n_mfcc=20)[1],
        "rms_mean": librosa.feature.rms(y=y)[0],
    }
    for name, frames in reference.items():
        ours = features[:, audio.FEATURE_NAMES.index(name)]
        assert ours.mean() == pytest.approx(frames.mean(), rel=0.02), name
    chroma = features[:, audio.FEATURE_NAMES.index("chroma_mean_C"):][:, :12].mean(axis=0)
    assert np.argmax(chroma) == 9  # 220 Hz is an A.
    assert features[0, audio.FEATURE_NAMES.index("tempo_bpm")] > 0
    # Silence stays finite.
    _, silent = audio.analyze_segment(np.zeros(10 * audio.SAMPLE_RATE, np.float32))
    assert np.all(np.isfinite(silent))


def test_png_is_rgb_299_and_lossless():
    image = np.random.default_rng(1).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    import io

    decoded = Image.open(io.BytesIO(audio.encode_png(image)))
    assert decoded.size == (299, 299) and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_extract_writes_every_track(data_dir):
    for style in STYLES:
        tracks = sorted(os.listdir(os.path.join(data_dir, style)))
        assert len(tracks) == TRACKS_PER_STYLE
        for track in tracks:
            names = sorted(os.listdir(os.path.join(data_dir, style, track)))
            assert names == ["part_1.npy", "part_1.png", "part_2.npy", "part_2.png",
                             extract.SOURCE_NAME]
            with Image.open(os.path.join(data_dir, style, track, "part_1.png")) as image:
                assert image.size == (299, 299) and image.mode == "RGB"
            features = np.load(os.path.join(data_dir, style, track, "part_2.npy"))
            assert features.shape == (10, 68) and features.dtype == np.float32
            assert np.all(np.isfinite(features))


def test_extract_skips_bad_files_and_goes_on(tmp_path, audio_dir):
    source = tmp_path / "audio"
    (source / "goa").mkdir(parents=True)
    good = sorted(os.listdir(os.path.join(audio_dir, "goa")))[0]
    os.link(os.path.join(audio_dir, "goa", good), source / "goa" / good)
    (source / "goa" / "notes.txt").write_text("not audio")
    sf.write(source / "goa" / "short.wav", np.zeros(5 * 22050, np.float32), 22050)
    with pytest.warns(DataWarning) as caught:
        summary = extract.extract(str(source), str(tmp_path / "data"), jobs=1, progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "notes.txt" in messages and "short.wav" in messages and "shorter than" in messages
    assert sum(summary.extracted.values()) == 1 and len(summary.failed) == 2
    assert sorted(os.listdir(tmp_path / "data" / "goa")) == [os.path.splitext(good)[0]]


def test_extract_nothing_usable_raises(tmp_path):
    (tmp_path / "audio" / "goa").mkdir(parents=True)
    (tmp_path / "audio" / "goa" / "a.mp3").write_bytes(b"\x00" * 1000)
    with pytest.warns(DataWarning, match="a.mp3"), pytest.raises(RuntimeError, match="no track"):
        extract.extract(str(tmp_path / "audio"), str(tmp_path / "data"), jobs=1, progress=False)


def test_interrupted_extract_leaves_no_half_track_and_rerun_completes(
        tmp_path, audio_dir, monkeypatch):
    target = tmp_path / "data"
    real_save = np.save
    calls = {"n": 0}

    def failing_save(*args, **kwargs):  # Interrupt in the middle of the third track.
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(extract.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(audio_dir, str(target), jobs=1, progress=False)
    monkeypatch.setattr(extract.np, "save", real_save)
    done = [(c, t) for c in os.listdir(target) if (target / c).is_dir()
            for t in os.listdir(target / c)]
    assert len(done) == 2  # Two complete tracks, the third never appeared.
    for c, t in done:
        assert len(os.listdir(target / c / t)) == 5  # 2 x (png, npy) + source.json.
    # A crash (not an exception) could also leave a temporary folder behind: the re-run removes it.
    (target / done[0][0] / ".tmp-crashed-1234").mkdir()
    summary = extract.extract(audio_dir, str(target), jobs=2, progress=False)
    assert sum(summary.existing.values()) == 2
    assert sum(summary.extracted.values()) == len(STYLES) * TRACKS_PER_STYLE - 2
    for style in STYLES:
        names = os.listdir(target / style)
        assert len(names) == TRACKS_PER_STYLE and not any(n.startswith(".") for n in names)
        for track in names:
            assert len(os.listdir(target / style / track)) == 5


def test_track_ids_stay_unique_across_subfolders(tmp_path):
    for folder in ("CD1", "CD2", "CD3"):
        (tmp_path / "goa" / folder).mkdir(parents=True)
        (tmp_path / "goa" / folder / "01 Intro.mp3").write_bytes(b"x")
    ids = [track for _, track, _ in extract.list_tracks(str(tmp_path))]
    assert ids == ["01_Intro", "01_Intro_2", "01_Intro_3"]


def test_one_data_folder_one_set_of_settings(tmp_path, audio_dir, data_dir):
    import json

    settings = json.load(open(os.path.join(data_dir, extract.SETTINGS_NAME)))
    assert settings["segment_seconds"] == 10.0 and settings["num_segments"] == 6
    with pytest.raises(ValueError, match="extracted with"):
        extract.extract(audio_dir, data_dir, segment_seconds=5.0, jobs=1, progress=False)


def _dying_worker(task):
    """Stands in for a worker process that the OOM killer ends mid-track."""
    os._exit(1)


def test_dead_worker_is_reported_not_waited_for(tmp_path, audio_dir, monkeypatch):
    monkeypatch.setattr(extract, "_extract_one", _dying_worker)
    outcome = {}

    def run():
        try:
            extract.extract(audio_dir, str(tmp_path / "data"), jobs=2, progress=False)
        except RuntimeError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "tclf-extract hung after a worker died"
    assert "worker process died" in outcome["error"] and "re-run" in outcome["error"]
