#!/usr/bin/env python
"""Benchmark the data path: extraction speed and reader throughput.

Writes the "pipeline" section of BENCHMARKS.md. Every ratio is taken within
this one run. Usage (after tools/setup.sh):

    .venv/bin/python tools/bench_pipeline.py            # synthetic demo tracks
    .venv/bin/python tools/bench_pipeline.py --tracks 24 --naive-segments 12

Measured:
  * reader records/s, uncached (epoch 2) and cached (epoch 2, after the cache
    filled), versus a naive per-file loader (PIL + np.load, one process) over
    the same samples, and versus the decode ceiling: one core's rate of
    tf.io.decode_png over the same PNG bytes in a plain loop, times the cores;
  * extraction segments/s with --jobs 1 and --jobs 2, and versus a naive
    extractor (each librosa feature on the raw audio, tonnetz via CQT, a
    matplotlib figure saved per PNG).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402
import numpy as np  # noqa: E402

import benchlib  # noqa: E402

# Every measurement is repeated ROUNDS times, alternating with the others, and the best
# round is kept: the shared machines are noisy, and noise only ever slows a round down.
ROUNDS = 3


def naive_extract_segment(path: str, start: float, out_png: str) -> np.ndarray:
    """What one would write first: every feature from the raw audio, a figure per PNG."""
    import librosa
    import librosa.display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, sr = librosa.load(path, sr=22050, offset=start, duration=10.0)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=128), ref=np.max)
    fig = plt.figure(figsize=(2.99, 2.99), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")
    librosa.display.specshow(mel, sr=sr, ax=ax)
    fig.savefig(out_png)
    plt.close(fig)
    columns = [
        librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20),
        librosa.feature.chroma_stft(y=y, sr=sr),
        librosa.feature.tonnetz(y=y, sr=sr),  # Chroma via the CQT.
        librosa.feature.spectral_centroid(y=y, sr=sr),
        librosa.feature.spectral_bandwidth(y=y, sr=sr),
        librosa.feature.spectral_rolloff(y=y, sr=sr),
        librosa.feature.zero_crossing_rate(y),
        librosa.feature.rms(y=y),
    ]
    tempo, _ = librosa.beat.beat_track(y=y, sr=sr)
    frames = min(c.shape[1] for c in columns)
    stacked = np.vstack([c[:, :frames] for c in columns])
    windows = np.array_split(np.arange(frames), 10)
    return np.array([np.r_[stacked[:, w].mean(axis=1), float(np.atleast_1d(tempo)[0])]
                     for w in windows], np.float32)


def bench_extraction(audio_dir: str, naive_segments: int) -> dict:
    from tclf import audio, extract

    extract._warm_up({})  # Imports and JIT, outside the timings.
    rates = {1: 0.0, 2: 0.0}
    segments = {}
    for _ in range(ROUNDS):  # Alternate the settings; keep each one's best round.
        for jobs in (1, 2):
            out = tempfile.mkdtemp(prefix="bench-extract-")
            start = time.perf_counter()
            summary = extract.extract(audio_dir, out, jobs=jobs, progress=False)
            seconds = time.perf_counter() - start
            segments[jobs] = sum(summary.segments.values())
            rates[jobs] = max(rates[jobs], segments[jobs] / seconds)
            shutil.rmtree(out)
    # The naive extractor on the first tracks' segments (it is slow).
    tracks = sorted(glob.glob(os.path.join(audio_dir, "*", "*.wav")))
    out = tempfile.mkdtemp(prefix="bench-naive-")
    import soundfile as sf

    jobs_list = []
    for path in tracks:
        duration = sf.info(path).duration
        jobs_list += [(path, s) for s in audio.segment_starts(duration)]
    jobs_list = jobs_list[:naive_segments]
    naive_extract_segment(*jobs_list[0], os.path.join(out, "warm.png"))  # Warm up.
    naive = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i, (path, offset) in enumerate(jobs_list):
            features = naive_extract_segment(path, offset, os.path.join(out, f"{i}.png"))
            np.save(os.path.join(out, f"{i}.npy"), features)
        naive = max(naive, len(jobs_list) / (time.perf_counter() - start))
    shutil.rmtree(out)
    return {"jobs1": rates[1], "jobs2": rates[2], "naive": naive, "segments": segments[1],
            "naive_segments": len(jobs_list)}


def bench_reader(data_dir: str, records_dir: str, epochs: int = 3) -> dict:
    import tensorflow as tf
    from PIL import Image

    from tclf import data, records

    manifest = records.load_manifest(records_dir)
    count = manifest["splits"]["train"]["records"]

    def rate(dataset, repeats=epochs):
        for _ in dataset:  # Epoch 1: builds the pipeline (and fills a cache).
            pass
        start = time.perf_counter()
        for _ in range(repeats):
            for _ in dataset:
                pass
        return count * repeats / (time.perf_counter() - start)

    def stream_rate(dataset, amount=2 * count):
        iterator, got = iter(dataset), 0
        while got < count:  # One epoch's worth to start up.
            got += int(next(iterator)[1].shape[0])
        start, got = time.perf_counter(), 0
        while got < amount:
            got += int(next(iterator)[1].shape[0])
        return got / (time.perf_counter() - start)

    # The decode ceiling: one core decoding the same PNG bytes in a plain loop, times cores.
    description = records.feature_description(manifest["feature_shape"])
    pngs = [tf.io.parse_single_example(r, description)[records.SPECTROGRAM_KEY]
            for path in data.shard_paths(records_dir, "train", manifest)
            for r in tf.data.TFRecordDataset(path)]
    for png in pngs[:20]:
        tf.io.decode_png(png, channels=3)

    def one_core_rate():
        start = time.perf_counter()
        for png in pngs:
            tf.io.decode_png(png, channels=3)
        return len(pngs) / (time.perf_counter() - start)

    # For scale: the same loop in one thread per core at once (decode_png releases the GIL).
    import threading

    def threaded_rate():
        def loop():
            for png in pngs:
                tf.io.decode_png(png, channels=3)

        threads = [threading.Thread(target=loop) for _ in range(os.cpu_count())]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return len(pngs) * len(threads) / (time.perf_counter() - start)

    measures = {
        # As tclf-train reads: one continuous, shuffled stream (repeat=True).
        "uncached": lambda: stream_rate(data.make_dataset(records_dir, "train", 32,
                                                          training=True, repeat=True)),
        "uncached_epoch": lambda: rate(data.make_dataset(records_dir, "train", 32,
                                                         training=True), repeats=1),
        "cached": lambda: rate(data.make_dataset(records_dir, "train", 32, training=True,
                                                 cache=True), repeats=epochs * 2),
        "one_core": one_core_rate,
        "threaded": threaded_rate,
    }
    best = dict.fromkeys(measures, 0.0)
    for _ in range(ROUNDS):
        for name, measure in measures.items():
            best[name] = max(best[name], measure())
    uncached, uncached_epoch, cached, one_core, threaded = (
        best[k] for k in ("uncached", "uncached_epoch", "cached", "one_core", "threaded"))
    ceiling = one_core * os.cpu_count()

    # The naive loader: PIL + np.load per file, one process, over the same training samples.
    train_tracks = set(manifest["splits"]["train"]["tracks"])
    pairs = [(p, p[:-4] + ".npy") for p in sorted(glob.glob(os.path.join(data_dir, "*", "*",
                                                                         "part_*.png")))
             if "/".join(p.split(os.sep)[-3:-1]) in train_tracks]
    naive = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for png, npy in pairs:
            np.asarray(Image.open(png).convert("RGB"))
            np.load(npy)
        naive = max(naive, len(pairs) / (time.perf_counter() - start))
    return {"uncached": uncached, "uncached_epoch": uncached_epoch, "cached": cached, "one_core": one_core, "ceiling": ceiling,
            "threaded": threaded,
            "naive": naive, "records": count, "png_kb": np.mean([len(p.numpy()) for p in pngs])
            / 1024}


@click.command()
@click.option("--tracks", default=16, help="Synthetic tracks per style (75 s each).")
@click.option("--copies", default=3,
              help="The reader reads each extracted track this many times (symlinked copies), "
                   "so that an epoch is long enough to time.")
@click.option("--naive-segments", default=12, help="Segments timed for the naive extractor.")
@click.option("--write/--no-write", default=True, help="Update BENCHMARKS.md.")
def main(tracks, copies, naive_segments, write):
    """Benchmark extraction and the tf.data reader; update BENCHMARKS.md."""
    from tclf import demo, records

    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    audio_dir, data_dir, records_dir = (os.path.join(work, n) for n in ("audio", "data", "rec"))
    demo.make_demo_audio(audio_dir, tracks_per_style=tracks, duration=75.0, seed=123)
    ex = bench_extraction(audio_dir, naive_segments)
    print(f"extraction: {ex}")
    from tclf import extract

    extracted = os.path.join(work, "extracted")
    extract.extract(audio_dir, extracted, progress=False)
    for class_name in os.listdir(extracted):
        if not os.path.isdir(os.path.join(extracted, class_name)):
            continue  # extract.json
        for track in os.listdir(os.path.join(extracted, class_name)):
            for copy in range(copies):
                target = os.path.join(data_dir, class_name, f"{track}_{copy}")
                os.makedirs(target)
                for name in os.listdir(os.path.join(extracted, class_name, track)):
                    os.symlink(os.path.join(extracted, class_name, track, name),
                               os.path.join(target, name))
    records.pack(data_dir, records_dir, val_fraction=0.2, progress=False)
    rd = bench_reader(data_dir, records_dir)
    print(f"reader: {rd}")
    shutil.rmtree(work)

    cores = os.cpu_count()
    body = f"""## Data pipeline (tools/bench_pipeline.py)

Machine: {benchlib.machine()}.
Each figure is the best of {ROUNDS} rounds, the rounds of all measurements interleaved.
Data: {3 * tracks} synthetic 75 s tracks (tclf/demo.py), 6 segments each. The reader reads the
training split of those tracks packed {copies} times over ({rd['records']} records, PNGs of
{rd['png_kb']:.0f} kB on average; files in the page cache).

| reader | records/s | ratio | target |
|---|---:|---:|---|
| decode ceiling (1 core x {cores}, tf.io.decode_png loop, no I/O) | {rd['ceiling']:.0f} | 1.00 | |
| for scale: the same loop in {cores} threads at once | {rd['threaded']:.0f} | {rd['threaded'] / rd['ceiling']:.2f} x ceiling | |
| tclf reader, uncached, shuffled stream as tclf-train reads it (repeat=True) | {rd['uncached']:.0f} | {rd['uncached'] / rd['ceiling']:.2f} x ceiling | >= 0.9 x ceiling: {benchlib.verdict(rd['uncached'] / rd['ceiling'], 0.9)} |
| tclf reader, uncached, epoch by epoch (repeat=False; each epoch restarts the pipeline) | {rd['uncached_epoch']:.0f} | {rd['uncached_epoch'] / rd['ceiling']:.2f} x ceiling | |
| naive loader (PIL + np.load per file, 1 process) | {rd['naive']:.0f} | 1.00 | |
| tclf reader, cached epoch | {rd['cached']:.0f} | {rd['cached'] / rd['naive']:.1f} x naive | >= 20 x naive: {benchlib.verdict(rd['cached'] / rd['naive'], 20)} |

| extraction | segments/s | per core | ratio | target |
|---|---:|---:|---:|---|
| naive extractor (librosa per feature, CQT tonnetz, matplotlib figure per PNG), 1 process, {ex['naive_segments']} segments | {ex['naive']:.2f} | {ex['naive']:.2f} | 1.00 | |
| tclf-extract --jobs 1 ({ex['segments']} segments) | {ex['jobs1']:.1f} | {ex['jobs1']:.1f} | {ex['jobs1'] / ex['naive']:.1f} x naive | >= 8/s per core: {benchlib.verdict(ex['jobs1'], 8)}; >= 4 x naive: {benchlib.verdict(ex['jobs1'] / ex['naive'], 4)} |
| tclf-extract --jobs 2 | {ex['jobs2']:.1f} | {ex['jobs2'] / 2:.1f} | {ex['jobs2'] / ex['jobs1']:.2f} x jobs 1 | >= 1.8 x jobs 1: {benchlib.verdict(ex['jobs2'] / ex['jobs1'], 1.8)} |

Spread between runs on this VM (the last runs of this script, same code): the streaming
reader measured 0.77-0.91 x ceiling and --jobs 2 measured 1.81-1.95 x --jobs 1. The reader
target (0.9) is therefore NOT reliably met. In isolated experiments the same stream without
its record shuffle measured about 0.9 x; a prefetch on each side of the shuffle (now in
tclf.data) recovered most of that shuffle's cost there, but not reliably in this script. The bare decode loop in 2 threads
reached 0.87-1.16 x the 1-core x 2 ceiling, so part of the gap is this machine's noise.
"""
    print(body)
    if write:
        benchlib.write_section("pipeline", body)


if __name__ == "__main__":
    main()
