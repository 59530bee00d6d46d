"""Keras Tuner's tuner and oracle as a tclf search runs them.

The oracle's changes:

- the first trial is the baseline: every hyperparameter at its default;
- CONSECUTIVE_FAILURES failed trials in a row stop the search (``failed_run``);
- on a chief (``distributed``), a worker that asks for a trial when none is left while
  others still run one, or one is queued, is told to wait (IDLE), not to stop: a dead
  worker's trial comes back to the queue and needs someone to run it;
- a trial that ends after it was given up and queued again leaves the queue.

The tuner records each trial (tclf_trial.json), its TensorBoard HParams and a console line.
"""

from __future__ import annotations

import time
import traceback

import keras_tuner

from tclf import storage
from tclf.tune import compat
from tclf.tune.hypermodel import write_hparams, write_scores
from tclf.tune.results import PROJECT, trial_line, write_trial
from tclf.tune.space import OBJECTIVES

CONSECUTIVE_FAILURES = 3  # Failed trials in a row that stop a search (a systematic error).


class _OracleChanges(compat.OracleHooks):
    failed_run = None  # The last trial id, once the search stopped for failures.
    distributed = False

    def populate_space(self, trial_id):
        if self.failed_run:
            return {"status": "STOPPED", "values": None}
        if not self.trials:
            return {"status": "RUNNING",
                    "values": {hp.name: hp.default for hp in self.hyperparameters.space}}
        return super().populate_space(trial_id)

    def consecutive_failures_stop(self) -> None:
        self.failed_run = self.end_order[-1]

    @compat.synchronized
    def create_trial(self, tuner_id):
        if (self.distributed and tuner_id not in self.ongoing_trials and not self.failed_run
                and not self.retry_queue and self.max_trials
                and len(self.trials) >= self.max_trials and self.ongoing_trials):
            self.tuner_ids.add(tuner_id)
            return compat.idle_trial(self.hyperparameters)
        return super().create_trial(tuner_id)

    @compat.synchronized
    def end_trial(self, trial):
        if trial.trial_id in self.retry_queue:
            self.retry_queue.remove(trial.trial_id)
        super().end_trial(trial)


class RandomOracle(_OracleChanges, keras_tuner.oracles.RandomSearchOracle):
    pass


class BayesianOracle(_OracleChanges, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


ORACLES = {"random": RandomOracle, "bayesian": BayesianOracle}


class Tuner(keras_tuner.Tuner):
    """Runs a trial as Keras Tuner does (no SaveBestEpoch: no weights checkpoint per trial;
    tclf-train trains the best hyperparameters again, with its version folder) and records it.
    ``on_results`` is called after each trial; ``echo`` prints its line."""

    def __init__(self, *args, logs_dir: str, objective_name: str, echo, **kwargs):
        super().__init__(*args, **kwargs)
        self.logs_dir, self.objective_name, self.echo = logs_dir, objective_name, echo
        self.trial_started: dict[str, float] = {}
        self.trial_records: dict[str, dict] = {}
        self.on_results = None
        self.search_started = time.time()

    def run_trial(self, trial, *args, **kwargs):
        started = time.time()
        self.trial_started[trial.trial_id] = started
        write_trial(self.get_trial_dir(trial.trial_id), {
            "status": "RUNNING", "tuner_id": self.tuner_id, "started": started})
        # A trial that runs again (its process died) starts over, its logs too.
        logs = storage.join(self.logs_dir, trial.trial_id)
        storage.rmtree(logs)
        write_hparams(logs, trial)
        try:
            metrics = compat.build_and_fit(self, trial, trial_id=trial.trial_id)
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
        write_scores(logs, metrics)
        return metrics

    def _record(self, trial, status: str, **fields) -> None:
        record = {"status": status, "tuner_id": self.tuner_id,
                  "seconds": time.time() - self.trial_started[trial.trial_id], **fields}
        self.trial_records[trial.trial_id] = record
        write_trial(self.get_trial_dir(trial.trial_id), record)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        record = self.trial_records.get(trial.trial_id, {})
        score = record.get("metrics", {}).get(self.objective_name)
        self.echo(trial_line(trial.trial_id, trial.status, score, record, best(self.oracle),
                             self.objective_name, time.time() - self.search_started))
        if self.on_results:
            self.on_results()


def make_tuner(kind: str, hypermodel, objective: str, max_trials: int, seed: int, out_dir: str,
               overwrite: bool, echo) -> Tuner:
    oracle = ORACLES[kind](objective=keras_tuner.Objective(objective, OBJECTIVES[objective]),
                           max_trials=max_trials, seed=seed + 1,  # (Keras Tuner: 0 is "none".)
                           max_consecutive_failed_trials=CONSECUTIVE_FAILURES)
    return Tuner(oracle=oracle, hypermodel=hypermodel, directory=out_dir, project_name=PROJECT,
                 overwrite=overwrite, logs_dir=storage.join(out_dir, "logs"),
                 objective_name=objective, echo=echo)


def best(oracle):
    try:
        found = oracle.get_best_trials(1)
    except Exception:  # A worker's client may not reach the chief right now.
        return None
    return found[0] if found else None
