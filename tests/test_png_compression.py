"""The PNG compression of the spectrograms (tclf-extract / tclf-pack --png-compression).

The setting changes the bytes of a PNG, never its pixels; it is recorded in
DATA_DIR/extract.json and in the manifest; an extract.json without it (an older tclf's)
is one clear error.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tclf import InputError
from tclf.data import audio, extract, records

RAW_PNG_BYTES = 299 * (299 * 3 + 1)  # Filter byte + RGB per row, stored uncompressed.


@pytest.fixture(scope="module")
def spectrogram():
    """A real spectrogram image (as tclf-extract renders one) of a demo track."""
    from tclf import demo

    y = demo.synthesize_track("goa", 3, duration=12.0)
    image, _ = audio.analyze_segment(np.asarray(y, np.float32)[: 10 * audio.SAMPLE_RATE])
    return image


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _small_audio(audio_dir, tmp_path, tracks=1):
    """A copy of the first ``tracks`` demo files of each style."""
    target = tmp_path / "audio"
    for style in sorted(os.listdir(audio_dir)):
        (target / style).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(audio_dir, style)))[:tracks]:
            shutil.copy(os.path.join(audio_dir, style, name), target / style / name)
    return str(target)


def test_every_level_decodes_to_the_same_pixels(spectrogram):
    import tensorflow as tf

    sizes = {}
    for level in audio.PNG_LEVELS:
        png = audio.encode_png(spectrogram, level)
        np.testing.assert_array_equal(_pixels(png), spectrogram)
        np.testing.assert_array_equal(tf.io.decode_png(png, channels=3).numpy(), spectrogram)
        sizes[level] = len(png)
    # Level 0 stores the rows: the size is known. Compressed levels are far smaller.
    assert RAW_PNG_BYTES < sizes[0] < RAW_PNG_BYTES + 200
    assert max(sizes[level] for level in range(1, 10)) < 0.6 * sizes[0]
    assert sizes[9] <= sizes[1]
    assert audio.encode_png(spectrogram) == audio.encode_png(spectrogram, audio.PNG_COMPRESSION)
    with pytest.raises(InputError, match="0-9"):
        audio.encode_png(spectrogram, 10)
    with pytest.raises(InputError, match="0-9"):
        audio.encode_png(spectrogram, True)


def test_a_new_folder_records_the_default_and_its_pngs_are_stored(data_dir):
    """The shared fixture's folder was extracted with the defaults."""
    settings = json.load(open(os.path.join(data_dir, extract.SETTINGS_NAME)))
    assert settings[extract.PNG_COMPRESSION_KEY] == audio.PNG_COMPRESSION == 0
    pngs = sorted(glob.glob(os.path.join(data_dir, "*", "*", "part_*.png")))
    assert pngs
    for path in pngs[:4]:
        content = open(path, "rb").read()
        assert content == audio.encode_png(_pixels(content), 0)


def test_extract_option_is_recorded_and_kept(audio_dir, tmp_path):
    small = _small_audio(audio_dir, tmp_path)
    data = str(tmp_path / "data")
    extract.extract(small, data, jobs=1, progress=False, png_compression=6)
    settings = json.load(open(os.path.join(data, extract.SETTINGS_NAME)))
    assert settings[extract.PNG_COMPRESSION_KEY] == 6
    for path in glob.glob(os.path.join(data, "*", "*", "part_*.png")):
        content = open(path, "rb").read()
        assert content == audio.encode_png(_pixels(content), 6)
        assert len(content) < 0.6 * RAW_PNG_BYTES
    # A re-run without the option goes on with the folder's setting; the same one is fine...
    shutil.copy(os.path.join(audio_dir, "goa", sorted(os.listdir(os.path.join(
        audio_dir, "goa")))[1]), os.path.join(small, "goa", "added.wav"))
    summary = extract.extract(small, data, jobs=1, progress=False)
    assert sum(summary.extracted.values()) == 1 and sum(summary.existing.values()) == 3
    added = glob.glob(os.path.join(data, "goa", "added", "part_*.png"))
    assert added and all(open(p, "rb").read() == audio.encode_png(
        _pixels(open(p, "rb").read()), 6) for p in added)
    extract.extract(small, data, jobs=1, progress=False, png_compression=6)
    # ... another is refused, naming the way out.
    with pytest.raises(InputError, match="tclf-pack --png-compression 0"):
        extract.extract(small, data, jobs=1, progress=False, png_compression=0)
    assert json.load(open(os.path.join(data, extract.SETTINGS_NAME))) == settings


def test_a_folder_of_an_older_tclf_is_one_clear_error(audio_dir, tmp_path):
    """extract.json without png_compression: written by an older tclf; --overwrite re-extracts."""
    small = _small_audio(audio_dir, tmp_path)
    data = str(tmp_path / "data")
    extract.extract(small, data, jobs=1, progress=False, training_segments=0)
    path = os.path.join(data, extract.SETTINGS_NAME)
    settings = json.load(open(path))
    del settings[extract.PNG_COMPRESSION_KEY]
    open(path, "w").write(json.dumps(settings, indent=1))
    with pytest.raises(InputError, match=r"has no png_compression: .* older tclf; re-extract "
                                         r"with --overwrite, or into another DATA_DIR"):
        extract.extract(small, data, jobs=1, progress=False, training_segments=0)
    summary = extract.extract(small, data, jobs=1, progress=False, training_segments=0,
                              overwrite=True)
    assert sum(summary.extracted.values()) == len(os.listdir(small)) and not summary.failed
    assert json.load(open(path))[extract.PNG_COMPRESSION_KEY] == audio.PNG_COMPRESSION


def test_prediction_ignores_the_png_setting(monkeypatch):
    """model.h5 keeps the extraction settings; the PNG setting (or its absence in an older
    model) never reaches the in-memory analysis, which writes no PNG."""
    from tclf import predict

    analysis = dict(num_segments=6, segment_seconds=10.0, sample_rate=22050, skip_fraction=0.1)
    for stored in ({**analysis, "image_size": 299, "png_compression": 9},
                   {**analysis, "image_size": 299}, None):
        monkeypatch.setattr(predict, "load_config", lambda path, s=stored: {"extraction": s})
        assert predict.extraction_settings("model.h5") == (analysis if stored else {})


def _records_pngs(records_dir):
    import tensorflow as tf

    manifest = records.load_manifest(records_dir)
    description = records.feature_description(manifest["feature_shape"])
    found = {}
    for side in records.SPLITS:
        for shard in manifest["splits"][side]["shards"]:
            for raw in tf.data.TFRecordDataset(os.path.join(records_dir, shard["file"])):
                parsed = tf.io.parse_single_example(raw, description)
                key = (parsed[records.TRACK_ID_KEY].numpy().decode(),
                       int(parsed[records.SEGMENT_KEY].numpy()))
                found[key] = parsed[records.SPECTROGRAM_KEY].numpy()
    return manifest, found


def test_pack_reencodes_with_identical_pixels(data_dir, tmp_path):
    import tensorflow as tf

    packs = {}
    for setting in ("keep", 9):
        out = str(tmp_path / f"records-{setting}")
        records.pack(data_dir, out, val_fraction=0.25, seed=0, min_shards=2, progress=False,
                     png_compression=setting)
        packs[setting] = _records_pngs(out)
    keep, found = packs["keep"]
    assert keep["png_compression"] == "keep"
    for key, png in found.items():  # keep: the bytes of the files.
        track, segment = key
        assert png == open(os.path.join(data_dir, track, f"part_{segment}.png"), "rb").read()
    sizes = {}
    for setting, (manifest, pngs) in packs.items():
        assert manifest["png_compression"] == setting
        assert pngs.keys() == found.keys()
        for key, png in pngs.items():
            np.testing.assert_array_equal(tf.io.decode_png(png, channels=3).numpy(),
                                          _pixels(found[key]))
        sizes[setting] = sum(len(p) for p in pngs.values())
    # The shared folder holds level-0 PNGs: the re-encoding is far smaller.
    assert sizes[9] < 0.6 * sizes["keep"]
    with pytest.raises(InputError, match="0-9"):
        records.pack(data_dir, str(tmp_path / "bad"), png_compression=11, progress=False)


def test_cli_shows_and_passes_the_options(data_dir, tmp_path):
    from tclf import cli

    runner = CliRunner()
    for command in (cli.extract_command, cli.pack_command):
        result = runner.invoke(command, ["--help"])
        assert result.exit_code == 0 and "--png-compression" in result.output
    assert "keep" in runner.invoke(cli.pack_command, ["--help"]).output
    out = str(tmp_path / "records")
    result = runner.invoke(cli.pack_command, [data_dir, out, "--png-compression", "1", "-q",
                                              "--min-shards", "1"])
    assert result.exit_code == 0, result.output
    assert records.load_manifest(out)["png_compression"] == 1
    result = runner.invoke(cli.pack_command, [data_dir, out, "--png-compression", "x"])
    assert result.exit_code == 2 and "--png-compression" in result.output
    result = runner.invoke(cli.extract_command, ["a", "b", "--png-compression", "10"])
    assert result.exit_code == 2 and "--png-compression" in result.output
