"""Records and models on a non-local tf.io.gfile filesystem (TensorFlow's in-process ram://):
pack -> train -> eval -> predict, every read and write through tf.io.gfile."""

from __future__ import annotations

import os
import uuid

import pytest

from tclf.evaluation import evaluate
from tclf import model as tclf_model, predict
from tclf.data import records
from tclf.training import train
from tests.conftest import TINY_TRAINING


@pytest.mark.slow
def test_pack_train_eval_predict_with_records_and_models_on_ram(data_dir):
    import tensorflow as tf

    root = f"ram://tclf-{uuid.uuid4().hex[:8]}"
    records_dir, models_dir = f"{root}/records", f"{root}/models"
    manifest = records.pack(data_dir, records_dir, val_fraction=0.25, seed=0, min_shards=2,
                            progress=False)
    assert tf.io.gfile.exists(f"{records_dir}/manifest.json")
    result = train.train(train.TrainConfig(records=records_dir, models=models_dir,
                                           **TINY_TRAINING))
    assert result.version_dir == f"{models_dir}/v1"
    for name in ("model.h5", "training_log.txt", "report.txt", "confusion_matrix.png"):
        assert tf.io.gfile.exists(f"{models_dir}/v1/{name}"), name
    assert tf.io.gfile.exists(f"{models_dir}/latest.h5")
    # A second run: v2, and latest.h5 replaced by its model (ram:// appends to a file that
    # is written again; the staged writes rename instead).
    second = train.train(train.TrainConfig(records=records_dir, models=models_dir,
                                           **{**TINY_TRAINING, "seed": 1}))
    assert second.version_dir == f"{models_dir}/v2"

    def read(path):
        with tf.io.gfile.GFile(path, "rb") as file:
            return file.read()

    assert read(f"{models_dir}/latest.h5") == read(f"{models_dir}/v2/model.h5")
    assert read(f"{models_dir}/latest.h5") != read(f"{models_dir}/v1/model.h5")
    result = second
    model, classes = tclf_model.load_model(f"{models_dir}/latest.h5")
    scores = evaluate.evaluate_records(model, classes, records_dir)
    assert scores.segment_accuracy == pytest.approx(result.evaluation.segment_accuracy)
    track = os.path.join(data_dir, classes[0], sorted(os.listdir(os.path.join(data_dir,
                                                                            classes[0])))[0])
    found = predict.predict_paths([track], f"{models_dir}/latest.h5")
    assert len(found.tracks) == 1 and not found.failed
    assert manifest["classes"] == classes


def test_backbone_weights_from_a_remote_path_leave_no_local_copy(tmp_path, monkeypatch):
    import tempfile

    import numpy as np
    import tensorflow as tf

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = tclf_model.build_backbone(32, weights=None)
    local = str(tmp_path / "backbone.weights.h5")
    source.save_weights(local)
    remote = f"ram://tclf-{uuid.uuid4().hex[:8]}/backbone.weights.h5"
    tf.io.gfile.makedirs(os.path.dirname(remote))
    tf.io.gfile.copy(local, remote)
    os.remove(local)
    loaded = tclf_model.build_backbone(32, weights=remote)
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(tmp_path) == []
