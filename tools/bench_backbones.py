#!/usr/bin/env python
"""The cost of each backbone on this machine's CPU: its stage-1 pass and a stage-2 step.

Writes the "backbones" section of BENCHMARKS.md. Usage (after tools/setup.sh):

    .venv/bin/python tools/bench_backbones.py

For EfficientNetB0 (299x299x3 uint8) and musicnn (626x96 uint16 log-mel, 10 s), each in its
own process, float32 and the `--precision auto` policy, batch 32, on random inputs of the
stored kind (the arithmetic does not depend on the values): records/s of the frozen
backbone's forward pass (stage 1's one pass over the pack), and of stage 2's training step
(the whole model, the backbone's top --stage2-layers 20 trainable, BatchNormalization
frozen). A stage-2 epoch over N records takes about N / that rate.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402

import benchlib  # noqa: E402

BACKBONES = ("efficientnetb0", "musicnn")
DEV_TRAIN_RECORDS = 1485  # The dev corpus's split 0 (tools/bench_quality.py).


def rates(backbone: str, precision: str, steps: int, batch_size: int) -> dict:
    """Records/s of the backbone pass and of a stage-2 step. Runs in its own process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tclf.data import audio
    from tclf.model import backbone_of, build_model, image_encoder, unfreeze_top
    from tclf.training.devices import resolve_precision

    policy = resolve_precision(precision, on_gpu=False)
    keras.mixed_precision.set_global_policy(policy)
    shape = audio.spectrogram_shape(backbone)
    dtype, top = ("uint8", 255) if shape[2] == 3 else ("uint16", 30000)
    rng = np.random.default_rng(0)
    inputs = {"spectrogram": rng.integers(0, top, (batch_size, *shape)).astype(dtype),
              "features": rng.standard_normal((batch_size, *audio.FEATURE_SHAPE)).astype("float32")}
    labels = rng.integers(0, 3, batch_size)
    model = build_model(3, backbone=backbone, weights="none")
    backbone_of(model).trainable = False
    encode = tf.function(lambda x: image_encoder(model)(x, training=False))

    def timed(step) -> float:
        step()  # Traced and warmed up.
        started = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * batch_size / (time.perf_counter() - started)

    passed = timed(lambda: encode(inputs["spectrogram"]).numpy())
    unfreeze_top(model, 20)
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
    trained = timed(lambda: model.train_on_batch(inputs, labels))
    return {"policy": policy, "pass": passed, "stage2": trained}


@click.command()
@click.option("--steps", default=4, show_default=True, help="Timed batches per measurement.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--write/--no-write", default=True, help="Update BENCHMARKS.md.")
def main(steps, batch_size, write):
    rows = []
    for backbone in BACKBONES:
        for precision in ("float32", "auto"):
            result = benchlib.in_subprocess(__file__, "rates", backbone, precision, steps,
                                            batch_size)
            rows.append((backbone, result))
            click.echo(f"{backbone} {precision}: {result}", err=True)
    lines = ["## The backbones' cost (tools/bench_backbones.py)", "",
             f"Machine: {benchlib.machine()}. CPU only, batch {batch_size}, {steps} timed "
             f"batches after one untimed, random inputs of the stored kind.", "",
             "| backbone | policy | stage-1 backbone pass, records/s | stage-2 step "
             f"(top 20 layers), records/s | a stage-2 epoch of {DEV_TRAIN_RECORDS} records |",
             "|---|---|---:|---:|---:|"]
    for backbone, r in rows:
        lines.append(f"| {backbone} | {r['policy']} | {r['pass']:.1f} | {r['stage2']:.1f} | "
                     f"{DEV_TRAIN_RECORDS / r['stage2']:.0f} s |")
    body = "\n".join(lines)
    click.echo(body)
    if write:
        benchlib.write_section("backbones", body)


if __name__ == "__main__":
    main()
