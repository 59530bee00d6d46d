"""tclf.storage: the one atomic-write implementation, locally and on a tf.io.gfile filesystem."""

from __future__ import annotations

import os
import sys

import pytest

from tclf import storage


def test_write_atomic_leaves_no_tmp_files(tmp_path):
    path = str(tmp_path / "out.txt")
    storage.write_atomic(path, "first")
    storage.write_atomic(path, b"second \xc3\xa9")  # Overwrite.
    assert (tmp_path / "out.txt").read_bytes() == b"second \xc3\xa9"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_cleans_up_on_failure(tmp_path):
    target = tmp_path / "is_a_dir"
    (target / "child").mkdir(parents=True)  # Renaming over a non-empty folder fails.
    with pytest.raises(OSError):
        storage.write_atomic(str(target), b"data")
    assert sorted(os.listdir(tmp_path)) == ["is_a_dir"]


def test_write_atomic_rejects_other_types(tmp_path):
    with pytest.raises(ValueError, match="bytes or str"):
        storage.write_atomic(str(tmp_path / "x"), 123)


def test_an_interrupted_staged_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with storage.staged(str(path)) as staging:
            assert staging.endswith(".h5") and os.path.dirname(staging) == str(tmp_path)
            with open(staging, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.h5"]


def test_publish_copies_atomically(tmp_path):
    source, target = tmp_path / "model.h5", tmp_path / "latest.h5"
    source.write_bytes(b"model")
    target.write_bytes(b"older model")
    storage.publish(str(source), str(target))
    assert target.read_bytes() == b"model" and sorted(os.listdir(tmp_path)) == [
        "latest.h5", "model.h5"]
    with pytest.raises(OSError):
        storage.publish(str(tmp_path / "missing.h5"), str(target))
    assert target.read_bytes() == b"model" and sorted(os.listdir(tmp_path)) == [
        "latest.h5", "model.h5"]


def test_remote_paths_go_through_tf_gfile(tmp_path):
    import tensorflow as tf

    folder = "ram://tclf-storage-test"
    tf.io.gfile.makedirs(folder)
    path = storage.join(folder, "report.txt")
    assert path == "ram://tclf-storage-test/report.txt"
    storage.write_atomic(path, "remote text")
    with tf.io.gfile.GFile(path, "rb") as f:
        assert f.read() == b"remote text"
    local = tmp_path / "local.txt"
    local.write_text("to publish")
    storage.publish(str(local), storage.join(folder, "latest.txt"))
    with tf.io.gfile.GFile(storage.join(folder, "latest.txt")) as f:
        assert f.read() == "to publish"
    assert sorted(tf.io.gfile.listdir(folder)) == ["latest.txt", "report.txt"]


def test_local_writes_do_not_import_tensorflow(tmp_path):
    import subprocess

    code = (f"import sys; from tclf import storage; "
            f"storage.write_atomic({str(tmp_path / 'a.txt')!r}, 'x'); "
            f"storage.publish({str(tmp_path / 'a.txt')!r}, {str(tmp_path / 'b.txt')!r}); "
            f"assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / "b.txt").read_text() == "x"


def test_local_files_size_rename_remove_and_a_local_copy_as_is(tmp_path):
    a, b = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    storage.write_atomic(a, b"12345")
    assert storage.size(a) == 5 and storage.read_bytes(a) == b"12345"
    storage.write_atomic(b, b"other")
    with pytest.raises(FileExistsError):  # Never replaced without overwrite.
        storage.rename(a, b)
    assert storage.read_bytes(b) == b"other" and storage.exists(a)
    storage.rename(a, b, overwrite=True)
    assert storage.read_bytes(b) == b"12345" and not storage.exists(a)
    storage.rename(b, a)
    assert sorted(storage.listdir(str(tmp_path))) == ["a.bin"]
    with storage.local_copy(a) as local:
        assert local == a
    storage.remove(a)
    with pytest.raises(storage.errors(a)) as caught:
        storage.remove(a)
    assert storage.reason(caught.value) == "No such file or directory"
    assert storage.errors(a) == (OSError,) and storage.listdir(a) == []


def test_remote_files_size_rename_remove_and_a_local_copy(tmp_path, monkeypatch):
    import tempfile

    import tensorflow as tf

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = "ram://tclf-storage-files"
    storage.makedirs(storage.join(folder, "sub"))
    a, b = storage.join(folder, "model.keras"), storage.join(folder, "sub", "b.keras")
    storage.write_atomic(a, b"zip bytes")
    assert storage.size(a) == 9 and storage.isdir(storage.join(folder, "sub"))
    with storage.local_copy(a) as local:
        assert not storage.is_remote(local) and local.endswith("model.keras")
        with open(local, "rb") as f:
            assert f.read() == b"zip bytes"
    assert os.listdir(tmp_path) == []  # The copy is gone.
    storage.rename(a, b)
    assert storage.read_bytes(b) == b"zip bytes" and not storage.exists(a)
    with pytest.raises(storage.errors(a)) as caught:
        storage.read_bytes(a)
    assert isinstance(caught.value, tf.errors.NotFoundError)
    assert storage.reason(tf.errors.NotFoundError(None, None, "gone")) == "gone"
    storage.remove(b)
    assert storage.listdir(storage.join(folder, "sub")) == []


def test_reading_and_listing_local_files_do_not_import_tensorflow(tmp_path):
    import subprocess

    (tmp_path / "a.txt").write_text('{"x": 1}')
    code = (f"import sys; from tclf import storage; folder = {str(tmp_path)!r}; "
            f"path = storage.join(folder, 'a.txt'); "
            f"assert storage.read_json(path) == {{'x': 1}} and storage.size(path) == 8; "
            f"assert storage.listdir(folder) == ['a.txt'] and storage.isdir(folder); "
            f"storage.rename(path, storage.join(folder, 'b.txt')); "
            f"ctx = storage.local_copy(storage.join(folder, 'b.txt')); ctx.__enter__(); "
            f"storage.remove(storage.join(folder, 'b.txt')); "
            f"assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert os.listdir(tmp_path) == []
