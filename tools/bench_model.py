#!/usr/bin/env python
"""Benchmark training steps and prediction on this machine's CPU.

Writes the "training" and "prediction" sections of BENCHMARKS.md. Usage
(after tools/setup.sh; prediction uses models/latest.h5 from tools/demo.sh):

    .venv/bin/python tools/bench_model.py --records records --model models/latest.h5

Training: records/s of train steps (stage 1, frozen backbone, 299x299, batch
32) for float32, the auto precision and mixed_bfloat16, and the share of the
step loop spent waiting for the input pipeline (time blocked in next() on
the real tf.data reader, over the whole loop).

Prediction: seconds per minute of audio for tclf-predict on demo tracks,
split between feature extraction (decode + analysis) and the model.
"""

from __future__ import annotations

import glob
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402

import benchlib  # noqa: E402


def train_steps(records_dir: str, precision: str, steps: int, batch_size: int) -> dict:
    """Time stage-1 train steps fed by the real reader. Runs in its own process per policy."""
    import keras
    import numpy as np

    from tclf.data import reader, records
    from tclf.training import train
    from tclf.model import build_model, freeze_backbone

    keras.mixed_precision.set_global_policy(precision)
    manifest = records.load_manifest(records_dir)
    model = build_model(len(manifest["classes"]), manifest["feature_mean"],
                        manifest["feature_std"], weights="none")
    freeze_backbone(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    dataset = reader.make_dataset(records_dir, "train", batch_size, training=True, repeat=True,
                                drop_remainder=True)
    iterator = iter(dataset)
    for _ in range(2):  # Trace and warm up.
        x, y = next(iterator)
        model.train_on_batch(x, y)
    waiting = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        x, y = next(iterator)
        waiting += time.perf_counter() - tick
        model.train_on_batch(x, y)
    total = time.perf_counter() - start
    del np, train
    return {"records_per_s": steps * batch_size / total, "wait_share": waiting / total}


def step_rate(stage: int, precision: str, jit_compile, image_size: int = 299,
              batch_size: int = 32, steps: int = 10, warmup: int = 3, seed: int = 0) -> dict:
    """records/s of one stage's train steps on in-memory batches, on any Keras backend.

    No input pipeline: what the device itself consumes. Stage 1: backbone frozen;
    stage 2: its last 20 layers trainable. Imports no TensorFlow unless Keras runs on it
    (tools/gpu_check.py uses this on JAX and PyTorch). Each step copies the batch from host
    memory, as training does.
    """
    import keras
    import numpy as np

    from tclf.model import build_model, freeze_backbone, unfreeze_top

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = {"spectrogram": rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                     dtype=np.uint8),
         "features": rng.standard_normal((batch_size, 10, 68)).astype(np.float32)}
    y = rng.integers(0, 3, batch_size)
    model = build_model(3, image_size=image_size, weights="none")
    if stage == 1:
        freeze_backbone(model)
    else:
        unfreeze_top(model, 20)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                  jit_compile=jit_compile)
    started = time.perf_counter()
    for _ in range(warmup):  # Trace / compile.
        model.train_on_batch(x, y)
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)  # Returns host floats: each step is synchronized.
    seconds = time.perf_counter() - started
    return {"records_per_s": steps * batch_size / seconds, "warmup_s": compile_seconds,
            # What compile made of jit_compile: Keras turns XLA off for models it cannot
            # compile, e.g. GRUs on cuDNN under TensorFlow.
            "jit_effective": bool(model.jit_compile),
            "loss": float(np.asarray(loss).ravel()[0]), "backend": keras.backend.backend(),
            "tensorflow_imported": "tensorflow" in sys.modules}


def bench_training(records_dir: str, steps: int, batch_size: int) -> dict:
    from tclf.training.devices import resolve_precision

    auto = resolve_precision("auto", on_gpu=False)
    results = {}
    for precision in dict.fromkeys(["float32", auto, "mixed_bfloat16"]):
        # A fresh process per policy: Keras' global policy and TF's caches do not leak across.
        results[precision] = benchlib.in_subprocess(__file__, "train_steps", records_dir,
                                                    precision, steps, batch_size)
        print(precision, results[precision])
    return {"auto": auto, "results": results}


def bench_prediction(model_path: str, audio_files: list[str]) -> dict:
    import soundfile as sf

    from tclf import predict
    from tclf.model import load_model

    model, classes = load_model(model_path)
    predict.predict_paths(audio_files[:1], model=model, class_names=classes)  # Warm up.
    result = predict.predict_paths(audio_files, model=model, class_names=classes)
    minutes = sum(sf.info(f).duration for f in audio_files) / 60.0
    segments = sum(len(t.segments) for t in result.tracks)
    return {"minutes": minutes, "seconds": result.seconds, "analysis": result.analysis_seconds,
            "model": result.model_seconds, "tracks": len(result.tracks), "segments": segments}


@click.command()
@click.option("--records", "records_dir", default="records", help="Packed records (299x299).")
@click.option("--model", "model_path", default="models/latest.h5", help="Model for prediction.")
@click.option("--audio", "audio_dir", default="audio", help="Audio files for prediction.")
@click.option("--steps", default=8, help="Timed train steps per precision.")
@click.option("--batch-size", default=32)
@click.option("--tracks", default=12, help="Audio files timed for prediction.")
@click.option("--write/--no-write", default=True, help="Update BENCHMARKS.md.")
def main(records_dir, model_path, audio_dir, steps, batch_size, tracks, write):
    """Benchmark train-step throughput and prediction; update BENCHMARKS.md."""
    tr = bench_training(records_dir, steps, batch_size)
    files = sorted(glob.glob(os.path.join(audio_dir, "*", "*.wav")))[::3][:tracks]
    pr = bench_prediction(model_path, files)
    print(pr)
    base = tr["results"]["float32"]["records_per_s"]
    rows = "\n".join(
        f"| {p}{' (auto)' if p == tr['auto'] else ''} | {r['records_per_s']:.1f} | "
        f"{r['records_per_s'] / base:.2f} | {100 * r['wait_share']:.1f}% |"
        for p, r in tr["results"].items())
    worst_wait = max(r["wait_share"] for r in tr["results"].values())
    native = ("native bfloat16 (AVX512-BF16/AMX)" if tr["auto"] == "mixed_bfloat16" else
              "no native bfloat16 (no AVX512-BF16/AMX): bfloat16 is emulated")
    other = "without" if tr["auto"] == "mixed_bfloat16" else "with"
    other_policy = "float32" if tr["auto"] == "mixed_bfloat16" else "mixed_bfloat16"
    training = f"""## Training steps on CPU (tools/bench_model.py)

Machine: {benchlib.machine()}.
Stage-1 train steps (frozen EfficientNetB0, 299x299, batch {batch_size}, {steps} timed steps
after 2 warm-up steps), fed by the tf.data reader over {records_dir}/. "Input wait" is the
share of the loop spent blocked on the reader's next batch (target: under 5%:
{benchlib.verdict(0.05 - worst_wait, 0)}).

| precision | records/s | vs float32 | input wait |
|---|---:|---:|---:|
{rows}

auto resolves to {tr['auto']} on this CPU, which has {native}. On a CPU {other} those flags
auto picks {other_policy}, and on GPUs mixed_float16 (docs/commands.md#precision has the table).
"""
    prediction = f"""## Prediction (tools/bench_model.py)

Machine: {benchlib.machine()}.
tclf-predict on {pr['tracks']} synthetic demo tracks ({pr['minutes']:.1f} min of audio,
{pr['segments']} segments of 10 s), model {model_path} (299x299, float32, CPU).

| measure | value |
|---|---:|
| seconds per minute of audio, total | {pr['seconds'] / pr['minutes']:.2f} |
| of which feature extraction (decode, spectrogram, features) | {pr['analysis'] / pr['minutes']:.2f} ({100 * pr['analysis'] / pr['seconds']:.0f}%) |
| of which the model | {pr['model'] / pr['minutes']:.2f} ({100 * pr['model'] / pr['seconds']:.0f}%) |

Only 6 segments of 10 s are analysed per track, so long tracks cost little more than short
ones: per track it is {pr['seconds'] / pr['tracks']:.2f} s.
"""
    print(training, prediction)
    if write:
        benchlib.write_section("training", training)
        benchlib.write_section("prediction", prediction)


if __name__ == "__main__":
    main()
