"""tclf-extract under faults: nothing lost, nothing mixed up (issue 10, extract and audio side).

Each test breaks one thing: a file added beside a colliding name, folders from an older tclf,
files that are not audio, odd arguments and names, a SIGKILL mid-run, a full disk. The
tracks are 22 s demo tracks (2 segments of 10 s each) or 11 s ones (1 segment), linked from
the session's audio.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from tclf import DataWarning, InputError, RunError, cli
from tclf.data import audio, extract

SOURCE = extract.SOURCE_NAME


def _wav(audio_dir, style, index):
    return os.path.join(audio_dir, style, f"{style}_{index:02d}.wav")


def _link(source, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.link(source, target)


def _tracks(data):
    """{class/track: sorted file names} of the visible track folders."""
    found = {}
    for class_name in sorted(os.listdir(data)):
        class_dir = os.path.join(data, class_name)
        if class_name.startswith(".") or not os.path.isdir(class_dir):
            continue
        for track in sorted(os.listdir(class_dir)):
            if not track.startswith("."):
                found[f"{class_name}/{track}"] = sorted(os.listdir(os.path.join(class_dir, track)))
    return found


def _hidden(data):
    return [os.path.join(c, n) for c in os.listdir(data) if os.path.isdir(os.path.join(data, c))
            for n in os.listdir(os.path.join(data, c)) if n.startswith(".")]


def _source(data, track):
    with open(os.path.join(data, track, SOURCE), encoding="utf-8") as f:
        return json.load(f)["source"]


def _run(audio_dir, data, **options):
    # The standard segments only: these tests count what a fault leaves, not segments.
    options.setdefault("training_segments", 0)
    return extract.extract(str(audio_dir), str(data), jobs=options.pop("jobs", 1),
                           progress=False, **options)


# ---------------------------------------------------------------------------
# Track ids: a file never lands in another file's folder.
# ---------------------------------------------------------------------------


def test_added_file_with_colliding_name_gets_its_own_track(tmp_path, audio_dir):
    """The issue's case: goa/with_space.wav extracted, then "goa/with space.wav" (another
    song) added. It used to be "1 extracted, 2 already complete" with the new song in no
    track and a copy of the old one in with_space_2."""
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "with_space.wav"))
    _link(_wav(audio_dir, "psy", 0), str(source / "psy" / "p.wav"))
    _run(source, data)
    old = np.load(data / "goa" / "with_space" / "part_1.npy")
    _link(_wav(audio_dir, "goa", 1), str(source / "goa" / "with space.wav"))
    summary = _run(source, data)
    assert sum(summary.extracted.values()) == 1 and sum(summary.existing.values()) == 2
    assert _source(data, "goa/with_space") == "with_space.wav"
    assert _source(data, "goa/with_space_2") == "with space.wav"
    np.testing.assert_array_equal(np.load(data / "goa" / "with_space" / "part_1.npy"), old)
    new = np.load(data / "goa" / "with_space_2" / "part_1.npy")
    expected = audio.analyze_file(str(source / "goa" / "with space.wav"))[0].features
    np.testing.assert_allclose(new, expected, rtol=1e-4, atol=1e-4)  # BLAS threads differ.
    assert not np.allclose(new, old, rtol=1e-2)
    # A third run changes nothing.
    summary = _run(source, data)
    assert sum(summary.extracted.values()) == 0 and sum(summary.existing.values()) == 3
    assert len(_tracks(data)) == 3


def test_removed_and_added_files_never_shift_ids(tmp_path, audio_dir):
    source, data = tmp_path / "audio", tmp_path / "data"
    for n, cd in enumerate(("CD1", "CD2")):
        _link(_wav(audio_dir, "dark", n), str(source / "dark" / cd / "01 Intro.wav"))
    _run(source, data, num_segments=1)
    assert _source(data, "dark/01_Intro") == "CD1/01 Intro.wav"
    assert _source(data, "dark/01_Intro_2") == "CD2/01 Intro.wav"
    os.remove(source / "dark" / "CD1" / "01 Intro.wav")  # CD2's would have become 01_Intro.
    _link(_wav(audio_dir, "dark", 2), str(source / "dark" / "CD3" / "01 Intro.wav"))
    summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) == 1 and sum(summary.existing.values()) == 1
    assert _source(data, "dark/01_Intro_3") == "CD3/01 Intro.wav"  # A fresh id, not 01_Intro_2.
    assert _source(data, "dark/01_Intro_2") == "CD2/01 Intro.wav"
    # The folder of the removed file stays as it was (extract never deletes a track).
    assert _source(data, "dark/01_Intro") == "CD1/01 Intro.wav"


def test_folders_of_an_older_tclf_are_one_clear_error(tmp_path, audio_dir):
    """Track folders without source.json (an older tclf's): one line naming them and the way
    out; --overwrite extracts the files into them again and names the ones left over."""
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "a.wav"))
    _link(_wav(audio_dir, "psy", 0), str(source / "psy" / "b.wav"))
    _run(source, data, num_segments=1)
    os.remove(data / "goa" / "a" / SOURCE)
    os.makedirs(data / "goa" / "gone")  # An older tclf's folder of a file since removed.
    with pytest.raises(InputError, match=r"goa.a \(and 1 more there\) has no source.json: "
                                         r"written by an older tclf; re-extract with "
                                         r"--overwrite, or into another DATA_DIR"):
        _run(source, data, num_segments=1)
    with pytest.warns(DataWarning, match=r"goa/\{gone\}: left as they are"):
        summary = _run(source, data, num_segments=1, overwrite=True)
    assert sum(summary.extracted.values()) == 2 and not summary.failed
    assert _source(data, "goa/a") == "a.wav" and _source(data, "psy/b") == "b.wav"
    assert sorted(_tracks(data)) == ["goa/a", "goa/gone", "psy/b"] and not _hidden(data)


def test_a_folder_recording_another_file_is_never_complete_for_this_one(tmp_path, audio_dir):
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "x.wav"))
    os.makedirs(data / "goa" / "x")  # A folder of x.flac, say, from another AUDIO_DIR.
    np.save(data / "goa" / "x" / "part_1.npy", np.zeros((10, 68), np.float32))
    (data / "goa" / "x" / SOURCE).write_text(json.dumps({"source": "x.flac"}))
    summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) == 1 and not summary.existing
    assert _source(data, "goa/x_2") == "x.wav"
    assert _source(data, "goa/x") == "x.flac"  # Untouched.


# ---------------------------------------------------------------------------
# Files that are not audio: one clear line each, no decoder noise.
# ---------------------------------------------------------------------------


def test_files_that_are_not_audio_get_one_clear_line_each(tmp_path, audio_dir, capfd):
    source, data = tmp_path / "audio", tmp_path / "data"
    goa = source / "goa"
    _link(_wav(audio_dir, "goa", 0), str(goa / "good.wav"))
    (goa / "notes.mp3").write_text("artist - title\nnot audio at all\n")
    random = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (goa / "random.mp3").write_bytes(random)
    (goa / "random.wav").write_bytes(random)
    (goa / "empty.wav").write_bytes(b"")
    sf.write(goa / "header_only.wav", np.zeros(0, np.float32), 22050)
    os.symlink(goa / "gone.wav", goa / "broken_link.wav")
    os.mkfifo(goa / "pipe.wav")  # Opening it to read would wait forever.
    sf.write(goa / "nan.wav", np.full(12 * 22050, np.nan, np.float32), 22050, subtype="FLOAT")
    # Samples of 1e20: the spectrum's power overflowed float32 and librosa raised its own error.
    sf.write(goa / "huge.wav", np.full(12 * 22050, 1e20, np.float32), 22050, subtype="FLOAT")
    capfd.readouterr()
    with pytest.warns(DataWarning) as caught:
        summary = _run(source, data, num_segments=1)
    err = capfd.readouterr().err
    messages = {os.path.basename(str(w.message).split(":")[0].split(" ", 1)[1]): str(w.message)
                for w in caught}
    expected = {
        "notes.mp3": "not a decodable audio file (it holds text)",
        "random.mp3": "not a decodable audio file (unrecognised or corrupt data)",
        "random.wav": "not a decodable audio file (Format not recognised)",
        "empty.wav": "empty file (0 bytes)",
        "header_only.wav": "no audio frames",
        "broken_link.wav": "no such file (a broken symbolic link)",
        "pipe.wav": "not a regular file (a pipe, socket or device)",
        "nan.wav": "holds NaN or infinite samples",
        "huge.wav": "holds samples far outside -1..1 (peak 1e+20",
    }
    assert sorted(messages) == sorted(expected)
    for name, text in expected.items():
        assert messages[name].startswith(f"skipped {goa / name}: ") and text in messages[name]
        assert "possibly a pipe" not in messages[name] or name == "pipe.wav"
    assert sum(summary.extracted.values()) == 1 and len(summary.failed) == len(expected)
    # mpg123's "Note: Illegal Audio-MPEG-Header ... Trying to resync" no longer reaches stderr.
    assert "MPEG" not in err and "resync" not in err and "Note:" not in err, err


def test_decoder_noise_still_shows_with_tclf_debug(tmp_path, capfd, monkeypatch):
    path = tmp_path / "random.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    monkeypatch.setenv("TCLF_DEBUG", "1")
    capfd.readouterr()
    with pytest.raises(audio.AudioError, match="not a decodable audio file"):
        audio.load_segments(str(path))
    assert "MPEG" in capfd.readouterr().err


# ---------------------------------------------------------------------------
# Arguments and names.
# ---------------------------------------------------------------------------


def test_a_file_given_as_a_folder_is_named_as_such(tmp_path, audio_dir):
    a_file = tmp_path / "list.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="list.txt: is a file, not a folder"):
        _run(a_file, tmp_path / "data")
    with pytest.raises(InputError, match="list.txt: is a file, not a folder"):
        _run(audio_dir, a_file)
    assert not (tmp_path / "data").exists()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        _run(tmp_path / "nothing", tmp_path / "data")
    for args in ([str(a_file), str(tmp_path / "d")], [audio_dir, str(a_file)]):
        done = CliRunner().invoke(cli.extract_command, args + ["-q"])
        assert done.exit_code != 0 and "is a file" in done.output, done.output


def test_empty_class_folder_and_stray_files_are_named(tmp_path, audio_dir):
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "a.wav"))
    (source / "psy").mkdir()
    (source / "psy" / ".DS_Store").write_text("hidden")
    _link(_wav(audio_dir, "dark", 0), str(source / "loose.wav"))
    with pytest.warns(DataWarning) as caught:
        summary = _run(source, data, num_segments=1)
    messages = [str(w.message) for w in caught]
    assert any(str(source / "psy") in m and "holds no files" in m for m in messages), messages
    assert any(str(source / "loose.wav") in m and "class folder" in m for m in messages)
    assert sum(summary.extracted.values()) == 1 and list(_tracks(data)) == ["goa/a"]


def test_unicode_spaces_and_symbolic_links(tmp_path, audio_dir):
    source, data = tmp_path / "audio", tmp_path / "data"
    outside = tmp_path / "elsewhere"
    _link(_wav(audio_dir, "goa", 0), str(outside / "Goa Gil – Ørbit ☼.wav"))
    _link(_wav(audio_dir, "goa", 1), str(outside / "sub dir" / "Café 2.wav"))
    _link(_wav(audio_dir, "psy", 0), str(tmp_path / "other" / "psy track.wav"))
    (source / "Psy Trance é").mkdir(parents=True)
    os.symlink(outside, source / "goa")  # A linked class folder (with a sub-folder).
    # A linked file.
    os.symlink(tmp_path / "other" / "psy track.wav", source / "Psy Trance é" / "lié.wav")
    os.symlink(outside, outside / "sub dir" / "again")  # A link loop: not walked twice.
    summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) == 3 and not summary.failed, summary.failed
    tracks = _tracks(data)
    assert {t: _source(data, t) for t in tracks} == {
        "Psy Trance é/lié": "lié.wav", "goa/Café_2": "sub dir/Café 2.wav",
        "goa/Goa_Gil_Ørbit": "Goa Gil – Ørbit ☼.wav"}
    for files in tracks.values():
        assert files == ["part_1.npy", "part_1.png", SOURCE]
    summary = _run(source, data, num_segments=1)  # Matched again by the recorded names.
    assert sum(summary.existing.values()) == 3 and not summary.extracted


def test_unreadable_file_is_skipped_and_named(tmp_path, audio_dir):
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "a.wav"))
    shutil.copy(_wav(audio_dir, "goa", 1), source / "goa" / "locked.wav")
    os.chmod(source / "goa" / "locked.wav", 0)
    if os.access(source / "goa" / "locked.wav", os.R_OK):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): file permissions do not apply; "
                    "test_permission_denied_is_skipped_and_named simulates it")
    with pytest.warns(DataWarning, match=r"locked.wav: cannot read it \(permission denied\)"):
        summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) == 1 and len(summary.failed) == 1


def test_permission_denied_is_skipped_and_named(tmp_path, audio_dir, monkeypatch):
    """The same as above wherever the tests run (as root too): opening the file is denied."""
    source, data = tmp_path / "audio", tmp_path / "data"
    _link(_wav(audio_dir, "goa", 0), str(source / "goa" / "a.wav"))
    _link(_wav(audio_dir, "goa", 1), str(source / "goa" / "locked.wav"))

    def denying_open(path, *args, **kwargs):
        if str(path).endswith("locked.wav"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(audio, "open", denying_open, raising=False)
    with pytest.warns(DataWarning, match=r"locked.wav: cannot read it \(permission denied\)"):
        summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) == 1 and len(summary.failed) == 1
    assert list(_tracks(data)) == ["goa/a"]


# ---------------------------------------------------------------------------
# Killed mid-run (SIGKILL: no exception, no cleanup), then re-run.
# ---------------------------------------------------------------------------


def _killed_extract(source, data, point):
    env = dict(os.environ, TCLF_KILL_AT=point)
    done = subprocess.run(
        [sys.executable, "-c", "from tclf.cli import extract_command; extract_command()",
         str(source), str(data), "--jobs", "1", "-q", "--training-segments", "0"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, (done.returncode, done.stdout, done.stderr)


def test_killed_extract_leaves_whole_tracks_and_rerun_completes(tmp_path, audio_dir):
    """Killed after the 2nd track, then killed while writing the 2nd part of a track: only
    whole tracks are ever visible, and each re-run ends with every track exactly once."""
    source, data = tmp_path / "audio", tmp_path / "data"
    names = []
    for style in ("dark", "goa"):
        for index in range(2):
            _link(_wav(audio_dir, style, index), str(source / style / f"{style} {index}.wav"))
            names.append(f"{style}/{style}_{index}")

    def whole(track_files):
        return track_files == ["part_1.npy", "part_1.png", "part_2.npy", "part_2.png", SOURCE]

    _killed_extract(source, data, "extract.track_written:2")
    tracks = _tracks(data)
    assert sorted(tracks) == names[:2] and all(whole(f) for f in tracks.values()), tracks

    # Killed between the two parts of the 3rd track: the half track is only a hidden folder.
    _killed_extract(source, data, "extract.part_written:1")
    tracks = _tracks(data)
    assert sorted(tracks) == names[:2] and all(whole(f) for f in tracks.values()), tracks
    leftovers = _hidden(data)
    assert len(leftovers) == 1 and os.path.basename(leftovers[0]).startswith(extract.TMP_PREFIX)

    summary = _run(source, data)
    assert sum(summary.existing.values()) == 2 and sum(summary.extracted.values()) == 2
    tracks = _tracks(data)
    assert sorted(tracks) == names and all(whole(f) for f in tracks.values()), tracks
    assert not _hidden(data)
    assert sorted(_source(data, t) for t in tracks) == sorted(
        f"{t.split('/')[1].replace('_', ' ')}.wav" for t in names)


# ---------------------------------------------------------------------------
# A full disk.
# ---------------------------------------------------------------------------


def _disk_full_after(monkeypatch, track_id):
    """np.save fails with ENOSPC for the track ``track_id`` (in forked workers too)."""
    real_save = np.save

    def save(file, *args, **kwargs):
        if f"{os.sep}{extract.TMP_PREFIX}{track_id}-" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(extract.np, "save", save)


@pytest.mark.parametrize("jobs", [1, 2])
def test_full_disk_stops_the_run_with_one_clear_error(tmp_path, audio_dir, monkeypatch, jobs):
    source, data = tmp_path / "audio", tmp_path / "data"
    for index in range(4):
        _link(_wav(audio_dir, "goa", index), str(source / "goa" / f"t{index}.wav"))
    _disk_full_after(monkeypatch, "t2")
    with pytest.raises(RunError, match=r"cannot write .*t2: No space left on device; stopped "
                                       r"after \d of 4 tracks") as raised:
        _run(source, data, num_segments=1, jobs=jobs)
    assert "\n" not in str(raised.value)
    tracks = _tracks(data)
    assert "goa/t2" not in tracks and not _hidden(data)
    if jobs == 1:  # In order: the two before are done, the one after never started.
        assert sorted(tracks) == ["goa/t0", "goa/t1"]
    for track, files in tracks.items():  # Whatever was written is whole and readable.
        assert files == ["part_1.npy", "part_1.png", SOURCE]
        assert np.load(data / track / "part_1.npy").shape == (10, 68)
    # Space again: the re-run finishes the job.
    monkeypatch.undo()
    summary = _run(source, data, num_segments=1)
    assert sum(summary.extracted.values()) + sum(summary.existing.values()) == 4
    assert sorted(_tracks(data)) == [f"goa/t{i}" for i in range(4)]


def test_full_disk_is_one_line_from_the_command(tmp_path, audio_dir, monkeypatch):
    source, data = tmp_path / "audio", tmp_path / "data"
    for index in range(2):
        _link(_wav(audio_dir, "goa", index), str(source / "goa" / f"t{index}.wav"))
    _disk_full_after(monkeypatch, "t1")
    done = CliRunner().invoke(cli.extract_command, [str(source), str(data), "-q", "--jobs", "1",
                                                    "--segments", "1"])
    assert done.exit_code == 1
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], done.output
    assert list(_tracks(data)) == ["goa/t0"]


def test_fifo_is_never_opened(tmp_path):
    """Reading a named pipe would block forever; it is refused before any decoder sees it."""
    pipe = tmp_path / "p.wav"
    os.mkfifo(pipe)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    with pytest.raises(audio.AudioError, match="not a regular file"):
        audio.analyze_file(str(pipe))
