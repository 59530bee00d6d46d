"""Distributed search: the chief, which serves the oracle to the workers, and the workers'
heartbeats, by which the chief notices a dead worker and gives its trial to another.

Keras Tuner's chief/worker mechanism (KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP,
KERASTUNER_ORACLE_PORT) carries the trials; the heartbeats are tclf's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from concurrent import futures

import grpc

from tclf import RunError, storage
from tclf.tune import compat
from tclf.tune.hypermodel import SpaceOnly
from tclf.tune.results import (TuneResult, best_of, read_trial, trial_dir, trial_line,
                               write_results)
from tclf.tune.tuner import CONSECUTIVE_FAILURES, make_tuner

# Written every HEARTBEAT_SECONDS; the chief gives a worker up after --worker-timeout
# seconds without one.
HEARTBEAT_SECONDS = float(os.environ.get("TCLF_TUNE_HEARTBEAT_SECONDS", 15))


def failures_error(out_dir: str, trial_id: str) -> RunError:
    record = read_trial(trial_dir(out_dir, trial_id))
    return RunError(f"{CONSECUTIVE_FAILURES} trials in a row failed, the last (trial {trial_id}) "
                    f"with {record.get('reason') or 'an error'}; the search stopped (see "
                    f"{storage.join(out_dir, 'trials.csv')}; fix the cause and start it again "
                    f"with --max-trials raised, or --overwrite)")


def wait_when_idle(client) -> None:
    """A worker told to wait (IDLE: trials still run elsewhere) asks again after a pause;
    Keras Tuner's search loop would ask again at once, over and over."""
    create_trial = client.create_trial

    def patient_create_trial(tuner_id):
        trial = create_trial(tuner_id)
        if trial.status == "IDLE":
            time.sleep(2)
        return trial

    client.create_trial = patient_create_trial


@contextlib.contextmanager
def heartbeat(out_dir: str, tuner_id: str):
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


def serve(base, out_dir, space, kind, objective, max_trials, worker_timeout, echo,
          started) -> TuneResult:
    """Serve the oracle to the workers until the search is over.

    Keras Tuner's own chief waits for every worker that ever asked for a trial, forever.
    This one watches the workers' heartbeats: a worker silent for ``worker_timeout`` seconds
    is given up and its trial goes back to the queue (the oracle keeps the other workers
    waiting while a trial may still come back); with no worker heard from for that long,
    the search ends with an error.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # "Reloading Tuner from ...".
        tuner = make_tuner(kind, SpaceOnly(space), objective, max_trials, base.seed,
                           out_dir, overwrite=False, echo=echo)
    oracle = tuner.oracle
    oracle.verbose = 0  # Keras Tuner's own trial tables, printed from the server thread.
    oracle.distributed = True
    tuner.save()  # A chief started again finds the search (Keras Tuner's search() does this).
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server, servicer = _listen(oracle, address)
    echo(f"chief: serving the search in {out_dir} on {address} ({kind}, {max_trials} trials, "
         f"objective {objective}); giving a worker up after {worker_timeout:.0f} s without a "
         f"heartbeat")
    with compat.oracle_lock(oracle):
        finished = {t for t, trial in oracle.trials.items() if trial.status in ENDED}
    watch = _Heartbeats(out_dir, worker_timeout, echo)
    try:
        while True:
            time.sleep(1)
            now = time.time()
            with compat.oracle_lock(oracle):  # A consistent copy: the server thread changes it.
                trials = dict(oracle.trials)
                statuses = {t: trial.status for t, trial in trials.items()}
                registered = set(oracle.tuner_ids)
                busy = bool(oracle.ongoing_trials or oracle.retry_queue)
                failed_run = oracle.failed_run
            # Trials that ended since the last look: a line each, and the results files.
            ended = {t for t, status in statuses.items() if status in ENDED} - finished
            for trial_id in sorted(ended):
                record = read_trial(trial_dir(out_dir, trial_id))
                echo(trial_line(trial_id, statuses[trial_id], trials[trial_id].score, record,
                                best_of(trials, objective), objective, now - started))
            if ended:
                finished |= ended
                write_results(out_dir, trials, space, base, objective)
            watch.look(now, registered, oracle)
            if failed_run and not busy:
                write_results(out_dir, trials, space, base, objective, echo=echo)
                raise failures_error(out_dir, failed_run)
            if servicer.stop_triggered and not busy and not (registered - watch.lost):
                break
            if now - watch.last_heard > worker_timeout:
                raise RunError(
                    f"no worker heard from for {worker_timeout:.0f} s (given up: "
                    f"{', '.join(sorted(watch.lost)) or 'none'}); the finished trials are in "
                    f"{out_dir}; start the chief and the workers again to go on")
    finally:
        server.stop(grace=5)
    with compat.oracle_lock(oracle):
        trials = dict(oracle.trials)
    rows = write_results(out_dir, trials, space, base, objective, echo=echo)
    return TuneResult(out_dir, "chief", rows, 0, time.time() - started)


ENDED = ("COMPLETED", "FAILED", "INVALID")


def _listen(oracle, address: str):
    """A started gRPC server for the oracle at ``address``, and its servicer."""
    # No SO_REUSEPORT: a second chief on the same port must fail, not share the workers.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1),
                         options=[("grpc.so_reuseport", 0)])
    servicer = compat.oracle_servicer(oracle, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RunError(f"cannot listen on {address}: {error}") from None
    if not port:
        raise RunError(f"cannot listen on {address} (in use, or not an address of this "
                       f"machine)")
    server.start()
    return server, servicer


class _Heartbeats:
    """The chief's view of its workers: when each one's heartbeat last changed, which were
    given up (``lost``), and when any was last alive (``last_heard``)."""

    def __init__(self, out_dir: str, timeout: float, echo):
        self.out_dir, self.timeout, self.echo = out_dir, timeout, echo
        self.seen: dict[str, tuple[str, float]] = {}  # tuner id -> (beat, time it changed)
        self.lost: set[str] = set()
        self.last_heard = time.time()

    def look(self, now: float, registered: set, oracle) -> None:
        """Read the heartbeats; give up the workers silent for too long."""
        beats = _beats(self.out_dir)
        for tuner_id in set(beats) | registered:
            beat = beats.get(tuner_id, "")
            if tuner_id not in self.seen or (beat and self.seen[tuner_id][0] != beat):
                self.seen[tuner_id] = (beat, now)
                if tuner_id in self.lost:
                    self.lost.discard(tuner_id)
                    self.echo(f"chief: worker {tuner_id} is back")
        for tuner_id in registered - self.lost:
            if now - self.seen[tuner_id][1] > self.timeout:
                trial = _give_up(oracle, tuner_id)
                self.lost.add(tuner_id)
                self.echo(f"chief: worker {tuner_id} gave no heartbeat for "
                          f"{self.timeout:.0f} s; given up" + (
                              f"; its trial {trial} goes back to the queue" if trial else ""))
        if any(beat and now - at <= self.timeout for beat, at in self.seen.values()):
            self.last_heard = now


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


def _give_up(oracle, tuner_id: str) -> str | None:
    """Forget a dead worker; its running trial goes back to the retry queue."""
    with compat.oracle_lock(oracle):
        oracle.tuner_ids.discard(tuner_id)
        trial = oracle.ongoing_trials.pop(tuner_id, None)
        if trial is None:
            return None
        oracle.retry_queue.append(trial.trial_id)
        oracle.save()
        return trial.trial_id
