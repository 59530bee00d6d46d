"""A search's records: each trial's tclf_trial.json, the console lines, and the results
files DIR/trials.csv and DIR/best_hparams.json (a `tclf-train --hparams` file as it is)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

from tclf import InputError, storage
from tclf.training.config import TrainConfig
from tclf.tune.space import OBJECTIVES, tidy

PROJECT = "search"  # Keras Tuner's project folder inside DIR.
TRIAL_FILE = "tclf_trial.json"  # Our record of a trial, beside Keras Tuner's trial.json.


@dataclasses.dataclass
class TuneResult:
    out_dir: str
    role: str  # local, chief or worker
    rows: list
    ran: int  # Trials this process finished.
    seconds: float


def trial_dir(out_dir: str, trial_id: str) -> str:
    return storage.join(out_dir, PROJECT, f"trial_{trial_id}")


def write_trial(trial_dir: str, record: dict) -> None:
    storage.makedirs(trial_dir)
    storage.write_atomic(storage.join(trial_dir, TRIAL_FILE), json.dumps(record, indent=1))


def read_trial(trial_dir: str) -> dict:
    path = storage.join(trial_dir, TRIAL_FILE)
    try:
        return storage.read_json(path) if storage.exists(path) else {}
    except InputError:
        return {}


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def trial_line(trial_id, status, score, record: dict, best, objective: str,
                elapsed: float | None = None) -> str:
    if status == "COMPLETED" and score is not None:
        what = f"completed  {objective} {score:.4f}"
    else:
        what = f"{status.lower()}: {record.get('reason') or 'see its trial.json'}"
    best_text = (f"  best {best.score:.4f} (trial {best.trial_id})"
                 if best is not None and best.score is not None else "")
    seconds = record.get("seconds")
    took = f"  took {duration(seconds)}" if seconds is not None else ""
    since = f"  elapsed {duration(elapsed)}" if elapsed is not None else ""
    return f"trial {trial_id}  {what}{best_text}{took}{since}"


def trial_rows(out_dir: str, trials: dict, space: dict, objective: str) -> list[dict]:
    """One row per trial (``trials``: the oracle's, by id), best first (failed and
    unfinished trials last)."""
    rows = []
    for trial_id, trial in trials.items():
        record = read_trial(trial_dir(out_dir, trial_id))
        status = trial.status
        row = {"trial": trial_id, "status": status,
               "score": trial.score if status == "COMPLETED" else None}
        for name in OBJECTIVES:
            row[name] = (trial.metrics.get_last_value(name)
                         if trial.metrics.exists(name) else None)
        row.update({name: tidy(trial.hyperparameters.values.get(name)) for name in space})
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
        values = base.without_place()
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


def best_of(trials: dict, objective: str):
    done = [t for t in trials.values() if t.status == "COMPLETED" and t.score is not None]
    if not done:
        return None
    pick = max if OBJECTIVES[objective] == "max" else min
    return pick(done, key=lambda t: t.score)
