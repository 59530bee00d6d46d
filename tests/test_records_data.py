"""`tclf-pack` (schema, validation, split, manifest) and the tf.data reader."""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tclf import DataWarning, storage
from tclf.data import reader, records, splits
from tests.conftest import STYLES, TRACKS_PER_STYLE


def test_schema_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    from tclf.data.audio import encode_png

    features = np.random.default_rng(1).standard_normal((10, 68)).astype(np.float32)
    serialized = records.create_example(encode_png(image), features, 2, "goa/t1", 5)
    inputs, label, track = reader.decode_example(tf.constant(serialized), [10, 68],
                                               include_track_id=True)
    np.testing.assert_array_equal(inputs["spectrogram"].numpy(), image)
    np.testing.assert_array_equal(inputs["features"].numpy(), features)
    assert label.numpy() == 2 and track.numpy() == b"goa/t1"
    assert inputs["spectrogram"].dtype == tf.uint8 and inputs["features"].dtype == tf.float32


def test_manifest_counts_equal_what_the_reader_yields(records_dir):
    manifest = records.load_manifest(records_dir)
    assert manifest["classes"] == list(STYLES)
    for split in records.SPLITS:
        info = manifest["splits"][split]
        seen = collections.Counter()
        tracks = set()
        for _, labels, track_ids in reader.make_dataset(records_dir, split, batch_size=5,
                                                      include_track_id=True):
            seen.update(manifest["classes"][i] for i in labels.numpy())
            tracks.update(t.decode() for t in track_ids.numpy())
        assert dict(seen) == {c: n for c, n in info["counts"].items() if n}
        assert sum(seen.values()) == info["records"] == sum(s["records"] for s in info["shards"])
        assert sorted(tracks) == info["tracks"]
    total = sum(manifest["splits"][s]["records"] for s in records.SPLITS)
    assert total == len(STYLES) * TRACKS_PER_STYLE * 2
    assert len(manifest["feature_mean"]) == 68 and all(s >= 0 for s in manifest["feature_std"])


def test_split_by_track_stratified_and_stable(records_dir, data_dir, tmp_path):
    manifest = records.load_manifest(records_dir)
    train, val = set(manifest["splits"]["train"]["tracks"]), set(manifest["splits"]["val"]["tracks"])
    assert not train & val
    assert len(train | val) == len(STYLES) * TRACKS_PER_STYLE
    per_class = collections.Counter(t.split("/")[0] for t in val)
    assert all(per_class[s] == 1 for s in STYLES)  # 25% of 4 tracks per class.
    labels = {f"c{i % 3}/t{i}": i % 3 for i in range(60)}
    first = splits.split_tracks(labels, 0.2, seed=7)
    assert first == splits.split_tracks(labels, 0.2, seed=7)
    assert first != splits.split_tracks(labels, 0.2, seed=8)
    assert collections.Counter(t[:2] for t in first["val"]) == {"c0": 4, "c1": 4, "c2": 4}


def test_groups_keep_a_group_on_one_side():
    labels = {f"c{i % 2}/t{i}": i % 2 for i in range(40)}
    groups = {f"t{i}": f"artist{i // 4}" for i in range(40)}  # Bare folder names work too.
    for seed in range(5):
        split = splits.split_tracks(labels, 0.25, seed=seed, groups=groups)
        side = {t: s for s, ts in split.items() for t in ts}
        by_group = collections.defaultdict(set)
        for track, group in groups.items():
            by_group[group].add(side[f"c{int(track[1:]) % 2}/{track}"])
        assert all(len(sides) == 1 for sides in by_group.values())
        assert 0 < len(split["val"]) < 40


def test_groups_file_is_read(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("track_id,group\ngoa/t1,a\nt2,b\n")
    assert splits.read_groups(str(path)) == {"goa/t1": "a", "t2": "b"}


def _damage(data_copy):
    """Apply every kind of bad input to a copy of data/; return the names expected in warnings."""
    goa = sorted(glob.glob(os.path.join(data_copy, "goa", "*")))
    psy = sorted(glob.glob(os.path.join(data_copy, "psy", "*")))
    with open(os.path.join(goa[0], "part_1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")  # Corrupt PNG.
    Image.new("RGB", (100, 80)).save(os.path.join(goa[1], "part_1.png"))  # Wrong size.
    np.save(os.path.join(psy[0], "part_1.npy"), np.zeros((10, 67), np.float32))  # Wrong shape.
    bad = np.zeros((10, 68), np.float32)
    bad[3, 4] = np.nan
    np.save(os.path.join(psy[1], "part_2.npy"), bad)  # NaN.
    os.remove(os.path.join(psy[2], "part_2.npy"))  # png without npy.
    os.makedirs(os.path.join(data_copy, "empty_style"))  # Empty class folder.
    return {
        os.path.join(goa[0], "part_1.png"): "unreadable PNG",
        os.path.join(goa[1], "part_1.png"): "100x80",
        os.path.join(psy[0], "part_1.npy"): "(10, 67)",
        os.path.join(psy[1], "part_2.npy"): "non-finite",
        os.path.join(psy[2], "part_2.png"): "no matching part_2.npy",
        os.path.join(data_copy, "empty_style"): "no part_N",
    }


def test_bad_inputs_are_warned_and_skipped(data_copy, tmp_path):
    expected = _damage(data_copy)
    with pytest.warns(DataWarning) as caught:
        manifest = records.pack(data_copy, str(tmp_path / "records"), min_shards=2,
                                progress=False)
    messages = [str(w.message) for w in caught]
    for name, reason in expected.items():
        assert any(name in m and reason in m for m in messages), (name, reason, messages)
    assert manifest["classes"] == list(STYLES)  # The empty folder is not a class.
    total = sum(manifest["splits"][s]["records"] for s in records.SPLITS)
    assert total == len(STYLES) * TRACKS_PER_STYLE * 2 - 5
    # Every skip is counted: the 4 bad pairs, the png without its npy and the empty folder.
    assert sum(manifest["skipped"].values()) == len(expected) == 6
    yielded = sum(int(tf.shape(y)[0]) for split in records.SPLITS
                  for _, y in reader.make_dataset(str(tmp_path / "records"), split))
    assert yielded == total


def test_skips_reach_the_user_whatever_the_warnings_filter(data_copy, tmp_path):
    """PYTHONWARNINGS=ignore (a common way to quiet TensorFlow) must not hide lost data."""
    import warnings

    from click.testing import CliRunner

    from tclf import cli

    expected = _damage(data_copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = CliRunner().invoke(cli.pack_command, [data_copy, str(tmp_path / "records"), "-q",
                                                     "--min-shards", "1"])
    assert done.exit_code == 0, done.output
    for name, reason in expected.items():
        assert any(name in line and reason in line and line.startswith("warning: skipped")
                   for line in done.output.splitlines()), (name, done.output)
    assert "skipped: 6 (" in done.output


def test_pack_failing_midway_through_replacing_keeps_the_old_pack(
        records_dir, data_dir, tmp_path, monkeypatch):
    target = tmp_path / "records"
    shutil.copytree(records_dir, target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    real_rename, moved_in = storage.rename, []

    def rename(source, destination, overwrite=False):  # Remote storage failing mid-way.
        if ".tmp-pack-" in source:
            moved_in.append(source)
            if len(moved_in) == 2:
                raise tf.errors.UnavailableError(None, None, "connection reset")
        return real_rename(source, destination, overwrite)

    monkeypatch.setattr(storage, "rename", rename)
    with pytest.raises(tf.errors.UnavailableError):
        records.pack(data_dir, str(target), seed=3, overwrite=True, progress=False)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before


def test_no_valid_sample_raises_runtime_error(tmp_path):
    track = tmp_path / "data" / "goa" / "t1"
    track.mkdir(parents=True)
    (track / "part_1.png").write_bytes(b"not a png")
    np.save(track / "part_1.npy", np.zeros((10, 68), np.float32))
    with pytest.warns(DataWarning) as warned, pytest.raises(RuntimeError):
        records.pack(str(tmp_path / "data"), str(tmp_path / "records"), progress=False)
    messages = [str(w.message) for w in warned]
    assert any("part_1.png" in m for m in messages)
    assert any("goa: none of its part_N.png/.npy pairs is valid" in m for m in messages)
    assert not os.path.exists(tmp_path / "records" / "manifest.json")
    assert os.listdir(tmp_path / "records") == []  # The temporary folder is gone too.
    (tmp_path / "nothing").mkdir()
    with pytest.raises(RuntimeError, match="no samples"):
        records.pack(str(tmp_path / "nothing"), str(tmp_path / "records"), progress=False)


def test_pack_refuses_to_replace_without_overwrite(records_dir, data_dir, tmp_path):
    target = tmp_path / "records"
    shutil.copytree(records_dir, target)
    before = json.loads((target / "manifest.json").read_text())
    with pytest.raises(FileExistsError, match="--overwrite"):
        records.pack(data_dir, str(target), progress=False)
    after = records.pack(data_dir, str(target), seed=3, overwrite=True, min_shards=1,
                         progress=False)
    assert after["seed"] == 3 and before["seed"] == 0
    assert sorted(os.listdir(target)) == sorted(
        [records.MANIFEST_NAME] + [s["file"] for sp in after["splits"].values()
                                   for s in sp["shards"]])


def test_reader_batches_shuffles_and_caches(records_dir):
    dataset = reader.make_dataset(records_dir, "train", batch_size=4, training=True, cache=True,
                                image_size=64, seed=1)
    epochs = [[(x["spectrogram"].numpy(), y.numpy()) for x, y in dataset] for _ in range(2)]
    assert epochs[0][0][0].shape == (4, 64, 64, 3) and epochs[0][0][0].dtype == np.uint8
    counts = [sum(len(y) for _, y in epoch) for epoch in epochs]
    assert counts[0] == counts[1] == records.load_manifest(records_dir)["splits"]["train"]["records"]
    sums = [sorted(float(img.sum()) for batch, _ in epoch for img in batch) for epoch in epochs]
    assert sums[0] == sums[1]  # Same examples from the cache...
    order = [[float(img.sum()) for batch, _ in epoch for img in batch] for epoch in epochs]
    assert order[0] != order[1]  # ...in a new order.


def test_corrupt_shard_error_names_the_shard(records_dir, tmp_path):
    target = tmp_path / "records"
    shutil.copytree(records_dir, target)
    shard = sorted(glob.glob(str(target / "train-*")))[0]
    content = bytearray(open(shard, "rb").read())
    content[len(content) // 2: len(content) // 2 + 16] = b"\x00" * 16
    open(shard, "wb").write(bytes(content))
    with pytest.raises(reader.CorruptRecordsError, match=os.path.basename(shard)):
        with reader.naming_corrupt_shards(str(target), "train"):
            for _ in reader.make_dataset(str(target), "train", batch_size=4):
                pass
    open(shard, "wb").write(bytes(content[:1000]))  # Truncated: caught before reading.
    with pytest.raises(reader.CorruptRecordsError, match=os.path.basename(shard)):
        reader.make_dataset(str(target), "train")
