"""Issue 10, the pack side: nothing lost under faults.

Concurrent packs, SIGKILL at fault points (tclf.faults), leftovers of dead runs, a full
disk, bad parts emptying a split, malformed manifests and bad part files.
"""

from __future__ import annotations

import collections
import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tclf import DataWarning, InputError
from tclf.data import records, schema, splits
from tests.conftest import STYLES, TRACKS_PER_STYLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = len(STYLES) * TRACKS_PER_STYLE * 2
PACK = "from tclf.cli import pack_command; pack_command()"


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TCLF_KILL_AT", None)
    env.update(extra)
    return env


def _snapshot(folder) -> dict:
    """Every file under folder (hidden ones included) -> its bytes."""
    folder = str(folder)
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def _assert_clean_valid_pack(folder) -> dict:
    """folder holds exactly a manifest and the shards it lists (no hidden leftovers, no lock),
    and every listed shard exists with the size the manifest gives."""
    manifest = records.load_manifest(str(folder))
    listed = [s for side in records.SPLITS for s in manifest["splits"][side]["shards"]]
    files = [records.MANIFEST_NAME] + [s["file"] for s in listed]
    assert sorted(os.listdir(folder)) == sorted(files)
    for shard in listed:
        assert os.path.getsize(os.path.join(folder, shard["file"])) == shard["bytes"]
    return manifest


def _assert_listed_shards_exist(folder) -> dict:
    manifest = records.load_manifest(str(folder))
    for side in records.SPLITS:
        for shard in manifest["splits"][side]["shards"]:
            assert os.path.exists(os.path.join(folder, shard["file"])), shard
    return manifest


@pytest.fixture
def old_pack(records_dir, tmp_path):
    """A private copy of the shared pack, and its files' bytes before the test."""
    target = tmp_path / "records"
    shutil.copytree(records_dir, target)
    return target, _snapshot(target)


# ---------------------------------------------------------------------------
# 1. Two packs into one folder at once.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_pack_started_while_another_runs_fails_and_the_first_wins(
        data_dir, tmp_path, monkeypatch, overwrite):
    """Deterministic race: the second pack starts while the first is writing its shards."""
    target = str(tmp_path / "records")
    real_write_split, second = records.write_split, []

    def write_split(*args, **kwargs):
        if not second:
            second.append(None)
            try:
                second[0] = records.pack(data_dir, target, seed=5, overwrite=overwrite,
                                         progress=False)
            except FileExistsError as error:
                second[0] = error
        return real_write_split(*args, **kwargs)

    monkeypatch.setattr(records, "write_split", write_split)
    first = records.pack(data_dir, target, seed=1, min_shards=2, progress=False)
    assert isinstance(second[0], FileExistsError), second
    assert "being packed by another tclf-pack" in str(second[0])
    assert f"pid {os.getpid()}" in str(second[0])
    manifest = _assert_clean_valid_pack(target)
    assert manifest["pack_id"] == first["pack_id"] and manifest["seed"] == 1


def test_two_pack_processes_started_together(data_dir, tmp_path):
    """Two tclf-pack processes released at the same moment: one packs, one fails clearly."""
    target, go = str(tmp_path / "records"), str(tmp_path / "go")
    script = ("import os, sys, time\n"
              "import tensorflow, tclf.data.records\n"  # The slow imports before the start line.
              "from tclf.cli import pack_command\n"
              f"open({str(tmp_path)!r} + '/ready-' + str(os.getpid()), 'w').close()\n"
              f"while not os.path.exists({go!r}): time.sleep(0.005)\n"
              "pack_command()\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, data_dir, target, "-q",
                              "--min-shards", "2", "--seed", str(seed)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT) for seed in (1, 2)]
    deadline = time.time() + 120
    while len(glob.glob(str(tmp_path / "ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    open(go, "w").close()
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 1)
    assert f"records into {target}" in winner[1]
    assert "FileExistsError" in loser[2] and target in loser[2], loser
    assert "Traceback" not in loser[2] and "packed" not in loser[1]
    manifest = _assert_clean_valid_pack(target)
    assert sum(manifest["splits"][s]["records"] for s in records.SPLITS) == TOTAL


def test_the_manifest_never_replaces_one_without_overwrite(tmp_path):
    """The last line of defence (a pack that holds no lock): the manifest is published with a
    hard link, which fails if the name exists, instead of a rename, which would replace it."""
    (tmp_path / "new.json").write_text("new")
    (tmp_path / "manifest.json").write_text("winner")
    with pytest.raises(FileExistsError, match="another tclf-pack finished first"):
        records._place_manifest(str(tmp_path / "new.json"), str(tmp_path / "manifest.json"),
                                overwrite=False)
    assert (tmp_path / "manifest.json").read_text() == "winner"
    records._place_manifest(str(tmp_path / "new.json"), str(tmp_path / "other.json"), False)
    assert (tmp_path / "other.json").read_text() == "new" and not (tmp_path / "new.json").exists()


def test_a_pack_without_the_lock_still_cannot_replace_a_finished_one(
        data_dir, tmp_path, monkeypatch):
    """A run without the lock (e.g. a filesystem without flock) that finds a pack finished
    meanwhile fails before moving anything, and leaves the winner's pack as it was."""
    import contextlib

    target = str(tmp_path / "records")
    monkeypatch.setattr(records, "_pack_lock", lambda _: contextlib.nullcontext(False))
    real_write_split, done = records.write_split, []

    def write_split(*args, **kwargs):
        if not done:
            done.append(None)  # The inner pack's own write_split calls come here too.
            done[0] = records.pack(data_dir, target, seed=7, min_shards=1, progress=False)
        return real_write_split(*args, **kwargs)

    monkeypatch.setattr(records, "write_split", write_split)
    with pytest.raises(FileExistsError, match="already holds packed records"):
        records.pack(data_dir, target, seed=1, progress=False)
    manifest = _assert_clean_valid_pack(target)
    assert manifest["pack_id"] == done[0]["pack_id"]


# ---------------------------------------------------------------------------
# 2 and 3. SIGKILL at the fault points; a later run cleans up.
# ---------------------------------------------------------------------------

KILLS = {  # case: (TCLF_KILL_AT, an old pack in the folder and --overwrite)
    "writing-fresh": ("pack.record_written:3", False),
    "writing-over-old": ("pack.record_written:3", True),
    "moving-fresh": ("pack.moving:2", False),
    "moving-over-old": ("pack.moving:2", True),
    "after-manifest-over-old": ("pack.manifest_placed", True),
}


@pytest.fixture(scope="module")
def killed_packs(data_dir, records_dir, tmp_path_factory):
    """Every KILLS case, run at once (one TensorFlow start each, in parallel): case ->
    (folder, return code, stderr, the old pack's bytes or None)."""
    root = tmp_path_factory.mktemp("killed")
    started = {}
    for case, (point, over_old) in KILLS.items():
        target = root / case
        before = None
        if over_old:
            shutil.copytree(records_dir, target)
            before = _snapshot(target)
        args = [data_dir, str(target), "-q", "--min-shards", "2", "--seed", "4"]
        run = subprocess.Popen([sys.executable, "-c", PACK, *args, *(["--overwrite"] * over_old)],
                               env=_env(TCLF_KILL_AT=point), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
        started[case] = (target, run, before)
    results = {}
    for case, (target, run, before) in started.items():
        _, err = run.communicate(timeout=300)
        results[case] = (target, run.returncode, err, before)
    return results


@pytest.mark.parametrize("case", list(KILLS))
def test_a_killed_pack_loses_nothing_and_the_next_run_cleans_up(killed_packs, data_dir, case):
    target, code, stderr, before = killed_packs[case]
    assert code == -9, stderr  # SIGKILL, no cleanup ran.
    names = os.listdir(target)
    if case == "after-manifest-over-old":
        # The new manifest was in place: the folder is the new, whole pack; the old shards
        # are unlisted leftovers.
        manifest = _assert_listed_shards_exist(target)
        assert manifest["seed"] == 4
        old_shards = [n for n in before if n.endswith(".tfrecord")]
        assert all(n in names for n in old_shards)
    elif before is not None:
        # The old pack is untouched: same manifest bytes, same shard files.
        now = _snapshot(target)
        assert {n: now[n] for n in before} == before
        assert records.load_manifest(str(target))["seed"] == 0
        _assert_listed_shards_exist(target)
    else:
        # No manifest: the folder does not look like a pack.
        assert records.MANIFEST_NAME not in names
        with pytest.raises(FileNotFoundError):
            records.load_manifest(str(target))
    assert any(n.startswith(records.STAGING_PREFIX) for n in names)  # What a dead run leaves.
    if case.startswith("moving"):
        assert any(records._OWN_SHARD.match(n) for n in names if n not in (before or {}))
    manifest = records.pack(data_dir, str(target), seed=4, min_shards=2, overwrite=True,
                            progress=False)
    assert _assert_clean_valid_pack(target)["pack_id"] == manifest["pack_id"]


def test_a_live_packs_staging_folder_is_left_alone(old_pack, data_dir):
    """Leftovers are removed only under the lock: another run's staging folder, while that run
    holds the lock, is not touched, and the run that found it fails."""
    target, before = old_pack
    with records._pack_lock(str(target)) as locked:
        assert locked
        live = target / f"{records.STAGING_PREFIX}{os.getpid()}-0123abcd"
        live.mkdir()
        (live / "train-00000-of-00001-0123abcd.tfrecord").write_bytes(b"x" * 100)
        with pytest.raises(FileExistsError, match="being packed by another"):
            records.pack(data_dir, str(target), overwrite=True, progress=False)
        assert live.is_dir() and len(os.listdir(live)) == 1
        shutil.rmtree(live)
    assert _snapshot(target) == before  # The lock file is gone with the lock.


def test_a_folder_left_by_an_older_tclf_pack_is_one_clear_error(old_pack, data_dir):
    """.old-pack-* is what a killed tclf-pack of an older tclf left: pack elsewhere."""
    target, before = old_pack
    (target / ".old-pack-12345678").mkdir()
    with pytest.raises(InputError, match=r"holds \.old-pack-12345678, left by a killed "
                                         r"tclf-pack of an older tclf; pack into another folder"):
        records.pack(data_dir, str(target), overwrite=True, progress=False)
    (target / ".old-pack-12345678").rmdir()
    assert _snapshot(target) == before


def test_unlisted_shards_are_kept_when_the_manifest_cannot_be_read(old_pack, data_dir):
    """Which shards a corrupt manifest lists is unknown: cleanup deletes none of them."""
    target, _ = old_pack
    (target / "manifest.json").write_text("{ truncated")
    stray = target / "val-00000-of-00001-deadbeef.tfrecord"
    stray.write_bytes(b"x")
    (target / f"{records.STAGING_PREFIX}1-deadbeef").mkdir()
    with pytest.raises(FileExistsError):
        records.pack(data_dir, str(target), progress=False)
    assert stray.exists()
    assert not any(n.startswith(".") for n in os.listdir(target))


# ---------------------------------------------------------------------------
# 7. A full disk.
# ---------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_the_old_pack_stays(old_pack, data_dir, monkeypatch):
    from click.testing import CliRunner

    from tclf import cli

    target, before = old_pack
    real_writer = tf.io.TFRecordWriter

    class FullDisk:
        written = 0

        def __init__(self, path, *args):
            self.writer = real_writer(path, *args)

        def write(self, record):
            FullDisk.written += 1
            if FullDisk.written > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.writer.write(record)

        def close(self):
            self.writer.close()

    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    with pytest.raises(OSError) as caught:
        records.pack(data_dir, str(target), overwrite=True, progress=False)
    assert caught.value.errno == errno.ENOSPC
    assert _snapshot(target) == before  # No staging folder, no lock, the old pack whole.
    FullDisk.written = 0
    done = CliRunner().invoke(cli.pack_command, [data_dir, str(target), "-q", "--overwrite"])
    assert done.exit_code == 1
    assert "Error: OSError: [Errno 28] No space left on device" in done.output
    assert "Traceback" not in done.output
    assert _snapshot(target) == before


def test_a_full_disk_found_when_the_shards_are_closed(old_pack, data_dir, monkeypatch):
    """Buffered writes may only fail when flushed: every writer is still closed, the staging
    folder removed and the old pack kept."""
    target, before = old_pack
    real_writer, closed = tf.io.TFRecordWriter, []

    class FailsOnClose:
        def __init__(self, path, *args):
            self.writer = real_writer(path, *args)

        def write(self, record):
            self.writer.write(record)

        def close(self):
            self.writer.close()
            closed.append(self)
            if len(closed) == 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.io, "TFRecordWriter", FailsOnClose)
    with pytest.raises(OSError, match="No space left"):
        records.pack(data_dir, str(target), overwrite=True, min_shards=2, progress=False)
    assert len(closed) == 2  # Both train shards, though the first close failed.
    assert _snapshot(target) == before


# ---------------------------------------------------------------------------
# 4. The split is drawn over valid tracks; empty classes and splits.
# ---------------------------------------------------------------------------


def _track_dirs(data_copy, style):
    return sorted(glob.glob(os.path.join(data_copy, style, "*")))


def _spoil_track(track_dir):
    for path in glob.glob(os.path.join(track_dir, "part_*.png")):
        with open(path, "wb") as f:
            f.write(b"not a png")


def test_the_split_is_drawn_over_valid_tracks(data_copy, tmp_path):
    """The track the split over all tracks would put in val for dark is unreadable: dark must
    still get a val track."""
    tracks = {f"{s}/{os.path.basename(t)}": i for i, s in enumerate(STYLES)
              for t in _track_dirs(data_copy, s)}
    naive = splits.split_tracks(tracks, 0.25, seed=0)
    dark_val = [t for t in naive["val"] if t.startswith("dark/")]
    assert len(dark_val) == 1
    _spoil_track(os.path.join(data_copy, dark_val[0]))
    with pytest.warns(DataWarning) as caught:
        manifest = records.pack(data_copy, str(tmp_path / "records"), val_fraction=0.25,
                                seed=0, min_shards=1, progress=False)
    assert manifest["splits"]["val"]["counts"]["dark"] == 2
    packed = manifest["splits"]["val"]["tracks"] + manifest["splits"]["train"]["tracks"]
    assert dark_val[0] not in packed
    assert not any("has no track" in str(w.message) for w in caught)
    assert manifest["skipped"] == {"dark": 2}


def test_a_class_missing_from_a_split_is_warned(data_copy, tmp_path):
    for track in _track_dirs(data_copy, "dark")[1:]:
        _spoil_track(track)
    with pytest.warns(DataWarning) as caught:
        manifest = records.pack(data_copy, str(tmp_path / "records"), val_fraction=0.25,
                                min_shards=1, progress=False)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("class dark has no track in the val split (it has 1 valid track")
               for m in messages), messages
    assert manifest["splits"]["val"]["counts"]["dark"] == 0
    assert manifest["splits"]["train"]["counts"]["dark"] == 2


def test_a_single_class_is_an_error(data_copy, tmp_path):
    for style in ("goa", "psy"):
        shutil.rmtree(os.path.join(data_copy, style))
    with pytest.raises(InputError, match=f"{data_copy}: at least two classes are needed, "
                                         f"found only 'dark'"):
        records.pack(data_copy, str(tmp_path / "records"), progress=False)
    assert os.listdir(tmp_path / "records") == []


def test_a_class_without_any_valid_pair_is_dropped(data_copy, tmp_path):
    for track in _track_dirs(data_copy, "goa"):
        _spoil_track(track)
    with pytest.warns(DataWarning) as caught:
        manifest = records.pack(data_copy, str(tmp_path / "records"), min_shards=1,
                                progress=False)
    assert any(str(w.message).endswith("goa: none of its part_N.png/.npy pairs is valid")
               for w in caught)
    assert manifest["classes"] == ["dark", "psy"]
    assert manifest["skipped"] == {"goa": TRACKS_PER_STYLE * 2}
    for track in _track_dirs(data_copy, "psy"):
        _spoil_track(track)
    with pytest.warns(DataWarning), pytest.raises(InputError, match="at least two classes"):
        records.pack(data_copy, str(tmp_path / "other"), progress=False)


# ---------------------------------------------------------------------------
# 5. Malformed manifests.
# ---------------------------------------------------------------------------


def _edit(manifest, change):
    manifest = json.loads(json.dumps(manifest))
    change(manifest)
    return json.dumps(manifest)


MALFORMED = {
    "a list": (lambda m: "[]", "holds a JSON list, not an object"),
    "truncated": (lambda m: json.dumps(m)[:100], "not a valid JSON file"),
    "empty": (lambda m: "", "not a valid JSON file"),
    "no classes": (lambda m: _edit(m, lambda d: d.pop("classes")), "'classes' must be"),
    "classes a string": (lambda m: _edit(m, lambda d: d.update(classes="dark")),
                         "'classes' must be"),
    "no splits": (lambda m: _edit(m, lambda d: d.pop("splits")), "'splits' must be an object"),
    "splits a list": (lambda m: _edit(m, lambda d: d.update(splits=[1, 2])),
                      "'splits' must be an object"),
    "no val": (lambda m: _edit(m, lambda d: d["splits"].pop("val")), "'splits.val' is missing"),
    "no shards": (lambda m: _edit(m, lambda d: d["splits"]["train"].pop("shards")),
                  "'splits.train.shards' must be"),
    "shard a path": (lambda m: _edit(m, lambda d: d["splits"]["train"]["shards"][0].update(
        file="../x.tfrecord")), "'splits.train.shards' must be"),
    "no counts": (lambda m: _edit(m, lambda d: d["splits"]["val"].pop("counts")),
                  "'splits.val.counts' must hold a count for every class"),
    "records a string": (lambda m: _edit(m, lambda d: d["splits"]["val"].update(records="8")),
                         "'splits.val.records' must be a count"),
    "records not the shards' sum": (
        lambda m: _edit(m, lambda d: d["splits"]["val"].update(records=1)),
        "'splits.val.records' is 1 but its shards hold"),
    "no feature_shape": (lambda m: _edit(m, lambda d: d.pop("feature_shape")),
                         "'feature_shape' must be a list of 2 positive integers"),
    "image_size short": (lambda m: _edit(m, lambda d: d.update(image_size=[299, 299])),
                         "'image_size' must be a list of 3"),
    "mean too short": (lambda m: _edit(m, lambda d: d.update(feature_mean=[0.0] * 3)),
                       "'feature_mean' must be a list of 68 finite numbers"),
    "std NaN": (lambda m: _edit(m, lambda d: d["feature_std"].__setitem__(0, float("nan"))),
                "'feature_std' must be a list of 68 finite numbers"),
    "old schema": (lambda m: _edit(m, lambda d: d.update(schema_version=0)), "schema version 0"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_an_input_error_naming_the_file(records_dir, tmp_path, case):
    make, reason = MALFORMED[case]
    with open(os.path.join(records_dir, "manifest.json")) as f:
        good = json.load(f)
    path = tmp_path / "manifest.json"
    path.write_text(make(good))
    with pytest.raises(InputError) as caught:
        schema.load_manifest(str(tmp_path))
    assert str(path) in str(caught.value) and reason in str(caught.value), str(caught.value)


def test_a_folder_named_manifest_json_is_an_input_error(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(InputError, match="manifest.json: is a folder"):
        schema.load_manifest(str(tmp_path))


def test_the_packed_manifest_passes_its_own_check(records_dir):
    with open(os.path.join(records_dir, "manifest.json")) as f:
        assert schema.check_manifest(json.load(f)) is None


# ---------------------------------------------------------------------------
# 6. Bad part files, odd paths.
# ---------------------------------------------------------------------------


def _sample(tmp_path, features=None, npy_bytes=None, png_bytes=None):
    from tclf.data.audio import encode_png

    png, npy = tmp_path / "part_1.png", tmp_path / "part_1.npy"
    if png_bytes is None:
        png.write_bytes(encode_png(np.zeros((299, 299, 3), np.uint8)))
    else:
        png.write_bytes(png_bytes)
    if npy_bytes is not None:
        npy.write_bytes(npy_bytes)
    else:
        np.save(npy, features if features is not None else np.zeros((10, 68), np.float32))
    return records.Sample(0, "goa/t", 1, str(png), str(npy))


@pytest.mark.parametrize("features, message", [
    (np.zeros((10, 68), complex), "has dtype complex128, expected a real float array"),
    (np.zeros((10, 68), bool), "has dtype bool, expected a real float array"),
    (np.zeros((10, 68), [("a", "f4")]), "expected a real float array"),
    (np.array(["x"] * 680).reshape(10, 68), "has dtype <U1"),
    (np.full((10, 68), 1e300), "holds values too large for float32"),
    (np.full((10, 68), np.inf, np.float16), "holds non-finite values"),
    (np.zeros((68, 10), np.float32), "has shape (68, 10), expected (10, 68)"),
])
def test_feature_matrices_that_are_not_real_finite_floats_are_refused(tmp_path, features, message):
    sample = _sample(tmp_path, features)
    with pytest.raises(InputError) as caught:
        records.read_sample(sample)
    assert str(caught.value).startswith(f"{sample.npy_path}: ") and message in str(caught.value)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.uint8, ">f4"])
def test_real_feature_matrices_of_any_width_are_read_as_float32(tmp_path, dtype):
    values = np.arange(680).reshape(10, 68) % 200
    _, features, _ = records.read_sample(_sample(tmp_path, values.astype(dtype)))
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, values.astype(np.float32))


def test_a_track_folder_lists_its_pngs_and_prediction_skips_a_part_without_npy(tmp_path):
    """records.track_parts / read_pair, what tclf-predict reads of a data/ track folder."""
    from tclf import predict

    _sample(tmp_path)
    (tmp_path / "part_10.png").write_bytes((tmp_path / "part_1.png").read_bytes())
    (tmp_path / "part_2.npy").write_bytes(b"no png")
    (tmp_path / "notes.txt").write_text("x")
    assert records.track_parts(str(tmp_path)) == [
        (1, str(tmp_path / "part_1.png"), str(tmp_path / "part_1.npy")),
        (10, str(tmp_path / "part_10.png"), str(tmp_path / "part_10.npy"))]
    assert records.track_parts(str(tmp_path / "notes.txt")) == []
    with pytest.warns(DataWarning, match=r"skipped .*part_10.npy: cannot be read \(No such"):
        parts = predict.read_track_folder(str(tmp_path))
    assert [index for index, _, _ in parts] == [1] and predict.is_track_folder(str(tmp_path))


def test_bad_part_files_are_skipped_with_a_warning_naming_them(data_copy, tmp_path):
    goa, psy, dark = (_track_dirs(data_copy, s) for s in ("goa", "psy", "dark"))
    rng = np.random.default_rng(0)
    bad = {
        os.path.join(goa[0], "part_1.png"): (rng.bytes(500), "unreadable PNG (not an image"),
        os.path.join(goa[1], "part_1.png"): (b"", "empty file"),
        os.path.join(psy[0], "part_1.npy"): (rng.bytes(500), "unreadable .npy"),
        os.path.join(psy[1], "part_1.npy"): (b"", "empty file"),
        os.path.join(psy[2], "part_1.npy"): (b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', "
                                             b"'fortran_order': False, 'shape': (10, 68), }"
                                             + b" " * 60 + b"\n" + b"\0" * 10,
                                             "unreadable .npy"),  # Header, then too few bytes.
    }
    for path, (content, _) in bad.items():
        with open(path, "wb") as f:
            f.write(content)
    folder = os.path.join(dark[0], "part_1.npy")  # A folder where a file should be.
    os.remove(folder)
    os.mkdir(folder)
    dangling = os.path.join(dark[1], "part_1.png")  # A link to nothing.
    os.remove(dangling)
    os.symlink(os.path.join(tmp_path, "gone.png"), dangling)
    bad[folder] = (None, "cannot be read (Is a directory)")
    bad[dangling] = (None, "cannot be read (No such file or directory)")
    with pytest.warns(DataWarning) as caught:
        manifest = records.pack(data_copy, str(tmp_path / "records"), min_shards=1,
                                progress=False)
    messages = [str(w.message) for w in caught]
    for path, (_, reason) in bad.items():
        assert any(m.startswith(f"skipped {path}: {reason}") for m in messages), (path, messages)
    assert sum(manifest["splits"][s]["records"] for s in records.SPLITS) == TOTAL - len(bad)


def test_an_unreadable_file_is_skipped_with_a_warning(data_copy, tmp_path):
    path = os.path.join(_track_dirs(data_copy, "goa")[0], "part_2.npy")
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: file permissions do not stop reads")
    with pytest.warns(DataWarning, match=f"skipped {path}: cannot be read \\(Permission denied"):
        manifest = records.pack(data_copy, str(tmp_path / "records"), progress=False)
    assert sum(manifest["splits"][s]["records"] for s in records.SPLITS) == TOTAL - 1


def test_a_file_given_as_data_dir_is_named_a_file(tmp_path):
    from click.testing import CliRunner

    from tclf import cli

    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        records.pack(str(path), str(tmp_path / "records"), progress=False)
    done = CliRunner().invoke(cli.pack_command, [str(path), str(tmp_path / "records"), "-q"])
    assert done.exit_code == 1 and "is a file, not a folder" in done.output
    with pytest.raises(FileNotFoundError, match="no such folder"):
        records.pack(str(tmp_path / "missing"), str(tmp_path / "records"), progress=False)
    assert not (tmp_path / "records").exists()  # Nothing created for a run that cannot start.


def test_unicode_spaces_and_symlinked_folders(data_dir, tmp_path):
    """Class and track names with spaces and non-ASCII letters, a class folder that is a
    symbolic link, and a track folder that is one, all pack."""
    root = tmp_path / "dätä set"
    root.mkdir()
    shutil.copytree(os.path.join(data_dir, "goa"), root / "goa trance ✓")
    os.symlink(os.path.join(data_dir, "psy"), root / "psy (linked)")
    dark = root / "dark"
    dark.mkdir()
    for i, track in enumerate(_track_dirs(data_dir, "dark")):
        os.symlink(track, dark / f"träck {i}")
    target = tmp_path / "récords ünd spaces"
    manifest = records.pack(str(root), str(target), val_fraction=0.25, min_shards=1,
                            progress=False)
    assert manifest["classes"] == ["dark", "goa trance ✓", "psy (linked)"]
    assert sum(manifest["splits"][s]["records"] for s in records.SPLITS) == TOTAL
    packed = manifest["splits"]["train"]["tracks"] + manifest["splits"]["val"]["tracks"]
    assert "dark/träck 0" in packed
    per_class = collections.Counter()
    for split in records.SPLITS:
        per_class.update({c: n for c, n in manifest["splits"][split]["counts"].items()})
    assert set(per_class.values()) == {TRACKS_PER_STYLE * 2}
    _assert_clean_valid_pack(target)
