"""`tclf-tune`: a Keras Tuner search around the fixed two-stage schedule.

Each trial is a tclf-train run without a version folder (tclf.tune.hypermodel); the
hyperparameters have TrainConfig's names, so DIR/best_hparams.json is a `tclf-train
--hparams` file as it is. Search state is Keras Tuner's own, in DIR/search/: the same command
run again resumes, and a trial that was running when its process died runs again. A
distributed search adds a chief and heartbeats (tclf.tune.chief).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time

import tensorflow as tf

from tclf import InputError, storage
from tclf.data.schema import EFFICIENTNET, Pack
from tclf.model import backbone_layer_count
from tclf.training.cluster import from_env
from tclf.training.config import TrainConfig
from tclf.training.session import Session
from tclf.training.versions import lock_folder, unlock_folder
from tclf.tune.chief import HEARTBEAT_SECONDS, failures_error, heartbeat, serve, wait_when_idle
from tclf.tune.hypermodel import Shared, TclfHyperModel
from tclf.tune.results import PROJECT, TuneResult, write_results
from tclf.tune.space import OBJECTIVES, TUNERS, for_backbone, search_space
from tclf.tune.tuner import make_tuner


def role() -> tuple[str, str]:
    """(local | chief | worker, tuner id) from Keras Tuner's environment variables."""
    if not os.environ.get("KERASTUNER_ORACLE_IP"):
        return "local", "tuner0"
    missing = [n for n in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")
               if not os.environ.get(n)]
    if missing:
        raise InputError(f"distributed search: KERASTUNER_ORACLE_IP is set but "
                         f"{' and '.join(missing)} not")
    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    return ("chief" if "chief" in tuner_id else "worker"), tuner_id


def _settings(base: TrainConfig, space: dict, kind: str, objective: str) -> dict:
    return {"tuner": kind, "objective": objective, "space": space,
            "options": base.without_place()}


def _check_settings(out_dir: str, settings: dict, overwrite: bool) -> None:
    """DIR/settings.json: a search resumed with other settings would mix two searches."""
    path = storage.join(out_dir, "settings.json")
    if not overwrite and storage.exists(path):
        old = storage.read_json(path)
        differ = [k for k in settings if json.dumps(old.get(k), sort_keys=True)
                  != json.dumps(json.loads(json.dumps(settings[k])), sort_keys=True)]
        if differ:
            detail = []
            for key in differ:
                if isinstance(settings[key], dict) and isinstance(old.get(key), dict):
                    names = sorted(n for n in set(settings[key]) | set(old[key])
                                   if json.dumps(settings[key].get(n), sort_keys=True)
                                   != json.dumps(old[key].get(n), sort_keys=True))
                    detail.append(f"{key} ({', '.join(names)})")
                else:
                    detail.append(key)
            raise InputError(f"{out_dir} holds a search with other settings: "
                             f"{'; '.join(detail)} differ. Run the same command to resume "
                             f"it, or use --overwrite to start over (or another --out)")
    storage.makedirs(out_dir)
    storage.write_atomic(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def tune(base: TrainConfig, out_dir: str, *, kind: str = "random", max_trials: int = 10,
         objective: str = "val_track_accuracy", space: dict | None = None,
         overwrite: bool = False, worker_timeout: float = 1800.0, progress: bool = True,
         echo=print) -> TuneResult:
    """Search ``space`` (see :func:`search_space`) around ``base``; results in ``out_dir``."""
    started = time.time()
    if kind == "hyperband":
        raise InputError(
            "--tuner hyperband is refused: Hyperband gives a trial one epoch budget "
            "(tuner/epochs, tuner/initial_epoch) and continues it from an earlier trial's "
            "checkpoint, which does not map onto tclf's two stages (stage 1 is ended by early "
            "stopping, then stage 2 fine-tunes the backbone from stage 1's weights); use "
            "--tuner random or bayesian")
    if kind not in TUNERS:
        raise InputError(f"--tuner must be one of {', '.join(TUNERS)}, got {kind!r}")
    if objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if max_trials < 1:
        raise InputError(f"--max-trials must be >= 1, got {max_trials}")
    if worker_timeout < 3 * HEARTBEAT_SECONDS:
        raise InputError(f"--worker-timeout must be at least {3 * HEARTBEAT_SECONDS:g} s (three "
                         f"heartbeats of a worker), got {worker_timeout:g}")
    space = search_space() if space is None else space
    base.validate()
    backbone = _backbone(base.records)
    space = for_backbone(space, backbone, backbone_layer_count(backbone))
    where, tuner_id = role()
    owner = where != "worker"  # The search's one owner of --out: a local search or the chief.
    if owner:
        if storage.exists(out_dir) and not storage.isdir(out_dir):
            raise InputError(f"--out {out_dir} is a file; give a folder for the search")
        storage.makedirs(out_dir)
        lock_folder(out_dir, "is being searched")  # Before anything in it is touched.
    try:
        if owner:
            _check_settings(out_dir, _settings(base, space, kind, objective), overwrite)
        if overwrite and owner:
            for name in (PROJECT, "logs", ".workers"):
                storage.rmtree(storage.join(out_dir, name))
            for name in ("trials.csv", "best_hparams.json"):
                storage.remove_quietly(storage.join(out_dir, name))
        if where == "chief":
            return serve(base, out_dir, space, kind, objective, max_trials, worker_timeout,
                          echo, started)
        return _run_trials(base, out_dir, space, kind, objective, max_trials, where, tuner_id,
                           progress, echo, started)
    finally:
        if owner:
            unlock_folder(out_dir)


def _backbone(records: str) -> str:
    """The backbone of the pack at ``records``; efficientnetb0 where there is no readable pack
    yet (the session says what is wrong with it, as for tclf-train)."""
    try:
        return Pack.load(records).backbone
    except (OSError, ValueError):
        return EFFICIENTNET


def _run_trials(base, out_dir, space, kind, objective, max_trials, where, tuner_id, progress,
                echo, started) -> TuneResult:
    with contextlib.ExitStack() as stack:
        if where == "worker":  # From the start: the backbone pass may take long.
            stack.enter_context(heartbeat(out_dir, tuner_id))

        def announce(devices, precision):
            if where == "local":
                echo(f"search in {out_dir}: {kind}, {max_trials} trials, objective {objective}; "
                     f"{devices}, {precision}")
            else:
                echo(f"worker {tuner_id}: {devices}, {precision}; the chief at "
                     f"{os.environ['KERASTUNER_ORACLE_IP']}:"
                     f"{os.environ['KERASTUNER_ORACLE_PORT']}")

        shared = stack.enter_context(_prepare(base, progress, announce))
        hypermodel = TclfHyperModel(base, space, shared, storage.join(out_dir, "logs"))
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):  # "Reloading Tuner from ...", summaries.
            tuner = make_tuner(kind, hypermodel, objective, max_trials, base.seed, out_dir,
                               overwrite=False, echo=echo)
        tuner.search_started = started
        if where == "local":
            done = len(tuner.oracle.trials)
            tuner.on_results = lambda: write_results(out_dir, tuner.oracle.trials, space, base,
                                                   objective)
            running = [t for t in tuner.oracle.trials.values() if t.status == "RUNNING"]
            if done:
                echo(f"resuming: {done} trial(s) on record" + (
                    f", {len(running)} to run again ({', '.join(t.trial_id for t in running)})"
                    if running else ""))
        else:
            settings = storage.join(out_dir, "settings.json")
            if storage.exists(settings) and (json.loads(json.dumps(
                    _settings(base, space, kind, objective), sort_keys=True))
                    != storage.read_json(settings)):
                raise InputError(f"worker {tuner_id}: its options differ from the chief's "
                                 f"({settings}); start every worker with the chief's options")
        if where == "worker":
            wait_when_idle(tuner.oracle)
        tuner.search(verbose=0)
        ran = len(tuner.trial_started)
        rows = []
        if where == "local":
            rows = write_results(out_dir, tuner.oracle.trials, space, base, objective, echo=echo)
            if tuner.oracle.failed_run:
                raise failures_error(out_dir, tuner.oracle.failed_run)
    return TuneResult(out_dir, where, rows, ran, time.time() - started)


def _prepare(base: TrainConfig, progress: bool, announce):
    """The search process's session and, with the stage-1 cache, the backbone's outputs,
    shared by its trials (a context manager); ``announce(devices, precision)`` is called
    before the pass."""
    if from_env():
        raise InputError("tclf-tune does not train across a TF_CONFIG cluster: unset TF_CONFIG "
                         "(a distributed search runs one trial per worker; docs/tuning.md)")
    return _shared(base, progress, announce)


@contextlib.contextmanager
def _shared(base: TrainConfig, progress: bool, announce):
    scratch = tempfile.mkdtemp(prefix="tclf-tune-")
    try:
        with Session(base) as session:
            session.load_pack()
            shared = Shared(session, scratch)
            # Every trial builds and traces a new model: TensorFlow's "retracing" warnings.
            tf.get_logger().setLevel(logging.ERROR)
            announce(session.devices, session.precision)
            if not base.stage1_cache:
                yield shared
                return
            with session.shared_stage1(scratch, progress) as (weights, outputs):
                shared.backbone_weights, shared.outputs = weights, outputs
                yield shared
    finally:
        storage.rmtree(scratch)
