"""The version folder models/vX/ : claiming it, its log, its report set,
and finding an unfinished one to resume.

X is 1 + the largest existing vN, claimed with an atomic mkdir. The folder is complete
when it holds model.h5, written last. Until then it holds UNFINISHED (a note saying how to
resume it) and checkpoint/ (tclf.training.checkpoints), both removed when the run completes;
a run that failed with an error also ends training_log.txt with the reason. While a process
trains in it, .lock names that process, so that a resume never runs beside a live run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import tclf
from tclf import RunError, faults, storage
from tclf.data import schema
from tclf.evaluation import plots, reports
from tclf.training import layout
from tclf.training.backbone_cache import remove_scratch
from tclf.training.checkpoints import Checkpoint

_VERSION = re.compile(r"^v(\d+)$")


def claim_version_dir(models_dir: str) -> tuple[str, int]:
    """Create models/vX with X = 1 + the largest existing vN, atomically.

    Locally the folder is created atomically, so two runs started together never share
    one: the loser tries the next number. Folders not named vN are ignored.
    """
    storage.makedirs(models_dir)
    while True:
        numbers = [int(m.group(1)) for n in storage.listdir(models_dir)
                   if (m := _VERSION.match(n))]
        number = max(numbers, default=0) + 1
        path = storage.join(models_dir, f"v{number}")
        if storage.make_new_dir(path):
            return path, number


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _training_log(config, pack, devices, precision, weights, stages, evaluation=None,
                  started=None, failure=None, resumed=(), resume_command="") -> str:
    lines = [f"tclf {tclf.__version__} training log", ""]
    lines.append(f"started: {_stamp(started)}")
    lines += [f"resumed: {_stamp(when)}" for when in resumed]
    if stages or evaluation:
        lines.append(f"finished: {_stamp(time.time())}  "
                     f"(duration {time.time() - started:.1f} s)")
    lines += [f"devices: {devices}", f"precision: {precision}", f"records: {config.records}",
              f"classes: {', '.join(pack.classes)}",
              "training records per class: " + ", ".join(
                  f"{c}: {pack.split('train').counts[c]}" for c in pack.classes),
              "validation records per class: " + ", ".join(
                  f"{c}: {pack.split('val').counts[c]}" for c in pack.classes),
              "class weights: " + ", ".join(
                  f"{c}: {weights[i]:.4f}" for i, c in enumerate(pack.classes)), ""]
    for stage in stages:
        if not stage.epochs_run and stage.stop_reason.startswith("skipped"):
            lines.append(f"{stage.name}: {stage.stop_reason}")
            continue
        prepared = (f", of which {stage.prepare_seconds:.1f} s computing the backbone outputs"
                    if getattr(stage, "prepare_seconds", 0) else "")
        lines += [f"{stage.name}: {stage.epochs_run} epochs, {_stamp(stage.started)} -> "
                  f"{_stamp(stage.started + stage.seconds)} ({stage.seconds:.1f} s{prepared})",
                  f"  stopped: {stage.stop_reason}"]
    if evaluation is not None:
        lines += ["", f"validation accuracy (segments): {evaluation.segment_accuracy:.4f} "
                      f"over {evaluation.num_segments} segments",
                  f"validation accuracy (tracks): {evaluation.track_accuracy:.4f} "
                  f"over {evaluation.num_tracks} tracks",
                  f"validation macro F1 (segments / tracks): {evaluation.segment_macro_f1:.4f} / "
                  f"{evaluation.track_macro_f1:.4f}",
                  f"calibration temperature: {evaluation.temperature:.4f} (track ECE "
                  f"{evaluation.track_ece:.4f})"]
    lines += ["", "options:"] + [f"  {k}: {v}" for k, v in dataclasses.asdict(config).items()]
    if failure:
        lines += ["", f"FAILED: {failure}", "No model.h5 was written; latest.h5 is unchanged.",
                  f"To continue this run from its last completed epoch: {resume_command}"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class RunFolder:
    """models/vX/ while a run writes it: its paths, stages so far, training_log.txt, its
    UNFINISHED note and lock, and its checkpoint (tclf.training.checkpoints.Checkpoint)."""

    folder: str
    config: object  # tclf.training.config.TrainConfig
    pack: object  # tclf.data.schema.Pack
    devices: str
    precision: str
    class_weights: dict
    started: float
    stages: list = dataclasses.field(default_factory=list)
    resumed: list = dataclasses.field(default_factory=list)  # When it was resumed.
    checkpoint: object = None

    @classmethod
    def claim(cls, config, pack, devices, precision, class_weights,
              started) -> "RunFolder":
        """A new models/vX/ for a run, locked by this process, with its checkpoint started."""
        folder, _ = claim_version_dir(config.models)
        _lock(folder)
        run = cls(folder, config, pack, devices, precision, class_weights, started)
        try:
            storage.write_atomic(run.path(layout.UNFINISHED), run.unfinished_note())
            storage.makedirs(run.path(layout.ANALYSIS))
            run.checkpoint = Checkpoint(folder)
            run.checkpoint.start(dataclasses.asdict(config), precision,
                                 {"started": started, "records_created": pack.stamp,
                                  "records_path": config.records if storage.is_remote(
                                      config.records) else os.path.abspath(config.records)})
            run.write_log()
        except BaseException as error:  # E.g. a full disk: the folder says why, unlocked.
            run.fail(error)
            raise
        return run

    @classmethod
    def reopen(cls, folder, config, pack, devices, precision, class_weights,
               checkpoint) -> "RunFolder":
        """An unfinished models/vX/ whose run continues in this process (``--resume``)."""
        _lock(folder)
        storage.remove_dead_staging(folder)  # What a kill mid-write left (model.tmp-*.h5).
        saved = checkpoint.state["run"]
        if saved.get("records_created") != pack.stamp:
            _unlock(folder)
            raise RunError(f"{config.records} was packed again since {folder} started "
                           f"(manifest created {pack.stamp}, the run used the one "
                           f"created {saved.get('records_created')}); a resumed run must read "
                           f"the same records: start a new run")
        run = cls(folder, config, pack, devices, precision, class_weights,
                  saved["started"], resumed=[*saved.get("resumed", []), time.time()],
                  checkpoint=checkpoint)
        checkpoint.state["run"]["resumed"] = run.resumed
        checkpoint.write_state()
        run.write_log()
        return run

    @property
    def name(self) -> str:
        return os.path.basename(self.folder.rstrip("/"))

    def path(self, *names: str) -> str:
        return storage.join(self.folder, *names)

    def resume_command(self) -> str:
        return f"tclf-train --resume {self.name} --models-dir {self.config.models}"

    def unfinished_note(self) -> str:
        return (f"This training run has not finished: it is running, or it was interrupted.\n"
                f"A run is complete when its folder holds model.h5.\n"
                f"To continue it from its last completed epoch: {self.resume_command()}\n")

    def log_text(self, evaluation=None, failure=None) -> str:
        return _training_log(self.config, self.pack, self.devices, self.precision,
                             self.class_weights, self.stages, evaluation, self.started, failure,
                             self.resumed, self.resume_command())

    def write_log(self) -> None:
        storage.write_atomic(self.path(layout.LOG), self.log_text())

    def record(self, evaluation) -> dict:
        """config.json, also stored in model.h5: the options and what the run resolved."""
        return {**dataclasses.asdict(self.config), "classes": list(self.pack.classes),
                "devices": self.devices, "extraction": self.pack.extraction,
                "resolved_precision": self.precision, "tclf_version": tclf.__version__,
                "library_versions": tclf.library_versions(),
                "version_dir": self.folder, "evaluation": evaluation.to_dict()}

    def complete(self) -> None:
        """model.h5 is written: drop the checkpoint, the UNFINISHED note and the lock."""
        if self.checkpoint is not None:
            self.checkpoint.remove()
        remove_scratch(self.folder)  # Left by a killed stage 1, if any.
        faults.point("train.checkpoint_removed")
        storage.remove_dead_staging(self.folder)  # Left by a kill mid-write before a resume.
        storage.remove_quietly(self.path(layout.UNFINISHED))
        faults.point("train.unfinished_removed")
        _unlock(self.folder)

    def fail(self, error: BaseException) -> None:
        """End training_log.txt with the reason; the folder stays without model.h5, with its
        checkpoint, to be resumed."""
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else (
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        try:
            storage.write_atomic(self.path(layout.LOG), self.log_text(failure=reason))
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        _unlock(self.folder)


# ---------------------------------------------------------------------------
# Unfinished runs: the lock, and finding one to resume.
# ---------------------------------------------------------------------------


def _owner() -> str:
    import socket

    return f"{os.getpid()}@{socket.gethostname()}"


def _lock(folder: str, busy: str = "is being trained") -> None:
    """Mark ``folder`` as worked on by this process; refuse if a live process holds it
    (the message says the folder ``busy`` by that process).

    Locally the lock file is created with O_EXCL; a lock left by a process that no longer
    runs on this host is taken over. On remote storage (no O_EXCL) it is best effort.
    """
    import socket

    path = storage.join(folder, layout.LOCK)
    if storage.is_remote(folder):
        storage.write_atomic(path, _owner())
        return
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_text(path)
            pid, _, host = owner.partition("@")
            if (host == socket.gethostname() and pid.isdigit()
                    and not storage.process_alive(int(pid))):
                storage.remove_quietly(path)  # Its process is gone: a stale lock.
                continue
            raise RunError(f"{folder} {busy} by process {owner or '?'} (its "
                           f"{layout.LOCK} file); wait for it, or delete that file if the "
                           f"process is gone") from None
        with os.fdopen(descriptor, "w") as f:
            f.write(_owner())
        return


def lock_folder(folder: str, busy: str) -> None:
    """:func:`_lock` for other commands' folders (a search's --out); :func:`unlock_folder`
    ends it."""
    _lock(folder, busy)


def unlock_folder(folder: str) -> None:
    _unlock(folder)


def _unlock(folder: str) -> None:
    path = storage.join(folder, layout.LOCK)
    if storage.is_remote(folder) or _read_text(path) == _owner():
        storage.remove_quietly(path)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _versions(models_dir: str) -> list[tuple[int, str]]:
    """(N, name) of the vN folders in models_dir, newest first."""
    names = storage.listdir(models_dir)
    return sorted(((int(m.group(1)), n) for n in names if (m := _VERSION.match(n))),
                  reverse=True)


def _trained_now(folder: str) -> bool:
    """Whether a live process on this host holds the folder's lock."""
    import socket

    if storage.is_remote(folder):
        return False
    pid, _, host = _read_text(storage.join(folder, layout.LOCK)).partition("@")
    return host == socket.gethostname() and pid.isdigit() and storage.process_alive(int(pid))


def unfinished_runs(models_dir: str) -> list[str]:
    """The vN folders of models_dir that have a checkpoint and no model.h5 and that no live
    process is training, newest first."""
    found = []
    for _, name in _versions(models_dir):
        folder = storage.join(models_dir, name)
        if (not storage.exists(storage.join(folder, layout.MODEL))
                and storage.exists(storage.join(folder, layout.CHECKPOINT, layout.CHECKPOINT_STATE))
                and not _trained_now(folder)):
            found.append(folder)
    return found


def find_resumable(models_dir: str, which: str | None = None) -> str:
    """The folder ``tclf-train --resume [which]`` continues: ``which`` is vN, N or a folder
    path; None means the newest unfinished run in models_dir."""
    if which is None:
        found = unfinished_runs(models_dir)
        if not found:
            raise RunError(f"no unfinished run to resume in {models_dir} (a vN folder without "
                           f"model.h5 that has a checkpoint/ folder)")
        return found[0]
    folder = _folder_named(models_dir, which)
    if not storage.exists(folder):
        raise RunError(f"{folder}: no such run folder to resume")
    if storage.exists(storage.join(folder, layout.MODEL)):
        raise RunError(f"{folder} has finished (it holds model.h5): nothing to resume")
    return folder


# ---------------------------------------------------------------------------
# The end of a run: model.h5 written, then latest.h5, then the cleanup. A kill after model.h5
# leaves a finished run whose publication a later run or --resume completes.
# ---------------------------------------------------------------------------

_LEFT_BY_A_RUN = (layout.UNFINISHED, layout.LOCK)


def unpublished_runs(models_dir: str) -> list[str]:
    """The vN folders of models_dir that hold model.h5 and still what their run removes at
    its very end (UNFINISHED, checkpoint/, .lock), with no live process in them, oldest
    first: runs killed after writing model.h5."""
    found = []
    for _, name in reversed(_versions(models_dir)):
        folder = storage.join(models_dir, name)
        if (storage.exists(storage.join(folder, layout.MODEL)) and not _trained_now(folder)
                and any(storage.exists(storage.join(folder, n))
                        for n in (*_LEFT_BY_A_RUN, layout.CHECKPOINT))):
            found.append(folder)
    return found


def finish_publication(folder: str, models_dir: str) -> str:
    """Complete the end of a run killed after its model.h5: latest.h5 becomes its model if
    no newer version has finished, then what the run would have removed goes. Returns a
    line saying what was done."""
    _lock(folder)  # Takes over the dead run's lock; refuses a live one's.
    try:
        name = os.path.basename(folder.rstrip("/"))
        newer = [n for number, n in _versions(models_dir)
                 if number > int(name[1:]) and storage.exists(
                     storage.join(models_dir, n, layout.MODEL))]
        latest = storage.join(models_dir, layout.LATEST)
        if newer:
            done = f"latest.h5 left to the newer {newer[0]}"
        else:
            storage.publish(storage.join(folder, layout.MODEL), latest)
            done = "latest.h5 is its model.h5"
        storage.rmtree(storage.join(folder, layout.CHECKPOINT), ignore_errors=True)
        remove_scratch(folder)
        storage.remove_dead_staging(folder)
        storage.remove_dead_staging(models_dir)  # A latest.h5 copy cut short.
        storage.remove_quietly(storage.join(folder, layout.UNFINISHED))
    finally:
        _unlock(folder)
    return f"{folder} had finished (model.h5) when it was stopped; completed its end: {done}"


def _folder_named(models_dir: str, which: str) -> str:
    """The run folder ``--resume which`` names: vN, N or a folder path."""
    if which.isdigit() or _VERSION.match(which):
        return storage.join(models_dir, which if which.startswith("v") else f"v{which}")
    return which


def finish_if_unpublished(models_dir: str, which: str | None = None) -> str | None:
    """``--resume [which]`` of a run killed after its model.h5: complete its end and say so
    (None: not such a run). Without ``which``, when no run is unfinished: every such run."""
    if which is None:
        if unfinished_runs(models_dir):
            return None
        return "\n".join(tidy_models_dir(models_dir)) or None
    folder = _folder_named(models_dir, which)
    if os.path.normpath(folder) in map(os.path.normpath, unpublished_runs(models_dir)):
        return finish_publication(folder, models_dir)
    return None


def private_copy(folder: str, parent: str) -> str:
    """A copy of run ``folder`` in ``parent`` for a cluster's worker other than the chief:
    the checkpoint and the notes, not the chief's lock, logs, reports or stage-1 scratch."""
    copy = storage.join(parent, os.path.basename(folder.rstrip("/")))
    storage.copytree(folder, copy, exclude=(
        layout.LOCK, layout.LOGS, layout.ANALYSIS,
        *(layout.STAGE1_SCRATCH.format(split=side) for side in schema.SPLITS)))
    return copy


def tidy_models_dir(models_dir: str) -> list[str]:
    """Before a run: complete the runs killed after their model.h5, oldest first, and remove
    the staging files of dead processes (a latest.h5 copy cut short). Lines saying what."""
    if not storage.exists(models_dir):
        return []
    said = []
    for folder in unpublished_runs(models_dir):
        try:
            said.append(finish_publication(folder, models_dir))
        except RunError:  # Locked by a live process of another host, at its own end.
            continue
    said += [f"removed {storage.join(models_dir, name)}, left by a stopped run"
             for name in storage.remove_dead_staging(models_dir)]
    return said


def write_report_set(run: RunFolder, evaluation) -> None:
    """report.txt, confusion_matrix.png, accuracy.png, loss.png, config.json and
    training_log.txt in vX/, and the report set again in vX/analysis/ ."""
    title = (f"{os.path.basename(run.folder.rstrip('/'))}: validation split of "
             f"{run.config.records}")
    written = reports.write_evaluation(evaluation, run.folder, title=title)
    for metric in ("accuracy", "loss"):
        written.append(run.path(f"{metric}.png"))
        plots.plot_history([s.history for s in run.stages], metric, written[-1],
                           stage_names=["stage 1 (frozen)", "stage 2 (fine-tune)"])
    storage.write_atomic(run.path(layout.CONFIG),
                         json.dumps(run.record(evaluation), indent=1, default=str))
    written.append(run.path(layout.LOG))
    storage.write_atomic(written[-1], run.log_text(evaluation))
    for path in written:
        storage.publish(path, run.path(layout.ANALYSIS, os.path.basename(path)))
