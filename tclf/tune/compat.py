"""Every use of Keras Tuner's private API, in one place.

Checked with keras-tuner 1.4.7 and 1.4.8 (pyproject pins <1.5). A new Keras Tuner that moves
these breaks here, and only here.
"""

from __future__ import annotations

import contextlib

from keras_tuner.src import config as _config
from keras_tuner.src import protos as _protos
from keras_tuner.src.distribute import oracle_chief as _oracle_chief
from keras_tuner.src.engine import oracle as _oracle
from keras_tuner.src.engine import trial as _trial
from keras_tuner.src.engine import tuner_utils as _tuner_utils

CHECKED_WITH = ("1.4.7", "1.4.8")

_config.DEBUG = False  # Keras Tuner prints every failed trial's traceback otherwise.

synchronized = _oracle.synchronized  # An oracle method under the oracle's lock.


@contextlib.contextmanager
def oracle_lock(oracle):
    """The lock Keras Tuner's oracle methods take (the server thread changes the oracle)."""
    with _oracle.LOCKS[oracle]:
        yield


def idle_trial(hyperparameters):
    """A trial that tells a worker to wait and ask again."""
    return _trial.Trial(hyperparameters.copy(), trial_id="", status=_trial.TrialStatus.IDLE)


class OracleHooks:
    """Oracle mix-in: the private parts of Keras Tuner's Oracle that tclf changes, as public
    names. ``consecutive_failures_stop()`` is called instead of Keras Tuner's RuntimeError
    (raised inside end_trial, which on a chief leaves the lock held and the trial RUNNING)."""

    @property
    def retry_queue(self) -> list:
        """Trial ids given back (their worker died), to run again."""
        return self._retry_queue

    def _check_consecutive_failures(self):
        try:
            super()._check_consecutive_failures()
        except RuntimeError:
            self.consecutive_failures_stop()

    def consecutive_failures_stop(self) -> None:
        raise NotImplementedError


def build_and_fit(tuner, trial, **kwargs):
    """Keras Tuner's build-then-fit of one trial, with its callback that forwards each epoch
    to the tuner."""
    return tuner._build_and_fit_model(
        trial, callbacks=[_tuner_utils.TunerCallback(tuner, trial)], **kwargs)


def tensorboard_hparams(hyperparameters, hparams_api) -> dict:
    """A trial's hyperparameters as TensorBoard's HParams plugin wants them."""
    return _tuner_utils.convert_hyperparams_to_hparams(hyperparameters, hparams_api)


def oracle_servicer(oracle, server):
    """Keras Tuner's gRPC oracle service, added to ``server``; returns the servicer (its
    ``stop_triggered`` says every worker asked for a trial when none was left)."""
    servicer = _oracle_chief.OracleServicer(oracle)
    _protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    return servicer
