"""Multi-worker training (TF_CONFIG, MultiWorkerMirroredStrategy) and the tf.data service.

The slow tests start real worker processes on loopback ports: two tiny `tclf-train` runs
that must train in step, write one version folder (the chief's) and survive a killed
worker only by failing clearly and resuming.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tclf import InputError
from tclf.training import cluster as clusters
from tests.conftest import TINY_TRAINING

TRAIN = [sys.executable, "-c", "from tclf.cli import train_command; train_command()"]


def _tf_config(ports, index, job="worker"):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": job, "index": index}})


# --- TF_CONFIG ------------------------------------------------------------------------------


def test_tf_config_read_without_tensorflow():
    assert clusters.from_env({}) is None
    one = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                                    "task": {"type": "worker", "index": 0}})}
    assert clusters.from_env(one) is None  # One task: not a cluster.
    two = clusters.from_env({"TF_CONFIG": _tf_config([1, 2], 1)})
    assert (two.workers, two.index, two.is_chief, two.name) == (2, 1, False, "worker 1")
    assert clusters.from_env({"TF_CONFIG": _tf_config([1, 2], 0)}).is_chief
    with_chief = {"cluster": {"chief": ["c:1"], "worker": ["a:1", "b:1"]},
                  "task": {"type": "worker", "index": 0}}
    found = clusters.from_env({"TF_CONFIG": json.dumps(with_chief)})
    assert (found.workers, found.index, found.is_chief) == (3, 1, False)
    with_chief["task"] = {"type": "chief", "index": 0}
    assert clusters.from_env({"TF_CONFIG": json.dumps(with_chief)}).is_chief


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not a valid cluster"),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                 "task": {"type": "worker", "index": 0}}), "'ps'"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                 "task": {"type": "worker", "index": 2}}), "not in the cluster"),
    (json.dumps({"cluster": {"chief": ["a:1", "b:1"]},
                 "task": {"type": "chief", "index": 0}}), "at most one"),
])
def test_bad_tf_config_refused_in_one_line(raw, words):
    with pytest.raises(InputError, match=re.escape(words)):
        clusters.from_env({"TF_CONFIG": raw})


def test_resume_in_a_cluster_needs_the_run_named(monkeypatch, tmp_path):
    from tclf.training import train

    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 0))
    with pytest.raises(InputError, match="name the run"):
        train.resume_config(str(tmp_path))


def test_tune_refuses_a_cluster(monkeypatch):
    from tclf.training import train
    from tclf.tune import search as tune

    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 0))
    with pytest.raises(InputError, match="does not train across a TF_CONFIG cluster"):
        tune._prepare(train.TrainConfig(), False, None)


def test_lost_worker_message_names_the_dead_task():
    import tensorflow as tf

    error = tf.errors.UnavailableError(None, None, (
        "{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: Error "
        "reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending "
        "heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed."))
    me = clusters.from_env({"TF_CONFIG": _tf_config([1, 2], 0)})
    assert clusters.is_lost_worker(error)
    message = str(clusters.lost_worker(error, me, resume="--resume v3"))
    assert "worker 1 stopped" in message and "--resume v3" in message
    assert "{{" not in message and "\n" not in message
    assert not clusters.is_lost_worker(tf.errors.InvalidArgumentError(None, None, "shape"))
    # Three workers: worker 1 hears from worker 0 that worker 2 died; only 2 is blamed.
    relayed = tf.errors.UnavailableError(None, None, (
        "Error reported from /job:worker/task:0: The following tasks are unhealthy (stopped "
        "sending heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed."))
    three = clusters.from_env({"TF_CONFIG": _tf_config([1, 2, 3], 1)})
    message = str(clusters.lost_worker(relayed, three))
    assert "worker 2 stopped" in message and "worker 0" not in message
    starting = str(clusters.lost_worker(relayed, three, "starting", resume=None))
    assert "--resume" not in starting


# --- The reader's split between workers --------------------------------------------------------


def _records(dataset):
    """Every record of a dataset of (inputs, label, track_id), as sortable bytes."""
    return sorted(inputs["features"].numpy()[i].tobytes() + track.numpy()[i]
                  for inputs, _, track in dataset for i in range(len(track.numpy())))


def test_training_records_split_between_workers_by_shard_file(records_dir):
    from tclf.data import reader

    def read(workers):
        return _records(reader.make_dataset(records_dir, "train", 4, training=True, seed=0,
                                          include_track_id=True, image_size=32,
                                          workers=workers))

    everything = read(None)
    first, second = read((2, 0)), read((2, 1))
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == everything
    with pytest.raises(InputError, match="re-pack with --min-shards 3"):
        read((3, 0))


def test_data_service_serves_every_record_once(records_dir):
    import tensorflow as tf

    from tclf.data import reader

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
               for _ in range(2)]
    served = _records(reader.make_dataset(records_dir, "val", 4, include_track_id=True,
                                        image_size=32, data_service=address))
    local = _records(reader.make_dataset(records_dir, "val", 4, include_track_id=True,
                                       image_size=32))
    assert served == local
    del workers, dispatcher
    with pytest.raises(InputError, match="host:port"):
        reader.service_address("no-port")


# --- Two worker processes -------------------------------------------------------------------


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(tmp_path, args, ports, env_of=lambda index: {}, indices=None,
           extra_of=lambda index: []):
    """A `tclf-train` process for each worker of a cluster on ``ports`` (or those of
    ``indices``), worker i with TF_CONFIG task i; a private TMPDIR shared by all, to see what
    the workers leave behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    processes = []
    for index in range(len(ports)) if indices is None else indices:
        env = {**os.environ, "TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(scratch),
               **env_of(index)}
        processes.append(subprocess.Popen([*TRAIN, *args, *extra_of(index)], env=env,
                                          cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    return processes


def _finish(processes, timeout=400):
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


def _options(records_dir, models):
    hparams = {k: v for k, v in TINY_TRAINING.items() if k != "verbose"}
    flag = lambda name: f"--{name.replace('_', '-')}"  # noqa: E731
    return ["--records", records_dir, "--models-dir", str(models), "-q",
            *[a for name, value in hparams.items()
              for a in ([flag(name) if value else f"--no-{flag(name)[2:]}"]
                        if isinstance(value, bool) else [flag(name), str(value)])]]


def _fingerprint(output: str) -> str:
    found = re.findall(r"weights ([0-9a-f]{16})", output)
    assert len(found) == 1, output
    return found[0]


def _saved_fingerprint(path):
    from tclf import model as tclf_model
    from tclf.training import train

    model, _ = tclf_model.load_model(path)
    return train.weights_fingerprint(model)


@pytest.mark.slow
def test_two_workers_train_in_step_and_only_the_chief_writes(records_dir, tmp_path):
    models = tmp_path / "models"
    results = _finish(_start(tmp_path, _options(records_dir, models), _free_ports(2)))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    (_, chief, _), (_, worker, _) = results
    assert "trained" in chief and str(models / "v1") in chief
    assert "worker 1: trained" in worker and "the chief wrote the version folder" in worker
    # The weights at the end are the same on both workers, and those of the model saved.
    assert _fingerprint(chief) == _fingerprint(worker)
    assert _saved_fingerprint(str(models / "v1" / "model.h5")) == _fingerprint(chief)
    # Exactly one version folder, complete; nothing else in the models folder, and nothing
    # left in the workers' temporary folder.
    assert sorted(os.listdir(models)) == ["latest.h5", "v1"]
    assert {"model.h5", "report.txt", "training_log.txt"} <= set(os.listdir(models / "v1"))
    assert not (models / "v1" / "UNFINISHED").exists()
    assert "2 workers on the CPU, MultiWorkerMirroredStrategy" in (
        models / "v1" / "training_log.txt").read_text()
    assert [n for n in os.listdir(tmp_path / "tmp") if n.startswith("tclf")] == []


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_clearly_and_resume_finishes_it(records_dir, tmp_path):
    models = tmp_path / "models"
    options = _options(records_dir, models) + ["--cluster-timeout", "120"]
    started = time.time()
    # Worker 1 dies (SIGKILL) at the end of its second epoch; the chief must notice.
    processes = _start(tmp_path, options, _free_ports(2),
                       lambda i: {"TCLF_KILL_AT": "train.epoch_end:2"} if i == 1 else {})
    (chief_code, _, chief_err), (worker_code, _, _) = _finish(processes)
    assert worker_code == -9
    assert chief_code == 1, chief_err[-3000:]
    assert time.time() - started < 240
    last = chief_err.strip().splitlines()[-1]
    assert last.startswith("Error: RunError: the cluster failed while training: worker 1 "
                           "stopped"), last
    assert "--resume v1" in last
    # No version folder looks complete; latest.h5 was never written.
    assert sorted(os.listdir(models)) == ["v1"]
    assert not (models / "v1" / "model.h5").exists()
    assert (models / "v1" / "UNFINISHED").exists()
    assert "FAILED: RunError: the cluster failed" in (models / "v1" / "training_log.txt").read_text()
    # Both workers started again with --resume v1 finish the run, in step.
    results = _finish(_start(tmp_path, ["--models-dir", str(models), "-q", "--resume", "v1"],
                             _free_ports(2)))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    assert _fingerprint(results[0][1]) == _fingerprint(results[1][1])
    assert (models / "v1" / "model.h5").exists() and (models / "latest.h5").exists()
    progress = (models / "v1" / "training_progress.txt").read_text()
    assert progress.count("stage1 epoch   1") == 1  # Continued, not started over.


@pytest.mark.slow
def test_workers_started_differently_are_refused(records_dir, tmp_path):
    models = tmp_path / "models"
    results = _finish(_start(tmp_path, _options(records_dir, models), _free_ports(2),
                             extra_of=lambda i: ["--seed", "1"] if i == 1 else []))
    for code, _, err in results:
        assert code == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert "not started alike" in last and ("seed: 1 vs 0" in last
                                                or "seed: 0 vs 1" in last), last
    assert not models.exists()  # Refused before the chief claimed a version folder.


@pytest.mark.slow
def test_a_worker_that_never_comes_ends_the_wait(records_dir, tmp_path):
    ports = _free_ports(2)
    started = time.time()
    # Worker 0 alone, in a cluster of two.
    (process,) = _start(tmp_path, _options(records_dir, tmp_path / "models")
                        + ["--cluster-timeout", "5"], ports, indices=[0])
    code, _, err = _finish([process], timeout=120)[0]
    assert code != 0
    assert "did not come together within 5 s" in err and f"localhost:{ports[0]}" in err
    assert time.time() - started < 90
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_keras_still_needs_the_multi_worker_patch(records_dir, tmp_path):
    """Keras 3.15 fails in multi-worker fit without tclf.training.compat.patch_keras
    (keras-team/keras#20585). When this test fails, Keras is fixed: drop the patch."""
    results = _finish(_start(tmp_path, _options(records_dir, tmp_path / "models"),
                             _free_ports(2), lambda i: {"TCLF_KERAS_PATCH": "0",
                                                        "TCLF_DEBUG": "1"}))
    assert all(code != 0 for code, _, _ in results)
    errors = " ".join(err for _, _, err in results)
    assert ("PerReplica" in errors or "Invalid reduction dimension 0" in errors), errors[-3000:]


# --- tf.data service ---------------------------------------------------------------------------


@pytest.mark.slow
def test_train_reads_through_a_data_service(records_dir, tmp_path):
    import tensorflow as tf

    from tclf.training import train

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
               for _ in range(2)]
    result = train.train(train.TrainConfig(records=records_dir, models=str(tmp_path / "m"),
                                           data_service=address,
                                           **{**TINY_TRAINING, "stage1_cache": False}))
    assert os.path.exists(os.path.join(result.version_dir, "model.h5"))
    assert f"data_service: {address}" in open(
        os.path.join(result.version_dir, "training_log.txt")).read()
    # The training dataset the run reads is the service's (validation stays local).
    config = train.TrainConfig(records=records_dir, data_service=address, **TINY_TRAINING)
    chains = [[], []]
    from tclf.data.schema import Pack
    from tclf.training import session

    for chain, dataset in zip(chains, session.make_datasets(config, Pack.load(records_dir))):
        while dataset is not None:
            chain.append(type(dataset).__name__)
            dataset = getattr(dataset, "_input_dataset", None)
    assert any("DataService" in name for name in chains[0]), chains[0]
    assert not any("DataService" in name for name in chains[1]), chains[1]
    del workers, dispatcher


def test_data_service_command_help_and_errors():
    from click.testing import CliRunner

    from tclf import cli

    runner = CliRunner()
    for args in (["--help"], ["dispatcher", "--help"], ["worker", "--help"]):
        done = runner.invoke(cli.data_service_command, args)
        assert done.exit_code == 0 and "Usage:" in done.output
    done = runner.invoke(cli.data_service_command, ["worker", "--dispatcher", "nohost"])
    assert done.exit_code == 1
    assert done.output.strip().splitlines() == [
        "Error: InputError: --data-service 'nohost': expected the dispatcher's host:port, "
        "e.g. grpc://10.0.0.5:5050"]


# --- Bounded waits and one-line errors (the service, ports, TF_CONFIG) -------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _tclf(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tclf", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                                **(env or {})})


def _one_line(done, *words):
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_nothing_at_the_data_service_address_is_one_line_at_once(records_dir, tmp_path):
    port = _free_port()
    started = time.monotonic()
    done = _tclf("train", "--records", records_dir, "--models-dir", str(tmp_path / "m"),
                 "--data-service", f"127.0.0.1:{port}", "--data-service-timeout", "3", "-q")
    _one_line(done, f"--data-service 127.0.0.1:{port}", "no tf.data service dispatcher",
              "within 3 s")
    assert time.monotonic() - started < 120 and not (tmp_path / "m").exists()
    done = _tclf("data-service", "worker", "--dispatcher", f"127.0.0.1:{port}", "--timeout", "2")
    _one_line(done, "no tf.data service dispatcher answers there within 2 s")


def test_ports_in_use_and_a_string_worker_list_are_one_line(records_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line(_tclf("data-service", "dispatcher", "--port", str(port)),
                  f"port {port} is in use")
        # Two workers given the same index: the second finds its port taken.
        env = {"TF_CONFIG": _tf_config([port, _free_port()], 0)}
        _one_line(_tclf("train", "--records", records_dir, "--models-dir", str(tmp_path / "m"),
                        "--gpus", "none", env=env),
                  f"localhost:{port} has its port in use", "same type and index")
    env = {"TF_CONFIG": json.dumps({"cluster": {"worker": "a:1,b:2"},
                                    "task": {"type": "worker", "index": 0}})}
    _one_line(_tclf("train", "--records", records_dir, env=env),
              "the 'worker' job must be a list")


@pytest.mark.slow
def test_a_dispatcher_killed_mid_training_fails_the_run_in_bounded_time_and_it_resumes(
        records_dir, tmp_path):
    from tclf.training import versions

    port, models = _free_port(), tmp_path / "models"
    service = [subprocess.Popen([sys.executable, "-m", "tclf", "data-service", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
               for args in (["dispatcher", "--port", str(port)],
                            ["worker", "--dispatcher", f"localhost:{port}"])]
    hparams = tmp_path / "tiny.json"
    hparams.write_text(json.dumps({**TINY_TRAINING, "stage1_cache": False, "stage1_epochs": 3,
                                   "gpus": "none"}))
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tclf", "train", "--records", records_dir, "--models-dir",
         str(models), "--hparams", str(hparams), "--data-service", f"localhost:{port}",
         "--data-service-timeout", "20", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        progress = models / "v1" / "training_progress.txt"
        deadline = time.monotonic() + 240
        while not (progress.exists() and progress.read_text().strip()):
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()
            time.sleep(0.5)
        service[0].kill()  # The dispatcher, after stage 1's first epoch.
        killed = time.monotonic()
        _, stderr = trainer.communicate(timeout=240)
    finally:
        for process in (*service, trainer):
            process.kill()
            process.wait()
    assert trainer.returncode == 1, stderr[-3000:]
    assert time.monotonic() - killed < 200
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("Error: RunError: no batch from the tf.data service at "
                                f"localhost:{port} for 20 s"), stderr[-3000:]
    log = (models / "v1" / "training_log.txt").read_text()
    assert "FAILED: RunError: no batch from the tf.data service" in log
    assert not (models / "v1" / ".lock").exists()
    assert versions.unfinished_runs(str(models)) == [str(models / "v1")]
    # Resumed without the service: it reads the records itself, and finishes.
    done = _tclf("train", "--resume", "v1", "--models-dir", str(models), "--data-service", "",
                 "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (models / "v1" / "model.h5").exists() and not (models / "v1" / "UNFINISHED").exists()
