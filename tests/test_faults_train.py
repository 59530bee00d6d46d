"""Faults in training: runs killed with SIGKILL in stage 1 and stage 2 and resumed, two runs at
once, a full disk, damaged inputs (shard, manifest, model file), and the checks of `--resume`.

The kills use tclf.faults (TCLF_KILL_AT=<point>[:n]): the process SIGKILLs itself the n-th
time it passes the point, with no chance to clean up, as a preempted machine would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tclf import InputError, RunError, cli
from tclf.training import checkpoints, session, train, versions
from tclf.data import schema
from tests.conftest import TINY_TRAINING

# Three stage-1 epochs and two stage-2 epochs, both without early stopping (patience 3 >= 3
# epochs; min = max in stage 2), so that an interrupted run and an uninterrupted one must run
# the same epochs. A higher stage-1 rate than the spec's, so that the tiny model learns.
RESUMABLE = {**TINY_TRAINING, "stage1_epochs": 3, "stage1_lr": 3e-3, "stage2_min_epochs": 2,
             "stage2_max_epochs": 2}


def _tclf_train(*args, kill_at=None, cwd=None, timeout=600):
    """tclf-train in a fresh process, killed at ``kill_at`` if given."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TCLF_KILL_AT", None)
    if kill_at:
        env["TCLF_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-c", "from tclf.cli import train_command; train_command()", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _hparams(tmp_path, values=RESUMABLE) -> str:
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(values))
    return str(path)


def _digests(folder) -> dict:
    """{relative path: sha256} of every file under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def _progress(folder) -> list[list[str]]:
    """training_progress.txt as (stage, epoch, lr) triples."""
    rows = []
    for line in open(os.path.join(folder, "training_progress.txt")).read().splitlines():
        words = line.split()
        rows.append([words[0], words[2], words[words.index("lr") + 1]])
    return rows


# ---------------------------------------------------------------------------
# Killed and resumed.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_killed_in_either_stage_resume_to_the_uninterrupted_result(records_dir, tmp_path):
    models = tmp_path / "models"
    hparams = _hparams(tmp_path)
    common = ["--records", records_dir, "--models-dir", str(models)]

    # v1: a run never interrupted, the reference; it also plays "an earlier version".
    reference = train.train(train.TrainConfig(records=records_dir, models=str(models),
                                              **RESUMABLE))
    earlier = _digests(models / "v1")
    latest = (models / "latest.h5").read_bytes()

    # v2: killed after stage 1's second epoch.
    done = _tclf_train(*common, "--hparams", hparams, kill_at="train.epoch_end:2")
    assert done.returncode == -9, done.stderr[-2000:]
    v2 = models / "v2"
    assert not (v2 / "model.h5").exists() and "--resume v2" in (v2 / "UNFINISHED").read_text()
    assert checkpoints.Checkpoint.load(str(v2)).stage("stage1").epochs_done == 2
    assert (models / "latest.h5").read_bytes() == latest and _digests(models / "v1") == earlier

    # A new run without --resume gets v3 (and says that v2 is unfinished); it is killed while
    # writing its first checkpoint, whose files state.json never names: v3 restarts at epoch 1.
    done = _tclf_train(*common, "--hparams", hparams, kill_at="train.checkpoint_files_written")
    assert done.returncode == -9 and "v2 did not finish" in done.stderr
    assert checkpoints.Checkpoint.load(str(models / "v3")).stage("stage1") is None
    assert versions.unfinished_runs(str(models)) == [str(models / "v3"), str(models / "v2")]

    # v2 resumed, and killed again after the first epoch of stage 2 (pass 1 of this process is
    # stage 1's third epoch).
    done = _tclf_train("--resume", "v2", "--models-dir", str(models), "-q",
                       kill_at="train.epoch_end:2")
    assert done.returncode == -9, done.stderr[-2000:]
    state = checkpoints.Checkpoint.load(str(v2))
    assert state.stage("stage1").finished and state.stage("stage2").epochs_done == 1
    assert (models / "latest.h5").read_bytes() == latest and _digests(models / "v1") == earlier

    # And resumed to the end by the command that started it, with --resume added.
    done = _tclf_train(*common, "--hparams", hparams, "--resume", "v2", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained" in done.stdout and str(v2) in done.stdout

    # The same epochs as the uninterrupted run, on the same learning-rate schedule (the
    # optimizer's step count was restored), and the same options.
    assert _progress(v2) == _progress(reference.version_dir)
    ref_config = json.loads(open(os.path.join(reference.version_dir, "config.json")).read())
    config = json.loads((v2 / "config.json").read_text())
    for key in [f.name for f in __import__("dataclasses").fields(train.TrainConfig)]:
        assert config[key] == ref_config[key], key
    log = (v2 / "training_log.txt").read_text()
    assert log.count("resumed:") == 2 and "stage1: 3 epochs" in log and "stage2: 2 epochs" in log
    # Accuracy within noise: the input order after a resume differs, and 6 validation
    # segments make one segment 0.17; both runs must have learnt the three styles.
    reference_accuracy = reference.evaluation.segment_accuracy
    accuracy = config["evaluation"]["segment_accuracy"]
    print(f"validation accuracy: resumed {accuracy:.3f}, uninterrupted {reference_accuracy:.3f}")
    assert abs(accuracy - reference_accuracy) <= 0.34, (accuracy, reference_accuracy)
    # Complete: model.h5 is latest.h5; no checkpoint, note or lock is left.
    assert (models / "latest.h5").read_bytes() == (v2 / "model.h5").read_bytes()
    assert not any((v2 / name).exists() for name in ("checkpoint", "UNFINISHED", ".lock"))
    assert _digests(models / "v1") == earlier
    # v3 is still unfinished and resumable; v2 no longer is.
    assert versions.unfinished_runs(str(models)) == [str(models / "v3")]
    with pytest.raises(RunError, match="has finished"):
        versions.find_resumable(str(models), "v2")


@pytest.mark.slow
def test_two_trainings_at_once_give_two_complete_versions(records_dir, tmp_path):
    from tclf.model import load_model

    models = tmp_path / "models"
    hparams = _hparams(tmp_path, {**TINY_TRAINING, "stage2_max_epochs": 1})
    args = [sys.executable, "-c", "from tclf.cli import train_command; train_command()",
            "--records", records_dir, "--models-dir", str(models), "--hparams", hparams]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(os.listdir(models)) == ["latest.h5", "v1", "v2"]
    for name in ("v1", "v2"):
        assert (models / name / "model.h5").exists() and not (models / name / "UNFINISHED").exists()
    latest = (models / "latest.h5").read_bytes()
    assert latest in ((models / "v1" / "model.h5").read_bytes(),
                      (models / "v2" / "model.h5").read_bytes())
    model, classes = load_model(str(models / "latest.h5"))
    assert classes == schema.load_manifest(records_dir)["classes"]


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_loses_nothing(trained, records_dir, tmp_path,
                                                                    monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(trained.version_dir), models)
    before = _digests(models)

    def full(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoints, "_save_arrays", full)
    done = CliRunner().invoke(cli.train_command, ["--records", records_dir, "--models-dir",
                                                  str(models), "--hparams", _hparams(tmp_path)])
    assert done.exit_code == 1
    assert done.output.strip().splitlines()[-1].startswith(
        "Error: OSError: [Errno 28] No space left on device")
    assert "Traceback" not in done.output
    assert {k: v for k, v in _digests(models).items() if not k.startswith("v2")} == before
    log = (models / "v2" / "training_log.txt").read_text().splitlines()
    assert log[-3].startswith("FAILED: OSError") and "--resume v2" in log[-1]
    assert not (models / "v2" / "model.h5").exists() and not (models / "v2" / ".lock").exists()


# ---------------------------------------------------------------------------
# Damaged inputs: one line naming the file, status 1, no traceback.
# ---------------------------------------------------------------------------


def _one_line_error(done, *fragments):
    assert done.exit_code == 1, done.output
    lines = [line for line in done.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in done.output, done.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_model_file_that_is_not_hdf5_is_one_line(records_dir, audio_dir, tmp_path):
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"this is not a model\n" * 50)
    done = CliRunner().invoke(cli.eval_command, ["--model", str(bad), "--records", records_dir])
    _one_line_error(done, str(bad), "not an HDF5 file")
    done = CliRunner().invoke(cli.predict_command, [audio_dir, "--model", str(bad)])
    _one_line_error(done, str(bad), "not an HDF5 file")


def test_records_whose_classes_differ_from_the_model_are_one_line(trained, records_dir, tmp_path):
    other = tmp_path / "records"
    shutil.copytree(records_dir, other)
    text = (other / "manifest.json").read_text()
    for old, new in zip(json.loads(text)["classes"], ["ambient", "house", "techno"]):
        text = text.replace(f'"{old}', f'"{new}')  # The class names, counts and track ids.
    (other / "manifest.json").write_text(text)
    done = CliRunner().invoke(cli.eval_command, ["--model", trained.model_path, "--records",
                                                 str(other)])
    _one_line_error(done, str(other / "manifest.json"), "differ")


def test_a_corrupted_shard_stops_training_with_one_line_naming_it(records_dir, tmp_path):
    other = tmp_path / "records"
    shutil.copytree(records_dir, other)
    shard = other / schema.load_manifest(str(other))["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # Same size: only the CRC tells.
    shard.write_bytes(bytes(data))
    done = CliRunner().invoke(cli.train_command, ["--records", str(other), "--models-dir",
                                                  str(tmp_path / "models"), "--hparams",
                                                  _hparams(tmp_path, TINY_TRAINING)])
    _one_line_error(done, str(shard), "corrupt")
    assert not (tmp_path / "models" / "latest.h5").exists()


def test_a_class_missing_from_a_split_is_an_error_or_a_loud_warning(records_dir, tmp_path):
    other = tmp_path / "records"
    shutil.copytree(records_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    first = manifest["classes"][0]
    manifest["splits"]["val"]["counts"][first] = 0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"validation split has no records of {first}"):
        session.training_pack(str(other))
    manifest["splits"]["train"]["counts"][first] = 0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=f"training split has no records of {first}"):
        session.training_pack(str(other))


# ---------------------------------------------------------------------------
# --resume: which run, which options, one process at a time.
# ---------------------------------------------------------------------------


def _unfinished(models, name, **options) -> str:
    """A fake unfinished run: a vN folder with a started checkpoint and no model.h5."""
    folder = models / name
    folder.mkdir(parents=True)
    # As if started from another working folder: --models-dir and --records typed relative.
    config = train.TrainConfig(records="r", models="elsewhere", **{**TINY_TRAINING, **options})
    checkpoints.Checkpoint(str(folder)).start(
        __import__("dataclasses").asdict(config), "mixed_bfloat16",
        {"started": 0.0, "records_path": "/data/r"})
    return str(folder)


def test_resume_finds_the_run_and_keeps_its_options(tmp_path):
    models = tmp_path / "models"
    with pytest.raises(RunError, match="no unfinished run"):
        train.resume_config(str(models))
    _unfinished(models, "v1")
    newest = _unfinished(models, "v2", seed=7)
    (models / "v3").mkdir()  # A folder without a checkpoint (e.g. an older tclf's) is no run.
    finished = _unfinished(models, "v4")
    open(os.path.join(finished, "model.h5"), "wb").close()

    config, folder = train.resume_config(str(models))
    assert folder == newest and config.seed == 7
    assert config.models == str(models) and config.records == "/data/r"
    # The precision is the one the run resolved, whatever `auto` gives on this machine.
    assert config.precision == "mixed_bfloat16"
    config, folder = train.resume_config(str(models), "1", gpus="none", verbose=2)
    assert folder == str(models / "v1") and config.verbose == 2 and config.seed == 0
    with pytest.raises(InputError, match="these differ: stage1-epochs: the run has 1, given 9"):
        train.resume_config(str(models), "v1", stage1_epochs=9)
    # The options the run started with, given again (the same command with --resume added).
    config, folder = train.resume_config(str(models), "v2", seed=7, stage1_epochs=1,
                                         weights="none", gpus="none")
    assert folder == newest and config.seed == 7 and config.gpus == "none"
    with pytest.raises(InputError, match="seed: the run has 7, given 8; weights: the run has "
                                         "'none', given 'imagenet'"):
        train.resume_config(str(models), "v2", seed=8, weights="imagenet", batch_size=8)
    with pytest.raises(RunError, match="has finished"):
        train.resume_config(str(models), "v4")
    with pytest.raises(RunError, match="no such run"):
        train.resume_config(str(models), "v9")
    with pytest.raises(RunError, match="has no checkpoint"):
        train.resume_config(str(models), "v3")


def test_resume_on_the_command_line(tmp_path):
    models = tmp_path / "models"
    runner = CliRunner()
    done = runner.invoke(cli.train_command, ["--resume", "--models-dir", str(models)])
    _one_line_error(done, "no unfinished run to resume")
    _unfinished(models, "v1")
    done = runner.invoke(cli.train_command, ["--resume", "v1", "--models-dir", str(models),
                                             "--batch-size", "4"])
    _one_line_error(done, "these differ: batch-size: the run has 8, given 4")
    hparams = _hparams(tmp_path, {"dropout": 0.1})
    done = runner.invoke(cli.train_command, ["--resume", "--hparams", hparams,
                                             "--models-dir", str(models)])
    _one_line_error(done, "these differ: dropout: the run has 0.4, given 0.1")
    # The records moved since: said as such, with the option that fixes it.
    done = runner.invoke(cli.train_command, ["--resume", "v1", "--models-dir", str(models),
                                             "--gpus", "none"])
    _one_line_error(done, "/data/r: the records", "give --records where that pack is now")
    help_text = " ".join(runner.invoke(cli.train_command, ["--help"]).output.split())
    assert "--resume [vN]" in help_text and "last completed epoch" in help_text


def test_a_run_folder_is_trained_by_one_live_process_at_a_time(tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    checkpoints.Checkpoint(str(folder)).start({}, "float32", {"started": 0.0})
    versions._lock(str(folder))
    with pytest.raises(RunError, match="is being trained by process"):
        versions._lock(str(folder))  # This process is alive.
    # A run being trained is not offered to --resume, nor named as unfinished.
    assert versions.unfinished_runs(str(tmp_path)) == []
    versions._unlock(str(folder))
    assert versions.unfinished_runs(str(tmp_path)) == [str(folder)]
    assert not (folder / ".lock").exists()
    # A lock left by a process that has died is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(f"{dead.pid}@{__import__('socket').gethostname()}")
    versions._lock(str(folder))
    assert (folder / ".lock").read_text() == versions._owner()


def test_stage2_min_may_equal_max_but_not_exceed_it():
    train.TrainConfig(stage2_min_epochs=1, stage2_max_epochs=1).validate()
    with pytest.raises(InputError, match=r"stage2_min_epochs \(3\) must not exceed "
                                         r"stage2_max_epochs \(2\)"):
        train.TrainConfig(stage2_min_epochs=3, stage2_max_epochs=2).validate()


END_OF_RUN = {**TINY_TRAINING, "stage2_random_backbone": False}  # Stage 2 skipped: quicker.
# (fault point, what the kill leaves, how it is recovered). In order: each "later run" is the
# next case's run (or the last one), which must complete the killed run's end first.
END_KILLS = [
    ("train.reports_written", "unfinished", "resume"),
    ("model.saved_staged:2", "unfinished", "resume"),  # model.h5 written, not renamed yet.
    ("train.model_h5_written", "finished", "resume"),
    ("storage.publish_staged.latest.h5", "finished", "resume"),  # latest.h5's copy not renamed.
    ("train.latest_published", "published", "later run"),
    ("train.checkpoint_removed", "published", "resume"),
    ("train.unfinished_removed", "published", "later run"),
]


def _left_behind(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if n in ("UNFINISHED", "checkpoint", ".lock") or ".tmp-" in n)


@pytest.mark.slow
def test_a_kill_at_any_step_of_the_end_of_a_run_leaves_it_resumable_or_finished(records_dir,
                                                                                tmp_path):
    models = tmp_path / "models"
    common = ["--records", records_dir, "--models-dir", str(models), "--hparams",
              _hparams(tmp_path, END_OF_RUN), "-q"]
    assert _tclf_train(*common).returncode == 0  # v1
    pending = None  # A killed run that the next run must complete.
    for number, (point, state, recovery) in enumerate(END_KILLS, start=2):
        before = (models / "latest.h5").read_bytes()
        done = _tclf_train(*common, kill_at=point)
        assert done.returncode == -9, (point, done.stderr[-2000:])
        if pending:  # This run completed the previous killed one's end before training.
            assert f"{pending} had finished" in done.stderr, done.stderr[-2000:]
            assert _left_behind(pending) == [], point
            pending = None
        folder = models / f"v{number}"
        assert (folder / "model.h5").exists() == (state != "unfinished"), point
        published = ((folder / "model.h5").exists() and (models / "latest.h5").read_bytes()
                     == (folder / "model.h5").read_bytes())
        assert published == (state == "published"), point
        assert "UNFINISHED" in _left_behind(folder) or state == "published", point
        if recovery == "later run":
            pending = folder
            continue
        done = _tclf_train(*common, "--resume", f"v{number}")
        assert done.returncode == 0, (point, done.stderr[-2000:])
        if state == "unfinished":
            assert "trained" in done.stdout, point
        else:
            assert "had finished" in done.stdout and "latest.h5 is its model.h5" in done.stdout
        assert _left_behind(folder) == [], point
        assert (models / "latest.h5").read_bytes() == (folder / "model.h5").read_bytes(), point
        assert before != (models / "latest.h5").read_bytes() or state == "published", point
        assert not [n for n in os.listdir(models) if ".tmp-" in n], point
    done = _tclf_train(*common)  # The last later run.
    assert done.returncode == 0 and f"{pending} had finished" in done.stderr
    assert _left_behind(pending) == [] and not [n for n in os.listdir(models) if ".tmp-" in n]
    last = models / f"v{len(END_KILLS) + 2}"
    assert (models / "latest.h5").read_bytes() == (last / "model.h5").read_bytes()
    assert versions.unfinished_runs(str(models)) == [] == versions.unpublished_runs(str(models))
