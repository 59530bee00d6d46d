#!/usr/bin/env python
"""What tclf learns from real music: option sets and two yardsticks, on the same splits.

Writes the "quality" section of BENCHMARKS.md. Usage, after tools/setup.sh, on a folder
CORPUS/<style>/<audio files> of real music, never committed (docs/real-music.md: the one used):

    .venv/bin/python tools/bench_quality.py dev-corpus --work /tmp/tclf-quality

For each option set, the corpus is extracted once (its extraction options), then packed with
every split seed (the same tracks on each side for every set: the split is drawn over track
ids), and tclf-train runs on each pack with every training seed, each run in its own
process, CPU only and float32 (the same arithmetic on every CPU). Each model is scored on
its validation split: segment and track accuracy, track macro F1, and the expected
calibration error (ECE) of the track probabilities, raw (temperature 1) and at the
temperature tclf-train stored; "cross-fitted" fits the temperature on one half of the
validation tracks and measures the other half, both ways, so that it is not scored on what
it was fitted to. The first model of each set also times `tclf predict` on a few tracks.

The yardsticks, on the same validation tracks, each a logistic regression (scikit-learn,
standardized inputs) on one vector a track:
- classic: the mean and standard deviation over the frames of 20 MFCCs, 12 chroma bins,
  spectral centroid, bandwidth, roll-off, 7 contrast bands, zero-crossing rate and RMS
  (librosa, on up to 120 s from the middle of the track);
- musicnn + LR, the first thing a user would try instead of tclf: MSD_musicnn's 200-d
  embedding (tclf's port, the package's weights) of the track's 6 standard segments, each
  10 s as 3 patches of 3 s, averaged.

An option set is "LABEL: EXTRACT OPTIONS | TRAIN OPTIONS" (either side may be empty), e.g.
--set "musicnn: --backbone musicnn |" --set "efficientnetb0: | --weights none".
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402
import numpy as np  # noqa: E402

import benchlib  # noqa: E402

# ImageNet weights cannot be downloaded here: EfficientNetB0 runs with a random backbone.
SETS = ("efficientnetb0 (--weights none): | --weights none",
        "musicnn: --backbone musicnn |")
PREDICT_TRACKS = 12  # Timed with each set's first model.


def parse_set(text: str) -> tuple[str, list[str], list[str]]:
    label, _, options = text.partition(":")
    extract, _, train = options.partition("|")
    return label.strip(), shlex.split(extract), shlex.split(train)


def run(command: list[str], log: str) -> None:
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise click.ClickException(f"failed ({done.returncode}): {shlex.join(command)}; see {log}")


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def extracted(corpus: str, work: str, options: list[str], log: str) -> str:
    key = hashlib.sha256(json.dumps(options).encode()).hexdigest()[:8]
    data = os.path.join(work, f"data-{key}")
    if not os.path.exists(os.path.join(data, ".complete")):
        run([tool("tclf-extract"), corpus, data, "--quiet", *options], log)
        open(os.path.join(data, ".complete"), "w").close()
    return data


def packed(data: str, seed: int, log: str) -> str:
    records = f"{data}-split{seed}"
    if not os.path.exists(os.path.join(records, "manifest.json")):
        run([tool("tclf-pack"), data, records, "--seed", str(seed), "--min-shards", "2",
             "--quiet"], log)
    return records


def score(model_path: str, records: str) -> dict:
    """The validation scores of a model.h5, raw and calibrated."""
    from tclf.evaluation import evaluate
    from tclf.model import load_model, load_temperature

    model, classes = load_model(model_path)
    probabilities, labels, tracks = evaluate.predict_records(model, records, "val")
    temperature = load_temperature(model_path)
    raw = evaluate.evaluate_predictions(probabilities, labels, tracks, classes)
    calibrated = evaluate.evaluate_predictions(probabilities, labels, tracks, classes,
                                               temperature)
    return {"segment_accuracy": raw.segment_accuracy, "track_accuracy": raw.track_accuracy,
            "track_macro_f1": raw.track_macro_f1, "ece_raw": raw.track_ece,
            "ece_calibrated": calibrated.track_ece, "temperature": temperature,
            "ece_cross_fitted": cross_fitted_ece(probabilities, labels, tracks, classes)}


def cross_fitted_ece(probabilities, labels, tracks, classes) -> float:
    """Track ECE with the temperature fitted on the other half of the validation tracks."""
    from tclf.evaluation import calibration, evaluate

    names = sorted(set(tracks))
    half = {name for i, name in enumerate(names) if i % 2 == 0}
    inside = np.array([t in half for t in tracks])
    track_probs, track_labels = [], []
    for fit, measure in ((inside, ~inside), (~inside, inside)):
        temperature = calibration.fit_temperature(probabilities[fit], labels[fit])
        scaled = calibration.apply_temperature(probabilities[measure], temperature)
        probs, labs, _ = evaluate.track_level(scaled, labels[measure],
                                              [t for t, m in zip(tracks, measure) if m])
        track_probs.append(probs)
        track_labels.append(labs)
    return calibration.expected_calibration_error(np.concatenate(track_probs),
                                                  np.concatenate(track_labels))


def train_and_score(records: str, models: str, options: list[str], precision: str,
                    log: str, train: bool = True) -> dict | None:
    """One tclf-train run (reused when its model.h5 is there; not run unless ``train``: None)
    and its validation scores."""
    done = os.path.join(models, "v1", "model.h5")
    marker = os.path.join(models, "seconds")
    if not (os.path.exists(done) and os.path.exists(marker)):
        if not train:
            return None
        started = time.time()
        run([tool("tclf-train"), "--records", records, "--models-dir", models, "--gpus", "none",
             "--precision", precision, "--verbose", "0", *options], log)
        open(marker, "w").write(str(time.time() - started))
    return {**score(done, records), "seconds": float(open(marker).read()),
            "epochs": _epochs(os.path.join(models, "v1", "training_log.txt")),
            "model": done}


def prediction_time(model: str, corpus: str, log: str) -> dict:
    """Seconds of a whole `tclf predict` process on PREDICT_TRACKS tracks of the corpus, and
    per minute of their audio (it reads only their standard segments)."""
    import soundfile

    files = sorted(os.path.join(corpus, c, f) for c in sorted(os.listdir(corpus))
                   if os.path.isdir(os.path.join(corpus, c)) and not c.startswith(".")
                   for f in sorted(os.listdir(os.path.join(corpus, c)))[:PREDICT_TRACKS // 3])
    minutes = sum(soundfile.info(f).duration for f in files) / 60
    started = time.time()
    run([tool("tclf-predict"), "--model", model, "--format", "csv", *files], log)
    seconds = time.time() - started
    return {"tracks": len(files), "seconds": seconds, "per_minute": seconds / minutes,
            "per_track": seconds / len(files)}


def _epochs(log_path: str) -> str:
    import re

    text = open(log_path).read()
    found = dict(re.findall(r"^(stage\d): (\d+) epochs", text, re.M))
    return "+".join(found.get(s, "0") for s in ("stage1", "stage2"))


# ---------------------------------------------------------------------------
# The classic baseline.
# ---------------------------------------------------------------------------


def track_statistics(path: str, seconds: float = 120.0) -> np.ndarray:
    import librosa
    import soundfile

    duration = soundfile.info(path).duration
    offset = max(0.0, duration / 2 - seconds / 2)
    y, sr = librosa.load(path, sr=22050, mono=True, offset=offset, duration=seconds)
    spectrum = np.abs(librosa.stft(y, n_fft=2048, hop_length=512))
    frames = np.vstack([
        librosa.feature.mfcc(S=librosa.power_to_db(librosa.feature.melspectrogram(
            S=spectrum**2, sr=sr)), n_mfcc=20),
        librosa.feature.chroma_stft(S=spectrum**2, sr=sr),
        librosa.feature.spectral_centroid(S=spectrum, sr=sr),
        librosa.feature.spectral_bandwidth(S=spectrum, sr=sr),
        librosa.feature.spectral_rolloff(S=spectrum, sr=sr),
        librosa.feature.spectral_contrast(S=spectrum, sr=sr),
        librosa.feature.zero_crossing_rate(y, frame_length=2048, hop_length=512)[:, :spectrum.shape[1]],
        librosa.feature.rms(S=spectrum, frame_length=2048)])
    return np.concatenate([frames.mean(axis=1), frames.std(axis=1)])


def baseline_features(corpus: str, data: str) -> dict[str, np.ndarray]:
    """Per track id (class/track, as in the manifests): its statistics, from the audio
    file its data folder records (source.json: its name in CORPUS/<class>/)."""
    from tclf.data.extract import read_source

    out = {}
    for label in sorted(os.listdir(data)):
        folder = os.path.join(data, label)
        if not os.path.isdir(folder) or label.startswith("."):
            continue
        for track in sorted(os.listdir(folder)):
            source = read_source(os.path.join(folder, track))
            out[f"{label}/{track}"] = track_statistics(os.path.join(corpus, label, source))
    return out


def musicnn_features(corpus: str, data: str, patch: int | None = 187) -> dict[str, np.ndarray]:
    """Per track id: MSD_musicnn's embedding of its 6 standard segments, each 3 patches of
    187 frames (musicnn's training length), averaged; ``patch`` None: each segment whole
    (626 frames), as tclf's musicnn backbone reads it."""
    from tclf import musicnn
    from tclf.data import audio
    from tclf.data.extract import read_source

    model = musicnn.build(patch)
    out = {}
    for label in sorted(os.listdir(data)):
        folder = os.path.join(data, label)
        if not os.path.isdir(folder) or label.startswith("."):
            continue
        for track in sorted(os.listdir(folder)):
            path = os.path.join(corpus, label, read_source(os.path.join(folder, track)))
            mels = [audio.musicnn_input(y) / audio.MUSICNN_SCALE
                    for _, y in audio.load_segments(path, num_segments=6)]
            patches = np.stack(mels if patch is None else
                               [m[i * patch:(i + 1) * patch] for m in mels
                                for i in range(len(m) // patch)])
            out[f"{label}/{track}"] = model.predict(patches[..., None], verbose=0).mean(axis=0)
    return out


def baseline_scores(features: dict, records: str) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tclf.evaluation import calibration

    manifest = json.load(open(os.path.join(records, "manifest.json")))
    classes = manifest["classes"]

    def arrays(side):
        tracks = manifest["splits"][side]["tracks"]
        return (np.stack([features[t] for t in tracks]),
                np.array([classes.index(t.split("/")[0]) for t in tracks]))

    x_train, y_train = arrays("train")
    x_val, y_val = arrays("val")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(x_train, y_train)
    probabilities = model.predict_proba(x_val)
    predicted = probabilities.argmax(axis=1)
    return {"track_accuracy": float((predicted == y_val).mean()),
            "track_macro_f1": float(f1_score(y_val, predicted, average="macro")),
            "ece_raw": calibration.expected_calibration_error(probabilities, y_val)}


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------


def _mean(rows, key):
    return float(np.mean([r[key] for r in rows]))


def table(results: dict, yardsticks: dict, seeds: list[int], train_seeds: list[int],
          timing: dict) -> str:
    """Every run (split seed x training seed) of every set, then the means and spreads."""
    labels = list(results)
    head = ["split", "train seed"] + [f"{label}: {what}" for label in labels
                                      for what in ("segments", "tracks")]
    head += [f"{name}: tracks" for name in yardsticks]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for i, seed in enumerate(seeds):
        for j, train_seed in enumerate(train_seeds):
            cells = [f"{results[label][i][j][k]:.3f}" if results[label][i][j] else "not run"
                     for label in labels for k in ("segment_accuracy", "track_accuracy")]
            cells += [f"{rows[i]['track_accuracy']:.3f}" if j == 0 else "" for rows in
                      yardsticks.values()]
            lines.append("| " + " | ".join([str(seed), str(train_seed)] + cells) + " |")
    flat = {label: [run for split in results[label] for run in split if run]
            for label in labels}
    cells = [f"**{_mean(flat[label], k):.3f}**" for label in labels
             for k in ("segment_accuracy", "track_accuracy")]
    cells += [f"**{_mean(rows, 'track_accuracy'):.3f}**" for rows in yardsticks.values()]
    lines.append("| **mean** | | " + " | ".join(cells) + " |")
    cells = [f"{min(r[k] for r in flat[label]):.3f}-{max(r[k] for r in flat[label]):.3f}"
             for label in labels for k in ("segment_accuracy", "track_accuracy")]
    cells += [f"{min(r['track_accuracy'] for r in rows):.3f}-"
              f"{max(r['track_accuracy'] for r in rows):.3f}" for rows in yardsticks.values()]
    lines.append("| spread (min-max) | | " + " | ".join(cells) + " |")
    lines += ["", "| option set | track F1 | track ECE raw | track ECE calibrated (in-sample) | "
              "track ECE calibrated (cross-fitted) | epochs (stage 1+2) | training s a run "
              "(mean) | tclf predict: s a track, s a minute of audio |",
              "|---|---:|---:|---:|---:|---|---:|---|"]
    for label in labels:
        rows, t = flat[label], timing[label]
        lines.append(
            f"| {label} | {_mean(rows, 'track_macro_f1'):.3f} | {_mean(rows, 'ece_raw'):.3f} | "
            f"{_mean(rows, 'ece_calibrated'):.3f} | {_mean(rows, 'ece_cross_fitted'):.3f} | "
            f"{', '.join(r['epochs'] for r in rows)} | {_mean(rows, 'seconds'):.0f} | "
            f"{t['per_track']:.2f}, {t['per_minute']:.2f} ({t['tracks']} tracks, "
            f"{t['seconds']:.0f} s with start-up) |")
    for name, rows in yardsticks.items():
        lines.append(f"| {name} | {_mean(rows, 'track_macro_f1'):.3f} | "
                     f"{_mean(rows, 'ece_raw'):.3f} | | | | | |")
    return "\n".join(lines)


@click.command()
@click.argument("corpus", type=click.Path(exists=True, file_okay=False))
@click.option("--work", default="/tmp/tclf-quality", show_default=True,
              help="Extracted data, packs, models and the log (reused when re-run).")
@click.option("--set", "option_sets", multiple=True, default=SETS, show_default=True,
              help="An option set, \"LABEL: EXTRACT OPTIONS | TRAIN OPTIONS\"; repeat for more.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Split seeds of tclf-pack.")
@click.option("--train-seeds", default="0,1", show_default=True,
              help="tclf-train --seed values, each run on every split.")
@click.option("--precision", default="float32", show_default=True)
@click.option("--finished-only", is_flag=True,
              help="Report the runs already trained in --work; train none (missing runs are "
                   "shown as such).")
@click.option("--write/--no-write", default=True, help="Write BENCHMARKS.md's section.")
def main(corpus, work, option_sets, seeds, train_seeds, precision, finished_only, write):
    started = time.time()
    seeds = [int(s) for s in seeds.split(",")]
    train_seeds = [int(s) for s in train_seeds.split(",")]
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "bench_quality.log")
    sets = [parse_set(text) for text in option_sets]
    results, extract_seconds, timing = {}, {}, {}
    for label, extract_options, train_options in sets:
        tick = time.time()
        data = extracted(corpus, work, extract_options, log)
        extract_seconds[label] = time.time() - tick
        runs = {}
        # Every split with the first training seed, then the next seed: a cut-short run
        # still has whole splits.
        for train_seed in train_seeds:
            for seed in seeds:
                models = os.path.join(work, "models", hashlib.sha256(
                    label.encode()).hexdigest()[:8], f"split{seed}-seed{train_seed}")
                outcome = train_and_score(packed(data, seed, log), models,
                                          [*train_options, "--seed", str(train_seed)],
                                          precision, log, train=not finished_only)
                if outcome is None:
                    continue
                runs[seed, train_seed] = outcome
                click.echo(f"{label} split {seed} seed {train_seed}: {json.dumps(outcome)}",
                           err=True)
        results[label] = [[runs.get((seed, t)) for t in train_seeds] for seed in seeds]
        timing[label] = prediction_time(results[label][0][0]["model"], corpus, log)
        if len(runs) < len(seeds) * len(train_seeds):
            click.echo(f"{label}: {len(runs)} of {len(seeds) * len(train_seeds)} runs trained",
                       err=True)
    first = extracted(corpus, work, sets[0][1], log)
    yardsticks, seconds = {}, {}
    for name, vectors in (("classic baseline", baseline_features),
                          ("musicnn + LR", musicnn_features),
                          ("musicnn + LR, whole 10 s", lambda c, d: musicnn_features(c, d, None))):
        tick = time.time()
        features = vectors(corpus, first)
        yardsticks[name] = [baseline_scores(features, packed(first, seed, log))
                            for seed in seeds]
        seconds[name] = time.time() - tick
    tracks = json.load(open(os.path.join(packed(first, seeds[0], log), "manifest.json")))
    minutes = (time.time() - started) / 60
    body = "\n".join([
        "## What tclf learns from real music (tools/bench_quality.py)", "",
        f"Machine: {benchlib.machine()}. CPU only, --precision {precision}.",
        f"Corpus: {corpus} (docs/real-music.md: "
        f"{', '.join(tracks['classes'])}; "
        f"{sum(len(tracks['splits'][s]['tracks']) for s in ('train', 'val'))} tracks), "
        f"{len(seeds)} track splits (tclf-pack --seed {', '.join(map(str, seeds))}), "
        f"{len(tracks['splits']['val']['tracks'])} validation tracks each, 6 segments a "
        f"validation track; tclf-train --seed {', '.join(map(str, train_seeds))} on each.", "",
        *[f"- **{label}**: extract `{shlex.join(e) or '(defaults)'}`, train "
          f"`{shlex.join(t) or '(defaults)'}` (extraction {extract_seconds[label]:.0f} s; "
          f"{sum(bool(r) for split in results[label] for r in split)} of "
          f"{len(seeds) * len(train_seeds)} runs)"
          for label, e, t in sets],
        f"- **classic baseline**: MFCC/chroma/spectral statistics + logistic regression "
        f"({seconds['classic baseline']:.0f} s)",
        f"- **musicnn + LR**: MSD_musicnn embeddings (6 segments x 3 patches a track, "
        f"averaged) + logistic regression ({seconds['musicnn + LR']:.0f} s); \"whole 10 s\": "
        f"each segment's 626 frames at once, as tclf's musicnn backbone reads them "
        f"({seconds['musicnn + LR, whole 10 s']:.0f} s)", "",
        table(results, yardsticks, seeds, train_seeds, timing), "",
        f"Whole run: {minutes:.1f} min."])
    click.echo(body)
    if write:
        benchlib.write_section("quality", body)


if __name__ == "__main__":
    main()
