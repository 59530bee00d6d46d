"""Precision and devices: the model under every dtype policy, `--precision auto`, several devices.

Every test here names the policy and the devices it runs; only the resolve_precision tests
exercise `auto`, by faking what it looks at. TCLF_TEST_GPUS (default "none") moves the
training runs onto GPUs (tools/gpu_check.sh sets it to "all").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tclf.data import reader, records
from tclf.training import devices, train
from tclf import model as tclf_model
from tests.conftest import TEST_GPUS, TINY_TRAINING

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Layers compared with float32, and the largest difference allowed, as a share of the
# layer's largest float32 value: a little over what each half type's rounding gives.
COMPARED_LAYERS = ("feature_normalization", "gru_1", "self_attention", "gru_2", "fusion_dense",
                   "style")
TOLERANCE = {"float32": 1e-6, "mixed_float16": 0.01, "mixed_bfloat16": 0.05}


@pytest.fixture
def policy_scope():
    """Set a global dtype policy inside a test; the previous one comes back after it."""
    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


def _hz_statistics(columns=68, seed=0):
    """Feature statistics like a real pack's: columns 53-58 (centroid, bandwidth, roll-off) in
    Hz, with standard deviations of 300-2,900 Hz, i.e. variances above float16's 65,504."""
    rng = np.random.default_rng(seed)
    mean, std = rng.uniform(-50, 50, columns), rng.uniform(0.05, 20, columns)
    mean[53:59] = [3000.0, 900.0, 2500.0, 700.0, 6000.0, 1500.0]
    std[53:59] = [1500.0, 480.0, 1000.0, 300.0, 2900.0, 800.0]
    return mean, std


def _inputs(mean, std, count=4, size=32, seed=1):
    rng = np.random.default_rng(seed)
    return {"spectrogram": rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
            "features": (mean + std * rng.standard_normal((count, 10, len(mean))))
            .astype(np.float32)}


def _layer_outputs(model, inputs, names):
    probe = keras.Model(model.inputs, {n: model.get_layer(n).output for n in names})
    return {k: np.asarray(v, np.float32) for k, v in probe.predict(inputs, verbose=0).items()}


# ---------------------------------------------------------------------------------------------
# --precision auto: each branch, with what it looks at faked.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, on_gpu, expected", [
    ("fpu sse avx2 avx512f", False, "float32"),  # AMD EPYC here: no native bfloat16.
    ("fpu sse avx2 avx512f avx512_bf16", False, "mixed_bfloat16"),  # Cooper Lake and later.
    ("fpu sse avx2 amx_bf16 amx_tile", False, "mixed_bfloat16"),  # Sapphire Rapids (AMX).
    ("fpu sse avx2", True, "mixed_float16"),  # A GPU wins whatever the CPU.
    ("fpu avx512_bf16", True, "mixed_float16"),
])
def test_auto_precision_follows_the_cpu_flags_and_the_gpu(tmp_path, monkeypatch, flags, on_gpu,
                                                          expected):
    monkeypatch.delenv(devices.CPU_BFLOAT16_ENV, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2)))
    monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
    assert devices.resolve_precision("auto", on_gpu=on_gpu) == expected


def test_auto_precision_cpu_check_unreadable_or_forced(tmp_path, monkeypatch):
    monkeypatch.delenv(devices.CPU_BFLOAT16_ENV, raising=False)
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "missing"))
    assert devices.resolve_precision("auto", on_gpu=False) == "float32"
    monkeypatch.setenv(devices.CPU_BFLOAT16_ENV, "1")
    assert devices.resolve_precision("auto", on_gpu=False) == "mixed_bfloat16"
    monkeypatch.setenv(devices.CPU_BFLOAT16_ENV, "0")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: avx512_bf16 amx_bf16\n")
    monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
    assert devices.resolve_precision("auto", on_gpu=False) == "float32"
    monkeypatch.setenv(devices.CPU_BFLOAT16_ENV, "yes")
    with pytest.raises(ValueError, match=devices.CPU_BFLOAT16_ENV):
        devices.resolve_precision("auto", on_gpu=False)


def test_explicit_precision_is_kept_and_unknown_refused():
    for precision in POLICIES:
        assert devices.resolve_precision(precision, on_gpu=False) == precision
        assert devices.resolve_precision(precision, on_gpu=True) == precision
    with pytest.raises(ValueError, match="precision must be one of"):
        devices.resolve_precision("float8")


def test_a_failing_run_puts_the_global_policy_back(tmp_path, policy_scope):
    policy_scope("float32")
    config = train.TrainConfig(records=str(tmp_path / "no-records"), models=str(tmp_path / "m"),
                               **{**TINY_TRAINING, "precision": "mixed_float16"})
    with pytest.raises(FileNotFoundError, match="manifest"):
        train.train(config)
    assert keras.mixed_precision.global_policy().name == "float32"


# ---------------------------------------------------------------------------------------------
# The model under each policy, without training.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_feature_normalization_is_exact_under_every_policy(policy, policy_scope):
    """Under mixed_float16 Keras' Normalization used to turn the Hz columns' variances into inf
    and output 0 for them; under mixed_bfloat16 it rounded means and values to 8 bits."""
    policy_scope(policy)
    mean, std = _hz_statistics()
    model = tclf_model.build_model(3, mean, std, image_size=32, weights="none")
    inputs = _inputs(mean, std)
    normalized = _layer_outputs(model, inputs, ["feature_normalization"])["feature_normalization"]
    expected = (inputs["features"].astype(np.float64) - mean) / std
    spectral = normalized[..., 53:59]
    assert np.abs(spectral).max() > 0.5, "the spectral columns were zeroed"
    np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-5)
    assert model.get_layer("style").compute_dtype == "float32"
    layer = model.get_layer("feature_normalization")
    np.testing.assert_allclose(np.ravel(layer.mean), mean, rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_every_layer_agrees_with_float32_within_the_half_types_rounding(policy, policy_scope):
    """Same weights, same inputs (raw features in Hz): the sequence branch, the attention, the
    fusion and the output stay within rounding of float32, and nothing is inf or nan."""
    mean, std = _hz_statistics()
    inputs = _inputs(mean, std)
    policy_scope("float32")
    keras.utils.set_random_seed(0)
    reference_model = tclf_model.build_model(3, mean, std, image_size=32, weights="none")
    reference = _layer_outputs(reference_model, inputs, COMPARED_LAYERS)
    policy_scope(policy)
    model = tclf_model.build_model(3, mean, std, image_size=32, weights="none")
    model.set_weights(reference_model.get_weights())
    assert model.get_layer("gru_1").compute_dtype == policy.split("_")[1]
    outputs = _layer_outputs(model, inputs, COMPARED_LAYERS)
    for name in COMPARED_LAYERS:
        assert np.isfinite(outputs[name]).all(), name
        scale = np.abs(reference[name]).max()
        assert scale > 1e-3, name  # A meaningful comparison, not of zeros.
        difference = np.abs(outputs[name] - reference[name]).max()
        assert difference <= TOLERANCE[policy] * scale, (name, difference, scale)


# ---------------------------------------------------------------------------------------------
# The precision matrix: a tiny two-stage training under each policy.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def precision_runs(trained, records_dir, tmp_path_factory):
    """The tiny training under each policy (float32 is the shared session run)."""
    runs = {"float32": trained}
    for policy in POLICIES[1:]:
        models = str(tmp_path_factory.mktemp(f"models-{policy}"))
        runs[policy] = train.train(train.TrainConfig(
            records=records_dir, models=models, **{**TINY_TRAINING, "precision": policy}))
    return runs


@pytest.mark.slow
def test_precision_matrix_trains_normalizes_and_reloads(precision_runs, records_dir, tmp_path):
    before = keras.mixed_precision.global_policy().name
    manifest = records.load_manifest(records_dir)
    features = np.concatenate([x["features"].numpy() for x, _ in reader.make_dataset(
        records_dir, "val", batch_size=16, image_size=32)])
    inputs = {"spectrogram": np.zeros((len(features), 32, 32, 3), np.uint8),
              "features": features}
    expected_normalized = ((features.astype(np.float64) - manifest["feature_mean"])
                           / np.where(np.asarray(manifest["feature_std"]) > 1e-6,
                                      manifest["feature_std"], 1.0))
    reference = _layer_outputs(precision_runs["float32"].model, inputs,
                               ["feature_normalization"])["feature_normalization"]
    np.testing.assert_allclose(reference, expected_normalized, rtol=1e-5, atol=1e-5)

    expected_predictions = {}
    for policy, run in precision_runs.items():
        assert run.precision == policy
        assert f"precision: {policy}" in open(os.path.join(run.version_dir,
                                                           "training_log.txt")).read()
        for stage in run.stages:
            for key in ("loss", "val_loss"):
                assert stage.history[key] and np.isfinite(stage.history[key]).all(), (policy, key)
        assert 0.0 <= run.evaluation.segment_accuracy <= 1.0
        assert run.model.get_layer("gru_1").compute_dtype == ("float32" if policy == "float32"
                                                              else policy.split("_")[1])
        normalized = _layer_outputs(run.model, inputs,
                                    ["feature_normalization"])["feature_normalization"]
        # 1e-4 of a unit-variance column: a zeroed column is off by ~1, a bfloat16-rounded
        # one by ~1e-2.
        np.testing.assert_allclose(normalized, reference, atol=1e-4, err_msg=policy)
        expected_predictions[policy] = run.model.predict(inputs, verbose=0)
        np.testing.assert_allclose(expected_predictions[policy].sum(axis=1), 1.0, atol=1e-3)
    assert keras.mixed_precision.global_policy().name == before  # train() put it back.

    # Each model.h5 in a fresh process (plain Keras) predicts what the trained model predicted.
    np.savez(tmp_path / "inputs.npz", **inputs)
    paths = {policy: run.model_path for policy, run in precision_runs.items()}
    script = f"""
import json, numpy as np, keras
inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
for policy, path in json.loads({json.dumps(paths)!r}).items():
    model = keras.models.load_model(path, compile=False)
    np.save({str(tmp_path)!r} + f"/{{policy}}.npy", model.predict(inputs, verbose=0))
    print(policy, model.get_layer("gru_1").compute_dtype,
          model.get_layer("feature_normalization").compute_dtype)
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for policy in POLICIES:
        compute = "float32" if policy == "float32" else policy.split("_")[1]
        assert f"{policy} {compute} float32" in done.stdout
        # Same kernels in both processes on the CPU; GPU kernels (cuDNN, float16) may differ.
        tolerance = 1e-5 if TEST_GPUS == "none" or policy == "float32" else 1e-3
        np.testing.assert_allclose(np.load(tmp_path / f"{policy}.npy"),
                                   expected_predictions[policy], atol=tolerance, err_msg=policy)


# ---------------------------------------------------------------------------------------------
# More than one device: MirroredStrategy over 2 logical CPU devices.
# ---------------------------------------------------------------------------------------------

_TWO_DEVICE_RUN = """
import json, sys
import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

from tclf.training import train
from tests.conftest import TINY_TRAINING

# Record the batch size each replica's train step receives inside model.fit.
seen = []
original_train_step = tf_trainer.TensorFlowTrainer.train_step

def train_step(self, batch):
    x = batch[0]
    tf.numpy_function(lambda n: seen.append(int(n)) or np.int64(0),
                      [tf.shape(x["features"])[0]], tf.int64, stateful=True)
    return original_train_step(self, batch)

tf_trainer.TensorFlowTrainer.train_step = train_step
records_dir, models = sys.argv[1:3]
config = train.TrainConfig(records=records_dir, models=models,
                           **{**TINY_TRAINING, "cpu_devices": 2})
result = train.train(config)
print("RESULT", json.dumps({
    "replicas": result.replicas, "devices": result.devices, "version_dir": result.version_dir,
    "seen": seen, "history": [s.history for s in result.stages],
    "epochs": [s.epochs_run for s in result.stages],
    "segment_accuracy": result.evaluation.segment_accuracy,
    "logical_cpus": len(tf.config.list_logical_devices("CPU"))}))
"""


@pytest.mark.slow
def test_training_on_two_logical_devices_splits_the_global_batch(records_dir, tmp_path):
    models = tmp_path / "models"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           "TCLF_TEST_GPUS": "none", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", _TWO_DEVICE_RUN, records_dir, str(models)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["logical_cpus"] == 2 and result["replicas"] == 2
    assert "2 logical devices, MirroredStrategy" in result["devices"]
    batch = TINY_TRAINING["batch_size"]
    assert f"global batch {batch} = {batch // 2} per replica" in result["devices"]
    # Each step of model.fit ran once per replica on half of the global batch (the training
    # stream repeats, so every batch is full).
    manifest = records.load_manifest(records_dir)
    steps = -(-manifest["splits"]["train"]["records"] // batch)
    epochs = sum(result["epochs"])
    assert result["seen"] and set(result["seen"]) == {batch // 2}
    assert len(result["seen"]) == 2 * steps * epochs
    # One complete version folder, with sane metrics.
    assert sorted(os.listdir(models)) == ["latest.h5", "v1"]
    assert os.path.exists(models / "v1" / "model.h5")
    log = (models / "v1" / "training_log.txt").read_text()
    assert "2 replicas" in log and "precision: float32" in log
    for history in result["history"]:
        for key in ("loss", "val_loss"):
            assert np.isfinite(history[key]).all() and min(history[key]) < 5.0
        assert all(0.0 <= a <= 1.0 for a in history["accuracy"] + history["val_accuracy"])
    assert 0.0 <= result["segment_accuracy"] <= 1.0


def test_cpu_devices_after_tensorflow_started_is_a_clear_error():
    import tensorflow as tf

    tf.constant(1.0)  # TensorFlow has started in this process with one CPU device.
    with pytest.raises(ValueError, match="before anything else uses TensorFlow"):
        devices.configure_devices("none", cpu_devices=3)
