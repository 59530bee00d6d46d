"""`tclf-train`: one run of the two-stage schedule, written to models/vX/.

:func:`train` reads as the run goes: session (devices, precision) -> pack -> data ->
version folder -> model -> the two stages (tclf.training.schedule) -> reports -> model.h5.

A version folder is complete when it holds model.h5: that file is written last, after every
report, and models/latest.h5 is replaced only after it. A failed or interrupted run leaves
vX/ without model.h5 (its training_log.txt says why) and never touches latest.h5.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import warnings

import tensorflow as tf

from tclf import InputError, RunError, faults, storage
from tclf.data import reader
from tclf.evaluation.calibration import fit_temperature
from tclf.evaluation.evaluate import evaluate_predictions, predict_records
from tclf.model import save_model
from tclf.training import cluster as clusters
from tclf.training import layout
from tclf.training.callbacks import StallWatch
from tclf.training.checkpoints import Checkpoint
from tclf.training.config import PLACE, TrainConfig
from tclf.training.schedule import class_weights, two_stages
from tclf.training.session import Session, make_datasets, model_for
from tclf.training.versions import (RunFolder, find_resumable, private_copy,
                                    tidy_models_dir, write_report_set)

# What `--resume` may change, and what a search leaves out of best_hparams.json: where the
# run goes, never what it computes.
PLACE_OPTIONS = TrainConfig.group(PLACE)


@dataclasses.dataclass
class TrainResult:
    version_dir: str
    model_path: str
    evaluation: object  # reports.Evaluation
    stages: list
    seconds: float
    devices: str
    precision: str
    model: object = None  # The trained keras.Model.
    replicas: int = 1  # Devices the global batch was split over.
    cluster: object = None  # tclf.training.cluster.Cluster of a multi-worker run.
    fingerprint: str = ""  # weights_fingerprint of the trained model.


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run the two-stage schedule on config.records and write config.models/vX/.

    ``resume`` is the folder of an unfinished run to continue instead (see
    :func:`resume_config`, which gives the config to pass with it). Keras' global dtype
    policy is set for the run and put back after it.
    """
    cluster = clusters.from_env()
    config.validate()
    started = time.time()
    with Session(config, cluster) as session:
        if cluster is None:
            return _run(session, resume, started)
        if cluster.is_chief:
            return _in_cluster(session, resume, started)
        # A worker other than the chief trains in a private folder that nobody would take for
        # results (a resumed run: a copy of the chief's, taken before the chief goes on with
        # it, which waits for every worker in clusters.agree), and removes it at the end.
        private = tempfile.mkdtemp(prefix=f"tclf-{cluster.task_type}{cluster.task_id}-")
        try:
            if resume:
                resume = private_copy(resume, private)
            session.config = config.replace(models=private)
            return _in_cluster(session, resume, started)
        finally:
            storage.rmtree(private, ignore_errors=True)


def resume_config(models_dir: str, which: str | None = None,
                  **overrides) -> tuple[TrainConfig, str]:
    """The config and folder of the unfinished run ``which`` (vN, N or a folder; None: the
    newest) in models_dir, read from its checkpoint, with ``overrides`` of PLACE_OPTIONS.
    Other options given again with the values the run started with are fine (the same
    command with --resume added); only a change is refused."""
    if which is None and clusters.from_env():
        raise InputError("--resume in a multi-worker run (TF_CONFIG): name the run, e.g. "
                         "--resume v3, the same on every worker")
    folder = find_resumable(models_dir, which)
    checkpoint = Checkpoint.load(folder)
    config = TrainConfig().replace(**checkpoint.config)
    fixed = {name: value for name, value in overrides.items() if name not in PLACE_OPTIONS}
    given = TrainConfig().replace(**fixed)
    changed = [field.name for field in dataclasses.fields(TrainConfig)
               if field.name in fixed and getattr(given, field.name) != getattr(config, field.name)]
    if changed:
        listed = "; ".join(f"{name.replace('_', '-')}: the run has {getattr(config, name)!r}, "
                           f"given {getattr(given, name)!r}" for name in sorted(changed))
        raise InputError(f"--resume continues {folder} with the options it started with; "
                         f"these differ: {listed} (may change: --records, --gpus, "
                         f"--cpu-devices, --models-dir, --verbose/-q, --data-service, "
                         f"--cluster-timeout)")
    overrides = {name: value for name, value in overrides.items() if name in PLACE_OPTIONS}
    # The folders as found now, not as typed when the run started (another working folder).
    where = {"models": os.path.dirname(folder.rstrip("/")) or ".",
             "records": overrides.pop("records", None) or checkpoint.state.get("run", {}).get(
                 "records_path", config.records)}
    return config.replace(**{**overrides, **where}, precision=checkpoint.state["precision"]), folder


def _in_cluster(session: Session, resume: str | None, started: float) -> TrainResult:
    """:func:`_run` on a worker of a cluster: TensorFlow's errors after a lost worker as one
    line, and a common end, after the chief's writes."""
    cluster = session.cluster
    try:
        with warnings.catch_warnings():
            # Keras warns at the end of every validation pass of unknown length, which
            # tf.distribute's split of the validation batches between the workers makes it.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            result = _run(session, resume, started)
    except tf.errors.OpError as error:
        if clusters.is_lost_worker(error):
            raise clusters.lost_worker(error, cluster, "starting the run", resume=(
                f"--resume {os.path.basename(resume.rstrip('/'))}" if resume else None)
            ) from error
        raise
    # Every worker waits here until the chief has written the version folder: a worker that
    # left earlier would look dead to the others.
    try:
        clusters.barrier("tclf-train-done")
    except tf.errors.OpError as error:
        if not cluster.is_chief:
            raise clusters.lost_worker(error, cluster, "waiting for the chief's last writes",
                                       resume="--resume vN if the chief's vN has no model.h5"
                                       ) from error
        warnings.warn(f"{result.version_dir} is complete, but another worker left before "
                      f"the end: {str(error).splitlines()[0][:200]}")
    return result


def _run(session: Session, resume: str | None, started: float) -> TrainResult:
    config, cluster, strategy = session.config, session.cluster, session.strategy
    checkpoint = Checkpoint.load(resume) if resume else None
    writes = cluster is None or cluster.is_chief

    # --- Input pipeline ------------------------------------------------------------------------
    pack = session.load_pack(resume)
    if config.data_service:  # A wrong address fails now, before a folder is claimed.
        reader.check_service(config.data_service, config.data_service_timeout)
    if cluster:
        clusters.agree(cluster, _what_runs(session, resume, checkpoint), config.cluster_timeout)
    data = make_datasets(config, pack, cluster)

    # --- Version folder ------------------------------------------------------------------------
    weights = class_weights(pack.split("train").counts, pack.classes)
    if writes:  # What runs killed at their very end left: completed or removed first.
        for line in tidy_models_dir(config.models):
            print(f"note: {line}", file=sys.stderr)
    if checkpoint:
        run = RunFolder.reopen(resume, config, pack, session.devices, session.precision,
                               weights, checkpoint)
    else:
        run = RunFolder.claim(config, pack, session.devices, session.precision, weights,
                              started)
    try:
        # --- Model and the two stages ----------------------------------------------------------
        with strategy.scope():
            model = model_for(config, pack)
            with reader.naming_corrupt_shards(pack):
                run_schedule(model, data, config, run,
                             (cluster.workers, cluster.index) if cluster else None)
        evaluation = None
        if writes:
            # --- Reports -----------------------------------------------------------------------
            evaluation = calibrated_evaluation(model, config, pack)
            write_report_set(run, evaluation)
            faults.point("train.reports_written")

            # --- The model last: model.h5's presence marks the run finished. A kill after it
            # leaves the publication to a later run or --resume (versions.finish_publication).
            for name in (layout.MODEL_KERAS, layout.MODEL):
                save_model(model, run.path(name), list(pack.classes), run.record(evaluation),
                           evaluation.temperature)
                faults.point(f"train.{name.replace('.', '_')}_written")
            storage.publish(run.path(layout.MODEL), storage.join(config.models, layout.LATEST))
            faults.point("train.latest_published")
            run.complete()
    except BaseException as error:
        if cluster and isinstance(error, tf.errors.OpError) and clusters.is_lost_worker(error):
            error = clusters.lost_worker(error, cluster, resume=(
                f"--resume {run.name}" if writes else "--resume vN (the chief's run folder)"))
            run.fail(error)
            raise error from None
        run.fail(error)
        raise
    return TrainResult(run.folder if writes else None, run.path(layout.MODEL) if writes else None,
                       evaluation, run.stages, time.time() - started, session.devices,
                       session.precision, model, strategy.num_replicas_in_sync, cluster,
                       weights_fingerprint(model))


def calibrated_evaluation(model, config: TrainConfig, pack):
    """The validation metrics, with config.calibrate at the temperature fitted to the
    validation segments (tclf.evaluation.calibration): one pass over the split for both."""
    probabilities, labels, track_ids = predict_records(model, pack, "val", config.batch_size)
    temperature = fit_temperature(probabilities, labels) if config.calibrate else 1.0
    return evaluate_predictions(probabilities, labels, track_ids, list(pack.classes),
                                temperature)


def _what_runs(session: Session, resume: str | None, checkpoint) -> dict:
    """What every worker of a cluster must share: the options that shape the computation
    (and the tf.data service, whose job they share), the pack, the run resumed and its
    progress, the precision and the devices per worker."""
    config = session.config
    return {**config.without_place(), "data_service": config.data_service,
            "pack": session.pack.stamp, "precision": session.precision,
            "devices per worker": len(session.strategy.extended.worker_devices),
            "resumed run": os.path.basename(resume.rstrip("/")) if resume else None,
            "epochs done": ({name: (checkpoint.stage(name).epochs_done
                                    if checkpoint.stage(name) else 0)
                             for name in ("stage1", "stage2")} if checkpoint else None)}


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights, in order: equal on every worker of a cluster run
    (tclf-train prints it on each), and equal to that of the model.h5 it wrote."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def run_schedule(model, data, config: TrainConfig, run: RunFolder,
                 workers: tuple[int, int] | None = None) -> None:
    """tclf-train's :func:`two_stages`: progress in the run's training_progress.txt, logs in
    its logs/, the checkpoint after every epoch, and the log rewritten after stage 1."""
    callbacks = []
    if config.data_service:
        def stalled(message: str) -> None:  # From the watch's thread: the run is stuck.
            error = RunError(message)
            run.fail(error)
            print(f"Error: RunError: {message}", file=sys.stderr, flush=True)
            os._exit(1)  # The main thread waits in TensorFlow for a batch that will not come.

        callbacks.append(StallWatch(config.data_service_timeout, stalled, (
            f"no batch from the tf.data service at {config.data_service} for "
            f"{config.data_service_timeout:g} s (--data-service-timeout): its dispatcher or "
            f"workers stopped or cannot be reached; {run.resume_command()} continues the run "
            f"(with a running service, or --data-service '' to read the records here)")))
    two_stages(model, data, config, run.pack, logs_dir=run.path(layout.LOGS),
               progress_path=run.path(layout.PROGRESS), checkpoint=run.checkpoint,
               scratch=run.folder, stages=run.stages, callbacks=callbacks,
               after_stage1=run.write_log, workers=workers)
