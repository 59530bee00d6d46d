"""The version folder models/vX/ (SPEC section 6): claiming it, its log, its report set.

X is 1 + the largest existing vN, claimed with an atomic mkdir. The folder is complete
when it holds model.h5, written last; a failed run's training_log.txt ends with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import tclf
from tclf import storage

_VERSION = re.compile(r"^v(\d+)$")


def claim_version_dir(models_dir: str) -> tuple[str, int]:
    """Create models/vX with X = 1 + the largest existing vN, atomically.

    Locally, os.mkdir either creates the folder or fails because another run
    got it first, in which case the next number is tried: two runs started
    together never share a folder. Folders not named vN are ignored.
    """
    import tensorflow as tf

    tf.io.gfile.makedirs(models_dir)
    while True:
        numbers = [int(m.group(1)) for n in tf.io.gfile.listdir(models_dir)
                   if (m := _VERSION.match(n.rstrip("/")))]
        number = max(numbers, default=0) + 1
        path = storage.join(models_dir, f"v{number}")
        if "://" in models_dir:  # Object stores have no atomic mkdir; best effort.
            if tf.io.gfile.exists(path):
                continue
            tf.io.gfile.makedirs(path)
            return path, number
        try:
            os.mkdir(path)
            return path, number
        except FileExistsError:
            continue


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _training_log(config, manifest, devices, precision, weights, stages, evaluation=None,
                  started=None, failure=None) -> str:
    lines = [f"tclf {tclf.__version__} training log", ""]
    lines.append(f"started: {_stamp(started)}")
    if stages or evaluation:
        lines.append(f"finished: {_stamp(time.time())}  "
                     f"(duration {time.time() - started:.1f} s)")
    lines += [f"devices: {devices}", f"precision: {precision}", f"records: {config.records}",
              f"classes: {', '.join(manifest['classes'])}",
              "training records per class: " + ", ".join(
                  f"{c}: {manifest['splits']['train']['counts'][c]}" for c in manifest["classes"]),
              "validation records per class: " + ", ".join(
                  f"{c}: {manifest['splits']['val']['counts'][c]}" for c in manifest["classes"]),
              "class weights: " + ", ".join(
                  f"{c}: {weights[i]:.4f}" for i, c in enumerate(manifest["classes"])), ""]
    for stage in stages:
        lines += [f"{stage.name}: {stage.epochs_run} epochs, {_stamp(stage.started)} -> "
                  f"{_stamp(stage.started + stage.seconds)} ({stage.seconds:.1f} s)",
                  f"  stopped: {stage.stop_reason}"]
    if evaluation is not None:
        lines += ["", f"validation accuracy (segments): {evaluation.segment_accuracy:.4f} "
                      f"over {evaluation.num_segments} segments",
                  f"validation accuracy (tracks): {evaluation.track_accuracy:.4f} "
                  f"over {evaluation.num_tracks} tracks",
                  f"validation macro F1 (segments / tracks): {evaluation.segment_macro_f1:.4f} / "
                  f"{evaluation.track_macro_f1:.4f}"]
    if failure:
        lines += ["", f"FAILED: {failure}", "No model.h5 was written; latest.h5 is unchanged."]
    lines += ["", "options:"] + [f"  {k}: {v}" for k, v in dataclasses.asdict(config).items()]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class RunFolder:
    """models/vX/ while a run writes it: its paths, stages so far and training_log.txt."""

    folder: str
    config: object  # tclf.train.TrainConfig
    manifest: dict
    devices: str
    precision: str
    class_weights: dict
    started: float
    stages: list = dataclasses.field(default_factory=list)

    @classmethod
    def claim(cls, config, manifest, devices, precision, class_weights,
              started) -> "RunFolder":
        folder, _ = claim_version_dir(config.models)
        storage.makedirs(storage.join(folder, "analysis"))
        run = cls(folder, config, manifest, devices, precision, class_weights, started)
        run.write_log()
        return run

    def path(self, *names: str) -> str:
        return storage.join(self.folder, *names)

    def log_text(self, evaluation=None, failure=None) -> str:
        return _training_log(self.config, self.manifest, self.devices, self.precision,
                             self.class_weights, self.stages, evaluation, self.started, failure)

    def write_log(self) -> None:
        storage.write_atomic(self.path("training_log.txt"), self.log_text())

    def record(self, evaluation) -> dict:
        """config.json, also stored in model.h5: the options and what the run resolved."""
        return {**dataclasses.asdict(self.config), "classes": self.manifest["classes"],
                "devices": self.devices, "extraction": self.manifest.get("extraction"),
                "resolved_precision": self.precision, "tclf_version": tclf.__version__,
                "version_dir": self.folder, "evaluation": evaluation.to_dict()}

    def fail(self, error: BaseException) -> None:
        """End training_log.txt with the reason; the folder stays without model.h5."""
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else (
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        try:
            storage.write_atomic(self.path("training_log.txt"), self.log_text(failure=reason))
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass


def write_report_set(run: RunFolder, evaluation) -> None:
    """report.txt, confusion_matrix.png, accuracy.png, loss.png, config.json and
    training_log.txt in vX/, and the report set again in vX/analysis/ (SPEC section 6)."""
    from tclf import plots, reports

    title = (f"{os.path.basename(run.folder.rstrip('/'))}: validation split of "
             f"{run.config.records}")
    written = reports.write_evaluation(evaluation, run.folder, title=title)
    for metric in ("accuracy", "loss"):
        written.append(run.path(f"{metric}.png"))
        plots.plot_history([s.history for s in run.stages], metric, written[-1],
                           stage_names=["stage 1 (frozen)", "stage 2 (fine-tune)"])
    storage.write_atomic(run.path("config.json"),
                         json.dumps(run.record(evaluation), indent=1, default=str))
    written.append(run.path("training_log.txt"))
    storage.write_atomic(written[-1], run.log_text(evaluation))
    for path in written:
        storage.publish(path, run.path("analysis", os.path.basename(path)))
