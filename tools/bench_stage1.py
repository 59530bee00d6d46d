#!/usr/bin/env python
"""Stage 1 with and without the backbone-output cache, timed in one run.

Writes the "stage1" section of BENCHMARKS.md. Usage (after tools/demo.sh, or on any pack):

    .venv/bin/python tools/bench_stage1.py --records records

Each variant runs in its own process: the tclf.training.schedule stage 1 (299x299, batch 32,
float32, --weights none, seed 0) for exactly --epochs epochs (patience = epochs, so early
stopping never ends it), from a freshly built model. "cached" includes the pass that
computes the backbone outputs. Both then evaluate the full model on the validation split,
over segments and over tracks.
"""

from __future__ import annotations

import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import click  # noqa: E402

import benchlib  # noqa: E402


def run_stage1(records_dir: str, cached: bool, epochs: int, batch_size: int,
               image_size: int) -> dict:
    """Stage 1 from scratch on records_dir, with or without the cache (own process)."""
    import tempfile

    import keras

    from tclf.training import backbone_cache, schedule
    from tclf.data import reader, schema
    from tclf.evaluation import evaluate
    from tclf.model import build_model, freeze_backbone, heads_model

    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    manifest = schema.load_manifest(records_dir)
    model = build_model(len(manifest["classes"]), manifest["feature_mean"],
                        manifest["feature_std"], image_size=image_size, weights="none")
    freeze_backbone(model)
    steps = math.ceil(manifest["splits"]["train"]["records"] / batch_size)
    weights = schedule.class_weights(manifest["splits"]["train"]["counts"], manifest["classes"])
    stage = schedule.Stage("stage1", 1e-4, epochs, steps_per_epoch=steps, patience=epochs,
                           class_weight=weights, verbose=0)
    start = time.perf_counter()
    prepare = 0.0
    if cached:
        with tempfile.TemporaryDirectory() as scratch, backbone_cache.backbone_outputs(
                model, records_dir, batch_size, image_size, scratch, progress=False) as outputs:
            prepare = time.perf_counter() - start
            result = schedule.run_stage(heads_model(model), (
                outputs.train.dataset(batch_size, True, 0), outputs.val.dataset(batch_size)),
                stage)
    else:
        result = schedule.run_stage(model, (
            reader.make_dataset(records_dir, "train", batch_size, training=True,
                                image_size=image_size, seed=0, repeat=True),
            reader.make_dataset(records_dir, "val", batch_size, image_size=image_size)), stage)
    seconds = time.perf_counter() - start
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    loss, _ = model.evaluate(reader.make_dataset(records_dir, "val", batch_size,
                                               image_size=image_size), verbose=0)
    scores = evaluate.evaluate_records(model, manifest["classes"], records_dir, "val", batch_size)
    return {"seconds": seconds, "prepare": prepare, "epochs": result.epochs_run,
            "val_accuracy": scores.segment_accuracy, "track_accuracy": scores.track_accuracy,
            "val_loss": float(loss)}


@click.command()
@click.option("--records", "records_dir", default="records", help="Packed records (the demo's).")
@click.option("--epochs", default=10, help="Stage-1 epochs, run in full.")
@click.option("--batch-size", default=32)
@click.option("--image-size", default=299)
@click.option("--section", default="stage1", help="BENCHMARKS.md section to write.")
@click.option("--label", default="the demo pack (tools/demo.sh)",
              help="What the records are, for the section's heading.")
@click.option("--write/--no-write", default=True, help="Update BENCHMARKS.md.")
def main(records_dir, epochs, batch_size, image_size, section, label, write):
    """Time stage 1 with and without the backbone-output cache; update BENCHMARKS.md."""
    from tclf.data import schema

    manifest = schema.load_manifest(records_dir)
    results = {name: benchlib.in_subprocess(__file__, "run_stage1", records_dir, cached, epochs,
                                            batch_size, image_size)
               for name, cached in (("without the cache", False), ("with the cache", True))}
    print(results)
    slow, fast = results["without the cache"], results["with the cache"]
    speedup = slow["seconds"] / fast["seconds"]
    rows = "\n".join(
        f"| {name} | {r['epochs']} | {r['seconds']:.1f} | {r['prepare']:.1f} | "
        f"{r['val_accuracy']:.3f} | {r['track_accuracy']:.3f} | {r['val_loss']:.4f} |" for name, r in results.items())
    body = f"""## Stage 1 with and without the backbone-output cache, {label} (tools/bench_stage1.py)

Machine: {benchlib.machine()}.
Stage 1 ({epochs} epochs, all run; {image_size}x{image_size}, batch {batch_size}, float32,
--weights none, seed 0) on {label}: ({manifest['splits']['train']['records']} training,
{manifest['splits']['val']['records']} validation records), each variant in its own process,
one run. "with the cache" includes the pass that computes the backbone outputs (the
"pass" column). Validation figures: the full model after stage 1 (best epoch restored),
accuracy over segments and over tracks (mean probability of a track's segments).

| stage 1 | epochs | seconds | pass, s | val accuracy, segments | val accuracy, tracks | val loss |
|---|---:|---:|---:|---:|---:|---:|
{rows}

Speed-up: {speedup:.1f}x (target: at least 5x: {benchlib.verdict(speedup, 5.0)}).
"""
    print(body)
    if write:
        benchlib.write_section(section, body)


if __name__ == "__main__":
    main()
