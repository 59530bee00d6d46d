"""tclf-tune: the search space, a local search (resume, SIGKILL, failed trials), tclf-train on
its result, Hyperband refused, and a distributed search (a chief and two workers on loopback)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest

from tclf import InputError, RunError, storage
from tclf.tune import results, search
from tclf.tune import space as tune_space
from tests.conftest import TINY_TRAINING

# Every trial tiny (TINY_TRAINING's sizes are options, so they are fixed, not searched); the
# search varies the learning rates and the dropout only. The first trial is the baseline.
TRIAL_OPTIONS = {k: v for k, v in TINY_TRAINING.items() if k not in ("gpus", "verbose")}
SPACE = {"stage1_warmup_epochs": 1.0, "stage2_warmup_epochs": 1.0}


def _tclf(command: str, *args, env=None, timeout=600, popen=False):
    """A tclf command in a fresh process (TCLF_KILL_AT only if ``env`` sets it)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    environment.pop("TCLF_KILL_AT", None)
    environment.update(env or {})
    argv = [sys.executable, "-c", f"from tclf.cli import {command}; {command}()", *args]
    if popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=environment)
    return subprocess.run(argv, capture_output=True, text=True, env=environment,
                          timeout=timeout)


def _files(tmp_path):
    hparams, space = tmp_path / "trial.json", tmp_path / "space.json"
    hparams.write_text(json.dumps(TRIAL_OPTIONS))
    space.write_text(json.dumps(SPACE))
    return str(hparams), str(space)


def _search_args(records_dir, out, hparams, space, trials=2):
    return ["--records", records_dir, "--out", out, "--hparams", hparams, "--space", space,
            "--gpus", "none", "--max-trials", str(trials), "-q"]


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "trials.csv")) as file:
        return list(csv.DictReader(file))


def _trial_record(out, trial_id) -> dict:
    with open(os.path.join(out, results.PROJECT, f"trial_{trial_id}", results.TRIAL_FILE)) as file:
        return json.load(file)


# --- The space ---------------------------------------------------------------------------


def test_space_defaults_are_the_training_defaults():
    from tclf.training.train import TrainConfig

    space = tune_space.search_space()
    assert set(space) == set(tune_space.SPACE)
    for name, spec in space.items():
        assert spec["default"] == getattr(TrainConfig(), name), name


def test_space_file_narrows_fixes_and_drops_given_options():
    space = tune_space.search_space({"dropout": 0.25, "gru_units": [64, 32],
                               "stage1_lr": {"min": 2e-4, "max": 5e-4}},
                              fixed={"image_units", "stage2_lr"})
    assert space["dropout"] == {"values": [0.25], "default": 0.25}
    assert space["gru_units"] == {"values": [32, 64], "default": 64}  # Nearest to 128.
    assert space["stage1_lr"] == {"min": 2e-4, "max": 5e-4, "log": True, "default": 2e-4}
    assert "image_units" not in space and "stage2_lr" not in space


def test_stepped_floats_reach_their_max_without_binary_noise():
    import keras_tuner

    space = tune_space.search_space()
    hp = keras_tuner.HyperParameters()
    tune_space.declare(hp, {"dropout": space["dropout"]})
    values = sorted({tune_space.tidy(hp.space[0].random_sample(seed)) for seed in range(400)})
    assert values[0] == 0.1 and values[-1] == 0.6 and len(values) == 11
    assert all(v == round(v, 2) for v in values)
    assert tune_space.search_space({"stage2_layers": {"min": 0, "max": 15}})["stage2_layers"] == {
        "min": 0, "max": 15, "step": 10, "default": 10}  # 20 is off the grid 0, 10.


@pytest.mark.parametrize("bad, words", [
    ({"batch_size": 8}, "not searched"),
    ({"gru_units": [64.5]}, "not an integer"),
    ({"dropout": {"min": 0.5, "max": 0.1}}, "min 0.5 > max 0.1"),
    ({"stage1_lr": {"min": 0.0, "max": 1e-3}}, "learning rates must be > 0"),
    ({"dropout": [0.2, 1.0]}, r"dropout must be in \[0, 1\)"),
    ({"image_units": {"min": 32}}, "needs both min and max"),
    ({"dropout": {"min": 0.1, "max": 0.5, "step": 0.1, "log": True}}, "exclude each other"),
    ({"stage2_layers": {"min": 0, "max": 40, "step": 2.5}}, "positive integer"),
    ({"dropout": {"low": 0.1}}, "expected a value"),
    ({"dropout": "high"}, "not a number"),
])
def test_bad_space_files_are_refused_by_name(bad, words):
    with pytest.raises(InputError, match=words):
        tune_space.search_space(bad)


# --- Refusals (in process) ------------------------------------------------------------------


def test_hyperband_is_refused_with_a_reason(records_dir, tmp_path):
    from click.testing import CliRunner

    from tclf import cli

    result = CliRunner().invoke(cli.tune_command, ["--records", records_dir, "--out",
                                                   str(tmp_path / "t"), "--tuner", "hyperband"])
    assert result.exit_code == 1
    assert "--tuner hyperband is refused" in result.output and "two stages" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "t").exists()


# --- A local search --------------------------------------------------------------------------


@pytest.mark.slow
def test_search_killed_mid_trial_resumes_repeats_nothing_and_trains_with_the_best(
        records_dir, tmp_path):
    hparams, space = _files(tmp_path)
    out = str(tmp_path / "search")
    args = _search_args(records_dir, out, hparams, space)

    # Killed in the second trial, after its stage 1.
    killed = _tclf("tune_command", *args, env={"TCLF_KILL_AT": "tune.stage1_done:2"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "trial 0  completed" in killed.stdout
    first = _trial_record(out, "0")
    assert first["status"] == "COMPLETED"
    assert _trial_record(out, "1")["status"] == "RUNNING"
    # The killed search's lock is left, naming a dead process: the next search takes it over.
    owner = open(os.path.join(out, ".lock")).read()
    assert owner.endswith(f"@{socket.gethostname()}")
    assert not storage.process_alive(int(owner.split("@")[0]))

    # The same command: trial 1 runs again, trial 0 does not.
    resumed = _tclf("tune_command", *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 to run again (1)" in resumed.stdout
    assert "trial 1  completed" in resumed.stdout and "trial 0  completed" not in resumed.stdout
    assert _trial_record(out, "0") == first
    assert not os.path.exists(os.path.join(out, ".lock"))  # Released at the end.
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["0", "1"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    # Best first; the first trial is the baseline (tclf-train's defaults).
    assert float(rows[0]["score"]) >= float(rows[1]["score"])
    baseline = next(r for r in rows if r["trial"] == "0")
    assert float(baseline["dropout"]) == 0.4 and float(baseline["stage1_lr"]) == 1e-4
    other = next(r for r in rows if r["trial"] == "1")
    assert (other["dropout"], other["stage1_lr"]) != (baseline["dropout"], baseline["stage1_lr"])
    # TensorBoard: each trial's runs, and its hyperparameters for the HParams view.
    import tensorflow as tf

    assert set(os.listdir(os.path.join(out, "logs"))) == {"0", "1"}
    root = os.path.join(out, "logs", "1")
    assert {"train", "validation"} <= set(os.listdir(root))
    plugins = {value.metadata.plugin_data.plugin_name
               for name in os.listdir(root) if name.startswith("events")
               for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name))
               for value in event.summary.value}
    assert "hparams" in plugins

    # Once more: nothing left to run.
    again = _tclf("tune_command", *args)
    assert again.returncode == 0 and "completed" not in again.stdout
    assert "2 trial(s) on record (0 run now)" in again.stdout
    assert _trial_record(out, "0") == first

    # tclf-train takes best_hparams.json as it is, and records its values.
    with open(os.path.join(out, "best_hparams.json")) as file:
        best = json.load(file)
    assert best["dropout"] == float(rows[0]["dropout"])
    assert best["image_size"] == TRIAL_OPTIONS["image_size"] and "records" not in best
    # Where the search ran is not a hyperparameter: no place option in the file.
    assert not {"data_service", "cluster_timeout", "gpus", "models"} & set(best)
    models = str(tmp_path / "models")
    trained = _tclf("train_command", "--hparams", os.path.join(out, "best_hparams.json"),
                    "--records", records_dir, "--models-dir", models, "--gpus", "none")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    with open(os.path.join(models, "v1", "training_log.txt")) as file:
        log = file.read()
    assert f"  dropout: {best['dropout']}\n" in log
    assert f"  stage1_lr: {best['stage1_lr']}\n" in log


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_search_goes_on(records_dir, tmp_path,
                                                            monkeypatch):
    from tclf.training.train import TrainConfig

    # EfficientNetB0 has fewer than 1000 layers to unfreeze: the second trial fails in stage 2.
    # (The search refuses such a range at its start; told of more layers, it lets it through.)
    monkeypatch.setattr(search, "backbone_layer_count", lambda backbone: 10_000)
    base = TrainConfig(records=records_dir, **TINY_TRAINING)
    space = tune_space.search_space({"stage2_layers": [20, 1000], **SPACE, "dropout": 0.4,
                               "stage1_lr": 1e-4, "stage2_lr": 1e-5},
                              fixed=set(TRIAL_OPTIONS) - {"stage2_layers"}, base=base)
    lines = []
    result = search.tune(base, str(tmp_path / "s"), max_trials=2, space=space, progress=False,
                       echo=lines.append)
    statuses = {r["trial"]: r["status"] for r in result.rows}
    assert statuses == {"0": "COMPLETED", "1": "FAILED"}
    failed = next(r for r in result.rows if r["trial"] == "1")
    assert "can unfreeze 0-" in failed["reason"] and "got 1000" in failed["reason"]
    assert any(line.startswith("trial 1  failed: InputError: can unfreeze") for line in lines)
    assert result.rows[0]["trial"] == "0"  # Completed trials first.


# --- Distributed ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(records_dir, tmp_path, trials, worker_env=None, chief_args=(),
                 names=("tuner1", "tuner2")):
    hparams, space = _files(tmp_path)
    out = str(tmp_path / "search")
    args = _search_args(records_dir, out, hparams, space, trials=trials)
    port = str(_free_port())
    base = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port,
            "TCLF_TUNE_HEARTBEAT_SECONDS": "1"}
    chief = _tclf("tune_command", *args, *chief_args, env={**base, "KERASTUNER_TUNER_ID": "chief"},
                  popen=True)
    workers = [_tclf("tune_command", *args,
                     env={**base, "KERASTUNER_TUNER_ID": name, **(worker_env or {}).get(name, {})},
                     popen=True)
               for name in names]
    outputs = {}
    for name, process in (*zip(names, workers), ("chief", chief)):
        try:
            outputs[name] = process.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for p in (chief, *workers):
                p.kill()
            raise
        outputs[name + " rc"] = process.returncode
    return out, outputs


@pytest.mark.slow
def test_a_chief_and_two_workers_run_each_trial_once(records_dir, tmp_path):
    out, outputs = _distributed(records_dir, tmp_path, trials=3)
    assert outputs["chief rc"] == 0, outputs
    assert outputs["tuner1 rc"] == 0 and outputs["tuner2 rc"] == 0, outputs
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    # Each trial ran exactly once: one "completed" line among the workers' outputs.
    ran = [line.split()[1] for name in ("tuner1", "tuner2")
           for line in outputs[name].splitlines() if line.startswith("trial ")]
    assert sorted(ran) == ["0", "1", "2"], outputs
    assert {_trial_record(out, t)["tuner_id"] for t in ran} <= {"tuner1", "tuner2"}
    assert "on 127.0.0.1:" in outputs["chief"]
    assert os.path.exists(os.path.join(out, "best_hparams.json"))


@pytest.mark.slow
def test_the_chief_gives_a_dead_workers_trial_to_another(records_dir, tmp_path):
    out, outputs = _distributed(
        records_dir, tmp_path, trials=3, chief_args=("--worker-timeout", "5"),
        worker_env={"tuner1": {"TCLF_KILL_AT": "tune.stage1_done:1"}})
    assert outputs["tuner1 rc"] == -9
    assert outputs["chief rc"] == 0 and outputs["tuner2 rc"] == 0, outputs
    assert "worker tuner1 gave no heartbeat for 5 s; given up; its trial" in outputs["chief"]
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    assert {_trial_record(out, r["trial"])["tuner_id"] for r in rows} == {"tuner2"}


@pytest.mark.slow
def test_a_chief_left_without_workers_stops_and_a_restart_finishes_the_search(
        records_dir, tmp_path):
    # The only worker dies in the second trial: the chief gives it up after 5 s and, with no
    # worker heard from for 5 s more, exits with a reason.
    out, outputs = _distributed(
        records_dir, tmp_path, trials=2, chief_args=("--worker-timeout", "5"),
        worker_env={"tuner1": {"TCLF_KILL_AT": "tune.stage1_done:2"}}, names=("tuner1",))
    assert outputs["tuner1 rc"] == -9
    assert outputs["chief rc"] == 1, outputs
    assert "its trial 1 goes back to the queue" in outputs["chief"]
    assert "no worker heard from for 5 s" in outputs["chief"]
    assert "Traceback" not in outputs["chief"]
    first = _trial_record(out, "0")
    # Started again, chief and worker finish the search: trial 1 runs, trial 0 does not.
    out, outputs = _distributed(records_dir, tmp_path, trials=2, names=("tuner1",))
    assert outputs["chief rc"] == 0 and outputs["tuner1 rc"] == 0, outputs
    assert [line.split()[1] for line in outputs["tuner1"].splitlines()
            if line.startswith("trial ")] == ["1"]
    assert _trial_record(out, "0") == first
    assert all(r["status"] == "COMPLETED" for r in _rows(out)) and len(_rows(out)) == 2


def test_a_search_folder_is_owned_by_one_live_search(records_dir, tmp_path):
    """A second search into the --out of a live one is refused, naming it; nothing of the
    first's is touched, not even with --overwrite. A file as --out is one line too."""
    out = tmp_path / "search"
    out.mkdir()
    (out / "trials.csv").write_text("the first search's\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # A live process of this host holds the folder.
        (out / ".lock").write_text(f"{sleeper.pid}@{socket.gethostname()}")
        base = search.TrainConfig(records=records_dir, **TINY_TRAINING)
        for overwrite in (False, True):
            with pytest.raises(RunError, match=f"is being searched by process {sleeper.pid}@"):
                search.tune(base, str(out), max_trials=1, overwrite=overwrite, progress=False)
        assert (out / "trials.csv").read_text() == "the first search's\n"
        assert (out / ".lock").read_text().startswith(f"{sleeper.pid}@")
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / "a-file").write_text("")
    done = _tclf("tune_command", "--records", records_dir, "--out", str(tmp_path / "a-file"))
    assert done.returncode == 1 and "is a file; give a folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_option_given_twice_says_which_value_wins():
    from tclf import DataWarning

    base = search.TrainConfig(dropout=0.3)
    with pytest.warns(DataWarning, match=r"--space: dropout is also given as an option "
                                         r"\(dropout 0.3\).*entry 0.2 is ignored"):
        space = tune_space.search_space({"dropout": 0.2, "stage1_lr": [1e-4, 3e-4]},
                                  fixed={"dropout"}, base=base)
    assert "dropout" not in space and "stage1_lr" in space


SHARED_STAGE1 = """
import sys, tempfile, keras
from tclf.training.config import TrainConfig, TINY
from tclf.training.session import Session
config = TrainConfig(records=sys.argv[1], **{**TINY, "cpu_devices": 2, "gpus": "none",
                                             "precision": "float32", "verbose": 0})
with Session(config) as session:
    session.load_pack()
    with session.shared_stage1(tempfile.mkdtemp(), False) as (weights, outputs):
        keras.backend.clear_session()  # What Keras Tuner does before every trial.
        print("records", outputs.train.records)
print("done")
"""


def test_the_shared_stage1_pass_survives_the_trials_clearing_the_session(records_dir):
    """A search on several devices (MirroredStrategy) keeps the backbone outputs while its
    trials clear Keras' session: the strategy's scope must not stay open around them."""
    done = subprocess.run([sys.executable, "-c", SHARED_STAGE1, records_dir],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "done" and "records" in done.stdout
