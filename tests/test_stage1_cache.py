"""Stage 1 on backbone outputs computed once (tclf.training.backbone_cache), the backbone in inference
mode in both stages, and both stages on one TensorBoard epoch axis."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tclf.training import backbone_cache, schedule, train
from tclf.data import schema
from tclf.model import (backbone_of, build_model, freeze_backbone, heads_model, image_encoder,
                        unfreeze_top)
from tests.conftest import TINY_TRAINING

SMALL = dict(image_size=32, weights="none", image_units=8, gru_units=8, gru2_units=8,
             feature_units=8, fusion_units=8, head_units=8, attention_heads=2)


def _model(records_dir):
    import keras

    keras.utils.set_random_seed(0)
    manifest = schema.load_manifest(records_dir)
    return build_model(len(manifest["classes"]), manifest["feature_mean"],
                       manifest["feature_std"], **SMALL)


def test_the_backbone_computes_as_in_inference_in_both_stages():
    model = build_model(3, **SMALL)
    encoder = image_encoder(model)
    batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    inference = encoder(batch, training=False).numpy()
    for prepare in (freeze_backbone, lambda m: unfreeze_top(m, 40)):
        prepare(model)
        first, second = (encoder(batch, training=True).numpy() for _ in range(2))
        np.testing.assert_array_equal(first, second)
        np.testing.assert_allclose(first, inference, atol=1e-6)
    # Stage 2 does train backbone layers: the flag is not "frozen" in disguise.
    assert backbone_of(model).trainable_weights


def test_stage1_on_cached_outputs_trains_the_heads_and_not_the_backbone(records_dir, tmp_path):
    model = _model(records_dir)
    freeze_backbone(model)
    heads = heads_model(model)
    backbone_before = [w.copy() for w in backbone_of(model).get_weights()]
    heads_before = [w.copy() for w in heads.get_weights()]
    manifest = schema.load_manifest(records_dir)
    with backbone_cache.backbone_outputs(model, records_dir, 8, 32, str(tmp_path),
                                         progress=False) as cached:
        assert cached.train.records == manifest["splits"]["train"]["records"]
        assert cached.val.records == manifest["splits"]["val"]["records"]
        result = schedule.run_stage(
            heads, (cached.train.dataset(8, True, 0), cached.val.dataset(8)), schedule.Stage(
                "stage1", learning_rate=1e-2, epochs=2, steps_per_epoch=3, patience=8,
                verbose=0))
        heads_probabilities = heads.predict(cached.val.dataset(8), verbose=0)
    assert result.epochs_run == 2
    for before, after in zip(backbone_before, backbone_of(model).get_weights()):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(heads_before, heads.get_weights()))
    # The full model, which shares the heads' layers, predicts what the heads did.
    from tclf.data import reader

    full = model.predict(reader.make_dataset(records_dir, "val", 8, image_size=32), verbose=0)
    np.testing.assert_allclose(full, heads_probabilities, atol=1e-5)


def test_above_the_memory_budget_a_scratch_file_is_used_and_always_removed(records_dir,
                                                                            tmp_path):
    model = _model(records_dir)
    with backbone_cache.backbone_outputs(model, records_dir, 8, 32, str(tmp_path),
                                         progress=False) as in_memory:
        expected = [(x[schema.FEATURES_KEY].numpy(), x["backbone_output"].numpy(), y.numpy())
                    for x, y in in_memory.val.dataset(8)]
    with backbone_cache.backbone_outputs(model, records_dir, 8, 32, str(tmp_path),
                                         memory_mb=0, progress=False) as on_disk:
        assert on_disk.val.arrays is None and os.path.exists(on_disk.val.path)
        got = [(x[schema.FEATURES_KEY].numpy(), x["backbone_output"].numpy(), y.numpy())
               for x, y in on_disk.val.dataset(8)]
        batch, _ = next(iter(on_disk.train.dataset(8, training=True, seed=0)))
        assert batch["backbone_output"].shape == (8, 1280)
    assert not [n for n in os.listdir(tmp_path) if "stage1-cache" in n]
    for (f1, o1, y1), (f2, o2, y2) in zip(expected, got):
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_allclose(o1, o2, atol=1e-6)
        np.testing.assert_array_equal(y1, y2)
    with pytest.raises(RuntimeError, match="stopped"):
        with backbone_cache.backbone_outputs(model, records_dir, 8, 32, str(tmp_path),
                                             memory_mb=0, progress=False):
            assert [n for n in os.listdir(tmp_path) if "stage1-cache" in n]
            raise RuntimeError("stopped")
    assert not [n for n in os.listdir(tmp_path) if "stage1-cache" in n]


def test_both_stages_share_one_tensorboard_epoch_axis(trained):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs = [stage.epochs_run for stage in trained.stages]
    logs = EventAccumulator(os.path.join(trained.version_dir, "logs", "train"),
                            size_guidance={"tensors": 0})
    logs.Reload()
    steps = [event.step for event in logs.Tensors("epoch_loss")]
    assert steps == list(range(sum(epochs)))
    stages = [float(tf.make_ndarray(e.tensor_proto)) for e in logs.Tensors("epoch_stage")]
    assert stages == [1.0] * epochs[0] + [2.0] * epochs[1]
    losses = [float(tf.make_ndarray(e.tensor_proto)) for e in logs.Tensors("epoch_loss")]
    history = trained.stages[0].history["loss"] + trained.stages[1].history["loss"]
    np.testing.assert_allclose(losses, history, rtol=1e-5)


@pytest.mark.slow
def test_runs_with_and_without_the_cache_complete_and_a_failing_one_leaves_no_scratch(
        records_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    uncached = train.train(train.TrainConfig(records=records_dir, models=str(models),
                                             **{**TINY_TRAINING, "stage1_cache": False}))
    assert uncached.stages[0].prepare_seconds == 0 and os.path.exists(uncached.model_path)
    log = open(os.path.join(uncached.version_dir, "training_log.txt")).read()
    assert "stage1_cache: False" in log and "computing the backbone outputs" not in log

    def fail(*args, **kwargs):
        raise RuntimeError("stage 2 failed")

    monkeypatch.setattr(schedule, "unfreeze_top", fail)  # The first step of stage 2.
    with pytest.raises(RuntimeError, match="stage 2 failed"):
        train.train(train.TrainConfig(records=records_dir, models=str(models),
                                      **{**TINY_TRAINING, "stage1_cache_mb": 0.0}))
    failed = models / "v2"
    assert "computing the backbone outputs" in (failed / "training_log.txt").read_text()
    assert not [n for n in os.listdir(failed) if "stage1-cache" in n]
