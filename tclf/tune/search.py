"""`tclf-tune`: a Keras Tuner search around the fixed two-stage schedule.

Each trial is a tclf-train run without a version folder: :class:`TclfHyperModel` maps the
trial's hyperparameters onto :class:`tclf.train.TrainConfig` (so onto the same
:func:`tclf.model.build_model`), and its ``fit`` runs :func:`tclf.train.two_stages`, the
schedule tclf-train runs, then scores the model on the validation split at segment and at
track level. The hyperparameters have TrainConfig's names, so DIR/best_hparams.json is a
`tclf-train --hparams` file as it is.

The frozen backbone's outputs depend on none of the searched hyperparameters (only on the
image size, the backbone's weights, and with ``--weights none`` the seed, all fixed for a
search): each search process computes them once, before its first trial, and every trial's
stage 1 trains on them. Stage 2 reads the records, so the number of unfrozen layers is
searchable too.

Search state is Keras Tuner's own, in DIR/search/ (trial_*/trial.json, oracle.json): the
same command run again resumes; a trial that was running when the process died runs again.
Distributed search uses Keras Tuner's chief/worker mechanism (KERASTUNER_TUNER_ID,
KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT); tclf adds heartbeats, so that a chief
notices a dead worker (:func:`_serve`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import socket
import tempfile
import threading
import time
import traceback

from tclf import InputError, RunError, faults, report_skip, storage
from tclf.training.train import PLACE_OPTIONS, TrainConfig, seed_everything
from tclf.training.versions import lock_folder, unlock_folder

PROJECT = "search"  # Keras Tuner's project folder inside DIR.
TUNERS = ("random", "bayesian", "hyperband")
OBJECTIVES = {  # name: direction. Every trial reports all of them.
    "val_track_accuracy": "max",
    "val_track_macro_f1": "max",
    "val_accuracy": "max",
    "val_loss": "min",
}

# The search space: TrainConfig fields. The defaults are TrainConfig's (the spec's values),
# so the first trial is the baseline.
SPACE = {
    "image_units": {"values": [64, 128, 256]},
    "feature_units": {"values": [32, 64, 128]},
    "fusion_units": {"values": [64, 128, 256]},
    "head_units": {"values": [32, 64, 128]},
    "gru_units": {"values": [64, 128, 256]},
    "gru2_units": {"values": [32, 64, 128]},
    "attention_heads": {"values": [1, 2, 4, 8]},
    "dropout": {"min": 0.1, "max": 0.6, "step": 0.05},
    "stage1_lr": {"min": 1e-5, "max": 1e-3, "log": True},
    "stage2_lr": {"min": 1e-6, "max": 1e-4, "log": True},
    "stage1_warmup_epochs": {"min": 0.0, "max": 3.0, "step": 0.5},
    "stage2_warmup_epochs": {"min": 0.0, "max": 2.0, "step": 0.5},
    "stage2_layers": {"min": 0, "max": 80, "step": 10},
}

# Worker heartbeats (distributed search): written every HEARTBEAT_SECONDS; the chief gives
# a worker up after --worker-timeout seconds without one.
HEARTBEAT_SECONDS = float(os.environ.get("TCLF_TUNE_HEARTBEAT_SECONDS", 15))
CONSECUTIVE_FAILURES = 3  # Failed trials in a row that stop a search (a systematic error).
TRIAL_FILE = "tclf_trial.json"  # Our record of a trial, beside Keras Tuner's trial.json.


# ---------------------------------------------------------------------------
# The space.
# ---------------------------------------------------------------------------


def search_space(overrides: dict | None = None, fixed=None,
                 base: TrainConfig | None = None) -> dict:
    """SPACE narrowed by ``overrides`` (a --space file: name -> value to fix, list of choices,
    or {"min", "max", "step" | "log"} / {"values"}), minus the names in ``fixed`` (options the
    user gave, which every trial uses). Each value is checked as an option of ``base`` (the
    search's other options). Returns name -> spec with a "default" (TrainConfig's)."""
    defaults = TrainConfig()
    base = base or defaults
    space = {name: dict(spec) for name, spec in SPACE.items()}
    for name, value in (overrides or {}).items():
        if name not in SPACE:
            raise InputError(f"--space: {name!r} is not searched; searched: "
                             f"{', '.join(SPACE)}")
        kind = type(getattr(defaults, name))
        if isinstance(value, list):
            value = {"values": value}
        if isinstance(value, dict):
            unknown = set(value) - {"values", "min", "max", "step", "log"}
            if unknown or not value or ("values" in value and len(value) > 1):
                raise InputError(f"--space: {name}: expected a value, a list of values, "
                                 f"{{\"values\": [...]}} or {{\"min\", \"max\", \"step\" or "
                                 f"\"log\"}}, got {value!r}")
            if "values" in value:
                spec = {"values": value["values"]}
            else:
                if "values" in SPACE[name] and not {"min", "max"} <= set(value):
                    raise InputError(f"--space: {name} is searched over a list of values; a "
                                     f"range for it needs both min and max")
                if value.get("log") and value.get("step") is not None:
                    raise InputError(f"--space: {name}: step and log exclude each other")
                spec = {**{k: v for k, v in SPACE[name].items() if k != "values"}, **value}
                if value.get("step") is not None:
                    spec.pop("log", None)
                if spec.get("log"):
                    spec.pop("step", None)
        else:
            spec = {"values": [value]}
        space[name] = _checked(name, spec, kind, base)
    for name in fixed or ():
        if name in (overrides or {}):  # Both say something: the command line's value wins.
            report_skip(f"--space: {name} is also given as an option ({name.replace('_', '-')} "
                        f"{getattr(base, name)!r}), which every trial uses; the --space entry "
                        f"{overrides[name]!r} is ignored")
        space.pop(name, None)
    for name, spec in space.items():
        spec["default"] = _nearest(spec, getattr(defaults, name))
    return space


def _checked(name: str, spec: dict, kind: type, base: TrainConfig) -> dict:
    def number(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"--space: {name}: {value!r} is not a number")
        if kind is int and value != int(value):
            raise InputError(f"--space: {name}: {value!r} is not an integer")
        value = kind(value)
        try:  # The option's own checks: a value no trial could use is refused now.
            base.replace(**{name: value}).validate()
        except InputError as error:
            raise InputError(f"--space: {name}: {value!r}: {error}") from None
        if name == "stage2_layers" and value < 0:
            raise InputError(f"--space: {name}: {value!r}: must be >= 0")
        return value

    if "values" in spec:
        values = [number(v) for v in spec["values"]]
        if not values:
            raise InputError(f"--space: {name}: no values")
        return {"values": sorted(set(values))}
    low, high = number(spec["min"]), number(spec["max"])
    if low > high:
        raise InputError(f"--space: {name}: min {low} > max {high}")
    out = {"min": low, "max": high}
    if spec.get("log"):
        if low <= 0:
            raise InputError(f"--space: {name}: a log range needs min > 0")
        out["log"] = True
    elif spec.get("step") is not None:
        step = spec["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or (
                kind is int and step != int(step)):
            raise InputError(f"--space: {name}: step must be a positive "
                             f"{'integer' if kind is int else 'number'}, got {step!r}")
        out["step"] = kind(step)
    return out


def _grid(spec: dict) -> int:
    """The index of the last step of a stepped range that is not above its max."""
    return math.floor((spec["max"] - spec["min"]) / spec["step"] + 1e-9)


def _nearest(spec: dict, value):
    """The spec's value nearest ``value`` (the baseline, where the space allows it)."""
    if "values" in spec:
        return min(spec["values"], key=lambda v: (abs(v - value), v))
    low, high = spec["min"], spec["max"]
    clipped = min(max(value, low), high)
    if spec.get("step"):
        clipped = low + min(round((clipped - low) / spec["step"]), _grid(spec)) * spec["step"]
    return _tidy(type(low)(clipped))


def _tidy(value):
    """Floats on a step grid without binary noise (0.15, not 0.15000000000000002)."""
    return round(value, 10) if isinstance(value, float) else value


def declare(hp, space: dict) -> None:
    """Declare ``space`` in a keras_tuner HyperParameters."""
    for name, spec in space.items():
        if "values" in spec:
            hp.Choice(name, spec["values"], default=spec["default"])
        elif isinstance(spec["min"], int):
            hp.Int(name, spec["min"], spec["max"],
                   step=None if spec.get("log") else spec.get("step", 1),
                   sampling="log" if spec.get("log") else "linear", default=spec["default"])
        elif spec.get("step"):
            # Keras Tuner counts a float grid's values with a floor that can drop the max
            # (0.1 to 0.6 step 0.05 gave 0.1 ... 0.55): the max is nudged up, and the values
            # rounded where they are read (_tidy).
            hp.Float(name, spec["min"], spec["min"] + _grid(spec) * spec["step"] + 1e-9,
                     step=spec["step"], default=spec["default"])
        else:
            hp.Float(name, spec["min"], spec["max"],
                     sampling="log" if spec.get("log") else "linear", default=spec["default"])


# ---------------------------------------------------------------------------
# The hypermodel: tclf-train's model and schedule.
# ---------------------------------------------------------------------------


def _keras_tuner():
    import keras_tuner

    from keras_tuner.src import config as kt_config

    kt_config.DEBUG = False  # Keras Tuner prints every failed trial's traceback otherwise.
    return keras_tuner


@dataclasses.dataclass
class _Shared:
    """What every trial of this process shares: the strategy, the precision, the manifest, a
    scratch folder and, with the stage-1 cache, the backbone's weights and outputs (all
    released by ``stack``)."""

    strategy: object
    precision: str
    manifest: dict
    scratch: str
    backbone_weights: list | None = None
    outputs: object = None
    stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)


def make_hypermodel(base: TrainConfig, space: dict, shared: _Shared, logs_dir: str):
    keras_tuner = _keras_tuner()

    class TclfHyperModel(keras_tuner.HyperModel):
        """build: tclf.model.build_model with the trial's TrainConfig; fit: the two stages."""

        def trial_config(self, hp) -> TrainConfig:
            return base.replace(**{name: _tidy(hp.get(name)) for name in space})

        def build(self, hp):
            import keras

            from tclf.model import backbone_of
            from tclf.training.train import model_for

            declare(hp, space)
            config = self.trial_config(hp)
            config.validate()
            keras.mixed_precision.set_global_policy(shared.precision)
            seed_everything(config)
            with shared.strategy.scope():
                # The outputs' backbone replaces this one's: no need to calibrate it.
                model = model_for(config, shared.manifest,
                                  calibrate=shared.backbone_weights is None)
            if shared.backbone_weights is not None:  # The backbone the outputs came from.
                backbone_of(model).set_weights(shared.backbone_weights)
            return model

        def fit(self, hp, model, *args, callbacks=(), trial_id="", **kwargs):
            return _fit_trial(self.trial_config(hp), model, shared, list(callbacks),
                              storage.join(logs_dir, trial_id))

    return TclfHyperModel()


def _fit_trial(config: TrainConfig, model, shared: _Shared, callbacks: list,
               logs_dir: str) -> dict:
    """The two stages on ``model`` (as tclf-train runs them), then the validation scores."""
    import keras
    import tensorflow as tf

    from tclf.data import reader
    from tclf.training import train
    from tclf.evaluation.evaluate import evaluate_records

    keras_tuner = _keras_tuner()
    stages = []
    train_data, val_data = train.make_datasets(config)
    try:
        with shared.strategy.scope(), reader.naming_corrupt_shards(config.records):
            stages = train.two_stages(
                model, train_data, val_data, config, shared.manifest,
                logs_dir=logs_dir, callbacks=[keras.callbacks.TerminateOnNaN(), *callbacks],
                outputs=shared.outputs, scratch=shared.scratch, stages=stages,
                after_stage1=lambda: (_check_finite(stages[-1], keras_tuner),
                                      faults.point("tune.stage1_done")))
            _check_finite(stages[-1], keras_tuner)
            evaluation = evaluate_records(model, shared.manifest["classes"], config.records,
                                          "val", config.batch_size)  # As tclf-train's run.
    except tf.errors.ResourceExhaustedError as error:
        raise keras_tuner.errors.FailedTrialError(
            f"out of memory: {error.message.strip().splitlines()[0]}") from None
    # Stage 2's losses; stage 1's where stage 2 was skipped (a random backbone).
    best = next((s.history["val_loss"] for s in reversed(stages) if s.history.get("val_loss")),
                [])
    return {"val_track_accuracy": evaluation.track_accuracy,
            "val_track_macro_f1": evaluation.track_macro_f1,
            "val_accuracy": evaluation.segment_accuracy,
            "val_loss": float(min(best)) if best else float("nan"),
            "epochs": float(sum(s.epochs_run for s in stages))}


def _write_hparams(logs_dir: str, trial) -> None:
    """The trial's hyperparameters for TensorBoard's HParams view (at the root of the trial's
    logs; its train/ and validation/ runs hold the metrics)."""
    import tensorflow as tf
    from keras_tuner.src.engine import tuner_utils
    from tensorboard.plugins.hparams import api as hparams_api

    writer = tf.summary.create_file_writer(logs_dir)
    with writer.as_default():
        hparams_api.hparams(tuner_utils.convert_hyperparams_to_hparams(trial.hyperparameters,
                                                                       hparams_api),
                            trial_id=trial.trial_id)
    writer.close()


def _check_finite(stage, keras_tuner) -> None:
    """A stage whose loss became NaN or infinite fails the trial (TerminateOnNaN stopped it)."""
    losses = stage.history.get("loss", []) + stage.history.get("val_loss", [])
    if not all(math.isfinite(v) for v in losses):
        raise keras_tuner.errors.FailedTrialError(
            f"the loss became NaN or infinite in {stage.name}")


def _write_scores(logs_dir: str, metrics: dict) -> None:
    """The trial's scores as scalars at the root of its logs, for the HParams view."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logs_dir)
    with writer.as_default():
        for name in OBJECTIVES:
            tf.summary.scalar(name, metrics[name], step=0)
    writer.close()


def make_tuner(kind: str, hypermodel, objective: str, max_trials: int, seed: int, out_dir: str,
               overwrite: bool, echo):
    keras_tuner = _keras_tuner()
    from keras_tuner.src.engine import trial as trial_module
    from keras_tuner.src.engine import tuner_utils
    from keras_tuner.src.engine.oracle import synchronized

    logs_dir = storage.join(out_dir, "logs")
    oracles = {"random": keras_tuner.oracles.RandomSearchOracle,
               "bayesian": keras_tuner.oracles.BayesianOptimizationOracle}

    class Oracle(oracles[kind]):
        """Keras Tuner's oracle, with four changes:

        - the first trial is the baseline: every hyperparameter at its default;
        - CONSECUTIVE_FAILURES failed trials in a row stop the search through ``failed_run``
          (Keras Tuner raises inside end_trial, which on a chief leaves the oracle's lock
          held and the trial RUNNING);
        - on a chief (``distributed``), a worker that asks for a trial when none is left
          while others still run one, or one is queued, is told to wait (IDLE), not to stop:
          a dead worker's trial comes back to the queue and needs someone to run it;
        - a trial that ends after it was given up and queued again leaves the queue.
        """

        failed_run = None  # The last trial id, once the search stopped for failures.
        distributed = False

        def populate_space(self, trial_id):
            if self.failed_run:
                return {"status": "STOPPED", "values": None}
            if not self.trials:
                return {"status": "RUNNING",
                        "values": {hp.name: hp.default for hp in self.hyperparameters.space}}
            return super().populate_space(trial_id)

        def _check_consecutive_failures(self):
            try:
                super()._check_consecutive_failures()
            except RuntimeError:
                self.failed_run = self.end_order[-1]

        @synchronized
        def create_trial(self, tuner_id):
            if (self.distributed and tuner_id not in self.ongoing_trials and not self.failed_run
                    and not self._retry_queue and self.max_trials
                    and len(self.trials) >= self.max_trials and self.ongoing_trials):
                self.tuner_ids.add(tuner_id)
                return trial_module.Trial(self.hyperparameters.copy(), trial_id="",
                                          status=trial_module.TrialStatus.IDLE)
            return super().create_trial(tuner_id)

        @synchronized
        def end_trial(self, trial):
            if trial.trial_id in self._retry_queue:
                self._retry_queue.remove(trial.trial_id)
            super().end_trial(trial)

    class Tuner(keras_tuner.Tuner):
        def run_trial(self, trial, *args, **kwargs):
            # Keras Tuner's own callback (it forwards each epoch to the tuner) on one epoch
            # axis over both stages; no SaveBestEpoch: no weights checkpoint per trial
            # (tclf-train trains the best hyperparameters again, with its version folder).
            started = time.time()
            self._started[trial.trial_id] = started
            _write_trial(self.get_trial_dir(trial.trial_id), {
                "status": "RUNNING", "tuner_id": self.tuner_id, "started": started})
            # A trial that runs again (its process died) starts over, its logs too.
            storage.rmtree(storage.join(logs_dir, trial.trial_id))
            _write_hparams(storage.join(logs_dir, trial.trial_id), trial)
            try:
                metrics = self._build_and_fit_model(
                    trial, callbacks=[tuner_utils.TunerCallback(self, trial)],
                    trial_id=trial.trial_id)
            except keras_tuner.errors.FailedTrialError as error:
                self._record(trial, "FAILED", reason=str(error))
                raise
            except (KeyboardInterrupt, keras_tuner.errors.FatalError):
                raise
            except Exception as error:  # Recorded as failed; the search goes on.
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                reason = f"{type(error).__name__}: {first}"
                self._record(trial, "FAILED", reason=reason, traceback=traceback.format_exc())
                raise keras_tuner.errors.FailedTrialError(reason) from error
            self._record(trial, "COMPLETED", metrics=metrics)
            _write_scores(storage.join(logs_dir, trial.trial_id), metrics)
            return metrics

        def _record(self, trial, status: str, **fields) -> None:
            record = {"status": status, "tuner_id": self.tuner_id,
                      "seconds": time.time() - self._started[trial.trial_id], **fields}
            self._records[trial.trial_id] = record
            _write_trial(self.get_trial_dir(trial.trial_id), record)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            record = self._records.get(trial.trial_id, {})
            score = record.get("metrics", {}).get(objective)
            echo(_trial_line(trial.trial_id, trial.status, score, record, _best(self.oracle),
                             objective, time.time() - self._search_started))
            if self._results:
                self._results()

    tuner = Tuner(
        oracle=Oracle(objective=keras_tuner.Objective(objective, OBJECTIVES[objective]),
                      max_trials=max_trials, seed=seed + 1,  # (Keras Tuner takes 0 as "none".)
                      max_consecutive_failed_trials=CONSECUTIVE_FAILURES),
        hypermodel=hypermodel, directory=out_dir, project_name=PROJECT, overwrite=overwrite)
    tuner._started, tuner._records, tuner._results = {}, {}, None
    tuner._search_started = time.time()
    return tuner


def _best(oracle):
    try:
        best = oracle.get_best_trials(1)
    except Exception:  # A worker's client may not reach the chief right now.
        return None
    return best[0] if best else None


# ---------------------------------------------------------------------------
# Records of trials and results.
# ---------------------------------------------------------------------------


def _write_trial(trial_dir: str, record: dict) -> None:
    storage.makedirs(trial_dir)
    storage.write_atomic(storage.join(trial_dir, TRIAL_FILE), json.dumps(record, indent=1))


def _read_trial(trial_dir: str) -> dict:
    path = storage.join(trial_dir, TRIAL_FILE)
    try:
        return storage.read_json(path) if storage.exists(path) else {}
    except InputError:
        return {}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _trial_line(trial_id, status, score, record: dict, best, objective: str,
                elapsed: float | None = None) -> str:
    if status == "COMPLETED" and score is not None:
        what = f"completed  {objective} {score:.4f}"
    else:
        what = f"{status.lower()}: {record.get('reason') or 'see its trial.json'}"
    best_text = (f"  best {best.score:.4f} (trial {best.trial_id})"
                 if best is not None and best.score is not None else "")
    seconds = record.get("seconds")
    took = f"  took {_duration(seconds)}" if seconds is not None else ""
    since = f"  elapsed {_duration(elapsed)}" if elapsed is not None else ""
    return f"trial {trial_id}  {what}{best_text}{took}{since}"


def trial_rows(out_dir: str, trials: dict, space: dict, objective: str) -> list[dict]:
    """One row per trial (``trials``: the oracle's, by id), best first (failed and
    unfinished trials last)."""
    rows = []
    for trial_id, trial in trials.items():
        record = _read_trial(storage.join(out_dir, PROJECT, f"trial_{trial_id}"))
        status = trial.status
        row = {"trial": trial_id, "status": status,
               "score": trial.score if status == "COMPLETED" else None}
        for name in OBJECTIVES:
            row[name] = (trial.metrics.get_last_value(name)
                         if trial.metrics.exists(name) else None)
        row.update({name: _tidy(trial.hyperparameters.values.get(name)) for name in space})
        row["seconds"] = record.get("seconds")
        row["reason"] = record.get("reason", "") if status != "COMPLETED" else ""
        rows.append(row)
    sign = -1 if OBJECTIVES[objective] == "max" else 1
    rows.sort(key=lambda r: (r["score"] is None, sign * (r["score"] or 0), r["trial"]))
    return rows


def write_results(out_dir: str, trials: dict, space: dict, base: TrainConfig, objective: str,
                  echo=None) -> list[dict]:
    """DIR/trials.csv and DIR/best_hparams.json from the oracle's trials (by id); the table
    on the console if ``echo``."""
    rows = trial_rows(out_dir, trials, space, objective)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    storage.write_atomic(storage.join(out_dir, "trials.csv"), buffer.getvalue())
    best = next((r for r in rows if r["score"] is not None), None)
    if best:
        values = {k: v for k, v in dataclasses.asdict(base).items() if k not in PLACE_OPTIONS}
        values.update({name: best[name] for name in space})
        storage.write_atomic(storage.join(out_dir, "best_hparams.json"),
                             json.dumps(values, indent=1) + "\n")
    if echo and rows:
        echo(_table(rows, space, objective))
    return rows


def _table(rows: list[dict], space: dict, objective: str) -> str:
    columns = ["trial", "status", objective, *space, "seconds"]

    def cell(row, name):
        value = row.get(name)
        if value is None:
            return "-"
        if name == "seconds":
            return f"{value:.0f}"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The search.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TuneResult:
    out_dir: str
    role: str  # local, chief or worker
    rows: list
    ran: int  # Trials this process finished.
    seconds: float


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
            "options": {k: v for k, v in dataclasses.asdict(base).items()
                        if k not in PLACE_OPTIONS}}


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
    import keras

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
    where, tuner_id = role()
    owner = where != "worker"  # The search's one owner of --out: a local search or the chief.
    if owner:
        if storage.exists(out_dir) and not storage.isdir(out_dir):
            raise InputError(f"--out {out_dir} is a file; give a folder for the search")
        storage.makedirs(out_dir)
        lock_folder(out_dir, "is being searched")  # Before anything in it is touched.
    previous_policy = keras.mixed_precision.global_policy()
    try:
        if owner:
            _check_settings(out_dir, _settings(base, space, kind, objective), overwrite)
        if overwrite and owner:
            for name in (PROJECT, "logs", ".workers"):
                storage.rmtree(storage.join(out_dir, name))
            for name in ("trials.csv", "best_hparams.json"):
                storage.remove_quietly(storage.join(out_dir, name))
        if where == "chief":
            return _chief(base, out_dir, space, kind, objective, max_trials, worker_timeout,
                          echo, started)
        return _run_trials(base, out_dir, space, kind, objective, max_trials, where, tuner_id,
                           progress, echo, started)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if owner:
            unlock_folder(out_dir)


def _prepare(base: TrainConfig, progress: bool, announce) -> _Shared:
    """Devices, precision, the manifest and, with the stage-1 cache, the backbone's outputs;
    ``announce(devices, precision)`` is called before the backbone pass."""
    import logging

    import keras
    import tensorflow as tf

    from tclf.training.backbone_cache import backbone_outputs
    from tclf.training.cluster import from_env
    from tclf.training.devices import configure_devices, resolve_precision
    from tclf.model import backbone_of, freeze_backbone
    from tclf.training.train import _training_manifest, model_for

    if from_env():
        raise InputError("tclf-tune does not train across a TF_CONFIG cluster: unset TF_CONFIG "
                         "(a distributed search runs one trial per worker; README: tclf-tune)")
    strategy, devices, on_gpu = configure_devices(base.gpus, base.cpu_devices)
    base.validate_model_options()
    precision = resolve_precision(base.precision, on_gpu)
    keras.mixed_precision.set_global_policy(precision)
    shared = _Shared(strategy, precision, _training_manifest(base.records),
                     tempfile.mkdtemp(prefix="tclf-tune-"))
    shared.stack.callback(storage.rmtree, shared.scratch)
    # Every trial builds and traces a new model: TensorFlow's "retracing" warnings say so.
    tf.get_logger().setLevel(logging.ERROR)
    announce(devices, precision)
    if base.stage1_cache:
        seed_everything(base)
        with strategy.scope():
            model = model_for(base, shared.manifest)
        freeze_backbone(model)
        shared.backbone_weights = backbone_of(model).get_weights()
        with strategy.scope():
            shared.outputs = shared.stack.enter_context(backbone_outputs(
                model, base.records, base.batch_size, base.image_size, shared.scratch,
                base.stage1_cache_mb, progress=progress))
        del model
    return shared


def _run_trials(base, out_dir, space, kind, objective, max_trials, where, tuner_id, progress,
                echo, started) -> TuneResult:
    with contextlib.ExitStack() as stack:
        if where == "worker":  # From the start: the backbone pass may take long.
            stack.enter_context(_heartbeat(out_dir, tuner_id))

        def announce(devices, precision):
            if where == "local":
                echo(f"search in {out_dir}: {kind}, {max_trials} trials, objective {objective}; "
                     f"{devices}, {precision}")
            else:
                echo(f"worker {tuner_id}: {devices}, {precision}; the chief at "
                     f"{os.environ['KERASTUNER_ORACLE_IP']}:"
                     f"{os.environ['KERASTUNER_ORACLE_PORT']}")

        shared = _prepare(base, progress, announce)
        stack.enter_context(shared.stack)
        hypermodel = make_hypermodel(base, space, shared, storage.join(out_dir, "logs"))
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):  # "Reloading Tuner from ...", summaries.
            tuner = make_tuner(kind, hypermodel, objective, max_trials, base.seed, out_dir,
                               overwrite=False, echo=echo)
        tuner._search_started = started
        if where == "local":
            done = len(tuner.oracle.trials)
            tuner._results = lambda: write_results(out_dir, tuner.oracle.trials, space, base,
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
            _wait_when_idle(tuner.oracle)
        tuner.search(verbose=0)
        ran = len(tuner._started)
        rows = []
        if where == "local":
            rows = write_results(out_dir, tuner.oracle.trials, space, base, objective, echo=echo)
            if tuner.oracle.failed_run:
                raise _failures_error(out_dir, tuner.oracle.failed_run)
    return TuneResult(out_dir, where, rows, ran, time.time() - started)


# ---------------------------------------------------------------------------
# Distributed search: the chief.
# ---------------------------------------------------------------------------


def _wait_when_idle(client) -> None:
    """A worker told to wait (IDLE: trials still run elsewhere) asks again after a pause;
    Keras Tuner's search loop would ask again at once, over and over."""
    create_trial = client.create_trial

    def patient_create_trial(tuner_id):
        trial = create_trial(tuner_id)
        if trial.status == "IDLE":
            time.sleep(2)
        return trial

    client.create_trial = patient_create_trial


def _failures_error(out_dir: str, trial_id: str) -> RunError:
    record = _read_trial(storage.join(out_dir, PROJECT, f"trial_{trial_id}"))
    return RunError(f"{CONSECUTIVE_FAILURES} trials in a row failed, the last (trial {trial_id}) "
                    f"with {record.get('reason') or 'an error'}; the search stopped (see "
                    f"{storage.join(out_dir, 'trials.csv')}; fix the cause and start it again "
                    f"with --max-trials raised, or --overwrite)")


@contextlib.contextmanager
def _heartbeat(out_dir: str, tuner_id: str):
    """A worker's sign of life: DIR/.workers/<tuner id>.json rewritten every
    HEARTBEAT_SECONDS with a counter (the chief compares contents, not clocks)."""
    folder = storage.join(out_dir, ".workers")
    path = storage.join(folder, f"{tuner_id}.json")
    stop = threading.Event()

    def beat():
        count = 0
        while not stop.is_set():
            count += 1
            try:  # (A full or vanished folder must not end the beats for good.)
                storage.makedirs(folder)
                storage.write_atomic(path, json.dumps({"beat": count, "pid": os.getpid(),
                                                       "host": socket.gethostname()}))
            except Exception:  # noqa: BLE001
                pass
            stop.wait(HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, daemon=True, name="tclf-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        storage.remove_quietly(path)


def _chief(base, out_dir, space, kind, objective, max_trials, worker_timeout, echo,
           started) -> TuneResult:
    """Serve the oracle to the workers until the search is over.

    Keras Tuner's own chief (keras_tuner.src.distribute.oracle_chief.start_server) waits for
    every worker that ever asked for a trial, forever. This one watches the workers'
    heartbeats: a worker silent for ``worker_timeout`` seconds is given up and its trial goes
    back to the queue (the oracle keeps the other workers waiting while a trial may still
    come back); with no worker heard from for that long, the search ends with an error.
    """
    import grpc
    from concurrent import futures

    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    with contextlib.redirect_stdout(io.StringIO()):  # "Reloading Tuner from ...".
        tuner = make_tuner(kind, _space_only(space), objective, max_trials, base.seed,
                           out_dir, overwrite=False, echo=echo)
    oracle = tuner.oracle
    oracle.verbose = 0  # Keras Tuner's own trial tables, printed from the server thread.
    oracle.distributed = True
    tuner.save()  # A chief started again finds the search (Keras Tuner's search() does this).
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    servicer = oracle_chief.OracleServicer(oracle)
    # No SO_REUSEPORT: a second chief on the same port must fail, not share the workers.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1),
                         options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RunError(f"cannot listen on {address}: {error}") from None
    if not port:
        raise RunError(f"cannot listen on {address} (in use, or not an address of this "
                       f"machine)")
    server.start()
    echo(f"chief: serving the search in {out_dir} on {address} ({kind}, {max_trials} trials, "
         f"objective {objective}); giving a worker up after {worker_timeout:.0f} s without a "
         f"heartbeat")
    with _oracle_lock(oracle):
        finished = {t for t, trial in oracle.trials.items()
                    if trial.status in ("COMPLETED", "FAILED", "INVALID")}
    seen: dict[str, tuple[str, float]] = {}  # tuner id -> (heartbeat, chief time it changed)
    lost: set[str] = set()
    last_heard = time.time()
    try:
        while True:
            time.sleep(1)
            now = time.time()
            with _oracle_lock(oracle):  # A consistent copy: the server thread changes it.
                trials = dict(oracle.trials)
                statuses = {t: trial.status for t, trial in trials.items()}
                registered = set(oracle.tuner_ids)
                busy = bool(oracle.ongoing_trials or oracle._retry_queue)
                failed_run = oracle.failed_run
            # Trials that ended since the last look: a line each, and the results files.
            ended = {t for t, status in statuses.items()
                     if status in ("COMPLETED", "FAILED", "INVALID")} - finished
            for trial_id in sorted(ended):
                record = _read_trial(storage.join(out_dir, PROJECT, f"trial_{trial_id}"))
                echo(_trial_line(trial_id, statuses[trial_id], trials[trial_id].score, record,
                                 _best_of(trials, objective), objective, now - started))
            if ended:
                finished |= ended
                write_results(out_dir, trials, space, base, objective)
            # Heartbeats.
            beats = _beats(out_dir)
            for tuner_id in set(beats) | registered:
                beat = beats.get(tuner_id, "")
                if tuner_id not in seen or (beat and seen[tuner_id][0] != beat):
                    seen[tuner_id] = (beat, now)
                    if tuner_id in lost:
                        lost.discard(tuner_id)
                        echo(f"chief: worker {tuner_id} is back")
            alive = {t for t, (beat, at) in seen.items()
                     if beat and now - at <= worker_timeout}
            for tuner_id in registered - lost:
                if now - seen[tuner_id][1] > worker_timeout:
                    trial = _give_up(oracle, tuner_id)
                    lost.add(tuner_id)
                    echo(f"chief: worker {tuner_id} gave no heartbeat for "
                         f"{worker_timeout:.0f} s; given up" + (
                             f"; its trial {trial} goes back to the queue" if trial else ""))
            if alive:
                last_heard = now
            if failed_run and not busy:
                write_results(out_dir, trials, space, base, objective, echo=echo)
                raise _failures_error(out_dir, failed_run)
            if servicer.stop_triggered and not busy and not (registered - lost):
                break
            if now - last_heard > worker_timeout:
                raise RunError(
                    f"no worker heard from for {worker_timeout:.0f} s (given up: "
                    f"{', '.join(sorted(lost)) or 'none'}); the finished trials are in "
                    f"{out_dir}; start the chief and the workers again to go on")
    finally:
        server.stop(grace=5)
    with _oracle_lock(oracle):
        trials = dict(oracle.trials)
    rows = write_results(out_dir, trials, space, base, objective, echo=echo)
    return TuneResult(out_dir, "chief", rows, 0, time.time() - started)


def _beats(out_dir: str) -> dict[str, str]:
    """tuner id -> its heartbeat file's content."""
    folder = storage.join(out_dir, ".workers")
    beats = {}
    for name in storage.listdir(folder):
        if name.endswith(".json") and not name.startswith("."):
            try:
                beats[name[:-5]] = storage.read_bytes(storage.join(folder, name)).decode()
            except Exception:  # noqa: BLE001 - being replaced right now
                pass
    return beats


def _best_of(trials: dict, objective: str):
    done = [t for t in trials.values() if t.status == "COMPLETED" and t.score is not None]
    if not done:
        return None
    pick = max if OBJECTIVES[objective] == "max" else min
    return pick(done, key=lambda t: t.score)


def _space_only(space: dict):
    """The chief's hypermodel: it declares the space (Keras Tuner builds it once at the
    start); the chief runs no trial, so it needs no data, devices or backbone."""
    keras_tuner = _keras_tuner()

    class Declare(keras_tuner.HyperModel):
        def build(self, hp):
            import keras

            declare(hp, space)
            return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    return Declare()


@contextlib.contextmanager
def _oracle_lock(oracle):
    from keras_tuner.src.engine import oracle as oracle_module

    lock = oracle_module.LOCKS[oracle]
    with lock:
        yield


def _give_up(oracle, tuner_id: str) -> str | None:
    """Forget a dead worker; its running trial goes back to the retry queue."""
    with _oracle_lock(oracle):
        oracle.tuner_ids.discard(tuner_id)
        trial = oracle.ongoing_trials.pop(tuner_id, None)
        if trial is None:
            return None
        oracle._retry_queue.append(trial.trial_id)
        oracle.save()
        return trial.trial_id
