"""What a models folder and its version folders vX/ hold: every name, in one place.

models/
    latest.h5                 the newest finished run's model.h5
    vX/
        model.h5, model.keras the model, written last: a run is finished when model.h5 is there
        config.json           the options and what the run resolved
        training_log.txt      the run's log (with FAILED: and how to resume, when it failed)
        training_progress.txt one line per epoch
        report.txt, metrics.json, predictions.csv, *.png   the report set (also in analysis/)
        logs/                 TensorBoard
        UNFINISHED            until the run is finished: how to resume it
        .lock                 while a process trains in it (pid@host)
        checkpoint/           until the run is finished: what --resume reads
        .stage1-cache-*.tfrecord  stage 1's backbone outputs, above the memory budget
"""

LATEST = "latest.h5"
MODEL = "model.h5"
MODEL_KERAS = "model.keras"
CONFIG = "config.json"
LOG = "training_log.txt"
PROGRESS = "training_progress.txt"
LOGS = "logs"
ANALYSIS = "analysis"
UNFINISHED = "UNFINISHED"
LOCK = ".lock"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state.json"
STAGE1_SCRATCH = ".stage1-cache-{split}.tfrecord"
