#!/usr/bin/env python
"""One-off check of tclf on a machine with a GPU; run through tools/gpu_check.sh.

Two modes, picked from what the machine has:

- tensorflow: TensorFlow sees a GPU (a user's training machine). tclf's own code end to end:
  the precision and device tests on the GPU, a tiny two-stage `tclf-train --gpus all
  --precision auto`, the stage-1/stage-2 train-step rates at 299x299 (float32 against
  mixed_float16, XLA jit_compile on and off), the mixed_float16 feature-column check, and
  the reader's records/s on all host cores against the PNG decode ceiling.
- keras-jax / keras-torch: no TensorFlow, but JAX or PyTorch with a GPU. Keras 3 on that
  backend runs tclf's model builder on arrays in memory: the same train-step rates, the
  feature-column check, and the host's PNG decode rate on all cores with PIL.

Both size the input pipeline: records/s the GPU consumes against records/s the host decodes.
Without a GPU it runs what it can on the CPU, says which parts it skipped, and leaves
BENCHMARKS.md alone. With a GPU it writes the "gpu" section of BENCHMARKS.md.
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import click  # noqa: E402

import benchlib  # noqa: E402
import bench_model  # noqa: E402

PYTHON = sys.executable


def _probe(code: str, env=None) -> str | None:
    """Run code in a fresh Python; its last stdout line, or None if it failed."""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


def detect() -> dict:
    """Which mode: TensorFlow with a GPU, Keras on JAX or PyTorch with a GPU, or CPU only."""
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip().replace("\n", "; ") or None
    except (OSError, subprocess.SubprocessError):
        pass
    tf_gpus = _probe("import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))")
    if tf_gpus is not None and int(tf_gpus) > 0:
        return {"mode": "tensorflow", "backend": "tensorflow", "gpu": gpu or f"{tf_gpus} GPU(s)"}
    jax_gpu = _probe("import jax; print(len([d for d in jax.devices() if d.platform == 'gpu']))")
    if jax_gpu is not None and int(jax_gpu) > 0:
        return {"mode": "keras-jax", "backend": "jax", "gpu": gpu or "a JAX GPU"}
    torch_gpu = _probe("import torch; print(int(torch.cuda.is_available()))")
    if torch_gpu == "1":
        return {"mode": "keras-torch", "backend": "torch", "gpu": gpu or "a CUDA GPU"}
    for backend in ("tensorflow", "jax", "torch"):
        if _probe(f"import {backend}; print(1)") == "1":
            return {"mode": f"{'tensorflow' if backend == 'tensorflow' else 'keras-' + backend} "
                            f"(no GPU: CPU only)", "backend": backend, "gpu": None}
    raise SystemExit("gpu_check: none of tensorflow, jax or torch can be imported")


# ---------------------------------------------------------------------------------------------
# Checks. Each returns a dict; "skipped" says why a part did not run.
# ---------------------------------------------------------------------------------------------


def run_tests() -> dict:
    """The precision and device tests, their training runs on the GPU (TCLF_TEST_GPUS=all)."""
    started = time.perf_counter()
    # The two-logical-device test splits the CPU whatever the machine: CI runs it already.
    done = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_precision.py", "-k", "not two_logical_devices"],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TCLF_TEST_GPUS": "all"})
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(done.stdout[-3000:], done.stderr[-2000:] if done.returncode else "", flush=True)
    return {"passed": done.returncode == 0, "summary": summary,
            "seconds": time.perf_counter() - started}


def run_tiny_training(work: str, image_size: int) -> dict:
    """Synthetic tracks -> tclf-extract -> tclf-pack -> tclf-train --gpus all --precision auto."""
    bin_dir = os.path.dirname(PYTHON)
    tool = lambda name: os.path.join(bin_dir, name)  # noqa: E731
    from tclf.training.config import TINY

    audio, data, records, models = (os.path.join(work, n)
                                    for n in ("audio", "data", "records", "models"))
    hparams = os.path.join(work, "tiny.json")
    with open(hparams, "w") as f:
        json.dump({**TINY, "image_size": image_size}, f)
    steps = [
        [PYTHON, os.path.join(ROOT, "tools", "make_demo_data.py"), audio, "--tracks-per-style",
         "4", "--duration", "32", "--seed", "3"],
        [tool("tclf-extract"), audio, data, "--quiet", "--segments", "2"],
        [tool("tclf-pack"), data, records, "--quiet", "--min-shards", "2", "--val-fraction",
         "0.25"],
        [tool("tclf-train"), "--gpus", "all", "--precision", "auto", "--hparams", hparams,
         "--records", records, "--models-dir", models, "--verbose", "0"],
    ]
    started = time.perf_counter()
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"passed": False, "summary": f"{os.path.basename(command[0])} failed: "
                                                f"{(done.stderr.strip() or done.stdout)[-1500:]}"}
    log = open(os.path.join(models, "v1", "training_log.txt")).read()
    progress = open(os.path.join(models, "v1", "training_progress.txt")).read()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in progress.splitlines()]
    pick = lambda key: next(line for line in log.splitlines() if line.startswith(key))  # noqa
    finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
    return {"passed": finite and os.path.exists(os.path.join(models, "v1", "model.h5")),
            "summary": f"{pick('devices:')}; {pick('precision:')}; "
                       f"{pick('validation accuracy (segments)')}; losses finite: {finite}",
            "seconds": time.perf_counter() - started, "records": records}


def run_steps(backend: str, image_size: int, steps: int,
              precisions=("float32", "mixed_float16")) -> dict:
    """Train-step records/s per stage and precision (and XLA on/off where it is a choice)."""
    jits = {"tensorflow": [False, True], "jax": [True], "torch": [False]}[backend]
    rows, refused = [], None
    for stage in (1, 2):
        for precision in precisions:
            for jit in jits:
                if jit and refused:
                    continue
                result = benchlib.in_subprocess(bench_model.__file__, "step_rate", stage,
                                                precision, jit, image_size, 32, steps)
                if jit and not result["jit_effective"]:
                    refused = (f"Keras turned jit_compile=True off for this model on "
                               f"{backend} (cuDNN GRUs cannot be compiled by XLA); those rows "
                               f"would repeat the jit_compile=False ones")
                    print(f"  {refused}", flush=True)
                    continue
                rows.append({"stage": stage, "precision": precision, "jit_compile": jit,
                             **result})
                print(f"  stage {stage} {precision:14s} jit_compile={jit!s:5s} "
                      f"{result['records_per_s']:8.1f} records/s (warm-up "
                      f"{result['warmup_s']:.1f} s)", flush=True)
    return {"rows": rows, "image_size": image_size, "steps": steps, "xla_refused": refused}


def feature_columns(precision: str = "mixed_float16") -> dict:
    """Does the model under ``precision`` see every feature column? Hz-scale statistics (the
    spectral columns' variances exceed float16's range); backend-agnostic."""
    import keras
    import numpy as np

    from tclf.model import build_model

    keras.mixed_precision.set_global_policy(precision)
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(-50, 50, 68), rng.uniform(0.05, 20, 68)
    mean[53:59], std[53:59] = [3000, 900, 2500, 700, 6000, 1500], [1500, 480, 1000, 300, 2900, 800]
    features = (mean + std * rng.standard_normal((8, 10, 68))).astype(np.float32)
    model = build_model(3, mean, std, image_size=32, weights="none")
    probe = keras.Model(model.inputs, [model.get_layer("feature_normalization").output,
                                       model.output])
    inputs = {"spectrogram": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
              "features": features}
    normalized, probabilities = (np.asarray(t, np.float32)
                                 for t in probe.predict(inputs, verbose=0))
    expected = (features - mean) / std
    zeroed = [int(c) for c in range(68) if np.abs(normalized[..., c]).max() == 0.0]
    error = float(np.abs(normalized - expected).max())
    return {"precision": precision, "max_abs_error": error, "zeroed_columns": zeroed,
            "gru_compute_dtype": model.get_layer("gru_1").compute_dtype,
            "outputs_finite": bool(np.isfinite(probabilities).all()),
            "passed": error < 1e-4 and not zeroed and bool(np.isfinite(probabilities).all()),
            "backend": keras.backend.backend(),
            "tensorflow_imported": "tensorflow" in sys.modules}


def _synthetic_pngs(count: int = 16) -> list[bytes]:
    """Spectrogram-like PNGs when no real ones are at hand: harmonic stripes, beats and noise
    in dB, through tclf's own colour map and encoder (an approximation of real content)."""
    import numpy as np

    from tclf.data.audio import encode_png, render_image

    rng = np.random.default_rng(0)
    bands, frames = np.arange(128)[:, None], np.arange(431)[None, :]
    pngs = []
    for i in range(count):
        db = -60 + 10 * rng.standard_normal((128, 431))
        db += 40 * np.exp(-((bands % (12 + i % 5)) ** 2) / 4.0)
        db += 30 * ((frames % (20 + i)) < 3) * np.exp(-bands / 40.0)
        pngs.append(encode_png(render_image(np.clip(db - db.max(), -80, 0))))
    return pngs


def _decode_pil(pngs: list[bytes]) -> int:
    import numpy as np
    from PIL import Image

    for png in pngs:
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return len(pngs)


def run_decode(png_dir: str | None, records: str | None, backend: str, repeats: int = 4) -> dict:
    """The host's PNG decode rate: one core, and all cores (a process per core) with PIL;
    with TensorFlow also tf.io.decode_png per core and tclf's reader on the packed records."""
    source = "synthetic spectrogram-like PNGs"
    paths = sorted(glob.glob(os.path.join(png_dir, "**", "*.png"), recursive=True))[:64] \
        if png_dir else []
    if paths:
        pngs, source = [open(p, "rb").read() for p in paths], f"{len(paths)} PNGs from {png_dir}"
    else:
        pngs = _synthetic_pngs()
    batch = pngs * repeats
    cores = os.cpu_count()
    _decode_pil(pngs[:4])
    started = time.perf_counter()
    _decode_pil(batch)
    one = len(batch) / (time.perf_counter() - started)
    with concurrent.futures.ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode_pil, [pngs[:2]] * cores))  # Start the workers.
        started = time.perf_counter()
        done = sum(pool.map(_decode_pil, [batch] * cores))
        every = done / (time.perf_counter() - started)
    result = {"source": source, "png_kb": sum(map(len, pngs)) / len(pngs) / 1024,
              "cores": cores, "pil_one_core": one, "pil_all_cores": every}
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # Decoding is host work.
        tensors = [tf.constant(p) for p in batch]
        for t in tensors[:4]:
            tf.io.decode_png(t, channels=3)
        started = time.perf_counter()
        for t in tensors:
            tf.io.decode_png(t, channels=3)
        result["tf_ceiling"] = len(tensors) / (time.perf_counter() - started) * cores
        if records:
            from tclf.data import reader

            dataset = reader.make_dataset(records, "train", 32, training=True, repeat=True)
            iterator, got = iter(dataset), 0
            for _ in range(4):
                next(iterator)
            started = time.perf_counter()
            while got < 20 * 32:
                got += int(next(iterator)[1].shape[0])
            result["reader"] = got / (time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def report(info: dict, parts: dict) -> str:
    lines = ["## GPU check (tools/gpu_check.sh)", "",
             f"Mode: **{info['mode']}**; Keras backend: {info['backend']}; "
             f"GPU: {info['gpu'] or 'none'}.",
             f"Machine: {benchlib.machine(gpu=info['gpu'])}.", ""]
    for name, title in (("tests", "Precision and device tests on the GPU "
                                  "(tests/test_precision.py, TCLF_TEST_GPUS=all)"),
                        ("training", "Tiny two-stage tclf-train --gpus all --precision auto")):
        part = parts[name]
        lines.append(f"- {title}: " + (f"skipped ({part['skipped']})" if "skipped" in part else
                                       f"{'passed' if part['passed'] else 'FAILED'}: "
                                       f"{part.get('summary') or part.get('error')}"))
    columns = parts["columns"]
    lines.append("- mixed_float16 model sees every feature column: " + (
        f"skipped ({columns['skipped']})" if "skipped" in columns else
        f"FAILED ({columns['error']})" if "error" in columns else
        f"{'yes' if columns['passed'] else 'NO'} (largest error of the normalized features "
        f"{columns['max_abs_error']:.1e}, zeroed columns {columns['zeroed_columns'] or 'none'}, "
        f"GRU computes in {columns['gru_compute_dtype']}, outputs finite: "
        f"{columns['outputs_finite']}; backend {columns['backend']}, TensorFlow imported: "
        f"{columns['tensorflow_imported']})"))
    lines.append("")
    stepped = parts["steps"]
    if "skipped" in stepped or "error" in stepped:
        lines.append(f"Train-step rates: {'skipped' if 'skipped' in stepped else 'FAILED'} "
                     f"({stepped.get('skipped') or stepped.get('error')}).")
    else:
        base = {(r["stage"], r["jit_compile"]): r["records_per_s"] for r in stepped["rows"]
                if r["precision"] == "float32"}
        size = stepped["image_size"]
        lines += [(f"No GPU: both stages' train steps ran on the CPU at {size}x{size}, float32, "
                   f"as a check that the model builds and trains on this backend (not a "
                   f"benchmark; tools/bench_model.py has the CPU figures):")
                  if stepped.get("cpu_smoke") else
                  (f"Train steps at {size}x{size}, batch 32, on arrays in host memory "
                   f"(copied to the GPU each step; {stepped['steps']} timed steps after 3 "
                   f"warm-up steps; backbone weights random, which does not change the cost):"),
                  "",
                  "| stage | precision | jit_compile (XLA) | records/s | vs float32 | "
                  "warm-up s | TensorFlow imported |", "|---|---|---|---:|---:|---:|---|"]
        for r in stepped["rows"]:
            lines.append(f"| {r['stage']} | {r['precision']} | {r['jit_compile']} | "
                         f"{r['records_per_s']:.0f} | "
                         f"{r['records_per_s'] / base[(r['stage'], r['jit_compile'])]:.2f} | "
                         f"{r['warmup_s']:.1f} | {r['tensorflow_imported']} |")
        if stepped.get("xla_refused"):
            lines += ["", f"XLA: {stepped['xla_refused']}."]
        lines.append("")
    decode = parts["decode"]
    if "error" in decode:
        lines += [f"Host PNG decode: FAILED ({decode['error']}).", ""]
        decode = None
    else:
        lines += [f"Host PNG decode ({decode['source']}, {decode['png_kb']:.0f} kB on average, "
                  f"{decode['cores']} cores):", "", "| decoder | records/s |", "|---|---:|",
                  f"| PIL, one core | {decode['pil_one_core']:.0f} |",
                  f"| PIL, all {decode['cores']} cores (a process each) | "
                  f"{decode['pil_all_cores']:.0f} |"]
        if "tf_ceiling" in decode:
            lines.append(f"| tf.io.decode_png, one core x {decode['cores']} (ceiling) | "
                         f"{decode['tf_ceiling']:.0f} |")
        if "reader" in decode:
            lines.append(f"| tclf reader, uncached training stream, all cores | "
                         f"{decode['reader']:.0f} ({decode['reader'] / decode['tf_ceiling']:.2f} x "
                         f"ceiling) |")
        lines.append("")
    if decode and "rows" in stepped and not stepped.get("cpu_smoke"):
        host = decode.get("reader") or decode["pil_all_cores"]
        host_name = "tclf's reader" if "reader" in decode else "PIL on all cores"
        jits_shown = [r["jit_compile"] for r in stepped["rows"]]
        lines.append("Input pipeline sizing (host records/s over what the GPU consumes; under 1 "
                     "means the GPU waits for the host unless decoded examples are cached):")
        lines.append("")
        for r in stepped["rows"]:
            if r["precision"] == "mixed_float16" and r["jit_compile"] == jits_shown[0]:
                lines.append(f"- stage {r['stage']}, mixed_float16: the GPU takes "
                             f"{r['records_per_s']:.0f} records/s; {host_name} gives "
                             f"{host:.0f}: {host / r['records_per_s']:.2f} x")
    skipped = [name for name, part in parts.items() if "skipped" in part]
    lines += ["", f"Skipped: {', '.join(skipped) if skipped else 'nothing'}."]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--image-size", default=299, show_default=True, help="Spectrogram side.")
@click.option("--steps", default=10, show_default=True, help="Timed train steps per setting.")
@click.option("--pngs", "png_dir", default=None,
              help="Folder of spectrogram PNGs for the decode rate [default: data/ if it has "
                   "any, else the tiny training's, else synthetic ones].")
@click.option("--skip-tests", is_flag=True, help="Do not run tests/test_precision.py.")
@click.option("--write/--no-write", default=True,
              help="Write the gpu section of BENCHMARKS.md (only ever with a GPU).")
@click.option("--out", default=None, help="Also write the report to this file.")
def main(image_size, steps, png_dir, skip_tests, write, out):
    """Check tclf on this machine's GPU (see the module docstring); report what ran."""
    info = detect()
    os.environ["KERAS_BACKEND"] = info["backend"]
    on_gpu, with_tf = info["gpu"] is not None, info["backend"] == "tensorflow"
    print(f"mode: {info['mode']}; backend: {info['backend']}; GPU: {info['gpu'] or 'none'}",
          flush=True)
    parts = {}
    work = tempfile.mkdtemp(prefix="tclf-gpu-check-")
    started = time.perf_counter()

    def attempt(name, title, function, *args):
        """One part; a failure is reported with the others instead of ending the check."""
        print(f"[{len(parts) + 1}/5] {title}", flush=True)
        try:
            parts[name] = function(*args)
        except Exception as error:  # noqa: BLE001 (reported, and the exit status says so)
            parts[name] = {"passed": False, "error": f"{type(error).__name__}: "
                                                     f"{str(error).strip()[-1500:]}"}
        print(f"  {parts[name]}"[:2000], flush=True)

    skip = lambda why: (lambda: {"skipped": why})  # noqa: E731
    attempt("tests", "precision and device tests",
            skip("needs TensorFlow") if not with_tf else skip("--skip-tests") if skip_tests
            else skip("no GPU; bash tools/test.sh runs them on the CPU") if not on_gpu
            else run_tests)
    # Small images: the point is the --gpus all / --precision auto path; step rates are below.
    attempt("training", "tiny two-stage training",
            run_tiny_training if with_tf else skip("tclf-train needs TensorFlow"), work, 64)
    if on_gpu:
        attempt("steps", "train-step rates", run_steps, info["backend"], image_size, steps)
    else:  # The builder and both stages on this backend, small and in float32: not a benchmark.
        attempt("steps", "train steps on the CPU (a smoke test)",
                lambda: {**run_steps(info["backend"], 64, 2, ("float32",)), "cpu_smoke": True})
    attempt("columns", "feature columns under mixed_float16",
            (lambda: benchlib.in_subprocess(__file__, "feature_columns")) if on_gpu or with_tf
            else skip(f"Keras on {info['backend']} has no float16 matrix products on the CPU"))
    if png_dir is None:
        candidates = [os.path.join(ROOT, "data"), os.path.join(work, "data")]
        png_dir = next((d for d in candidates if glob.glob(os.path.join(d, "*", "*", "*.png"))),
                       None)
    attempt("decode", "host PNG decode", benchlib.in_subprocess, __file__, "run_decode",
            png_dir, parts["training"].get("records"), info["backend"])
    text = report(info, parts)
    print("\n" + text + f"\ngpu_check finished in {time.perf_counter() - started:.0f} s")
    if out:
        with open(out, "w") as f:
            f.write(text)
    if on_gpu and write:
        benchlib.write_section("gpu", text)
        print("wrote the gpu section of BENCHMARKS.md")
    elif not on_gpu:
        print("no GPU: BENCHMARKS.md left as it is")
    failed = [n for n, p in parts.items() if p.get("passed") is False]
    if failed:
        raise SystemExit(f"gpu_check: FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
