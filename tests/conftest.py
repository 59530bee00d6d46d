"""Shared, session-scoped fixtures: one small synthetic data set, extracted and packed once.

Tracks are 22 s long, so each yields 2 segments of 10 s; 3 styles x 4 tracks.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The devices the tests train on: "none" (the CPU, the default) or e.g. "all", which
# tools/gpu_check.sh sets on a GPU machine. With "none" TensorFlow never sees a GPU, in this
# process or its children, so every test runs on the CPU whatever the machine has.
TEST_GPUS = os.environ.get("TCLF_TEST_GPUS", "none")
if TEST_GPUS == "none":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

STYLES = ("dark", "goa", "psy")
TRACKS_PER_STYLE = 4
TRACK_SECONDS = 22.0


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory):
    from tclf import demo

    root = tmp_path_factory.mktemp("audio")
    demo.make_demo_audio(str(root), tracks_per_style=TRACKS_PER_STYLE, duration=TRACK_SECONDS,
                         seed=1, styles=STYLES)
    return str(root)


@pytest.fixture(scope="session")
def data_dir(audio_dir, tmp_path_factory):
    from tclf.data import extract

    root = str(tmp_path_factory.mktemp("data"))
    extract.extract(audio_dir, root, jobs=1, progress=False)
    return root


@pytest.fixture(scope="session")
def records_dir(data_dir, tmp_path_factory):
    from tclf.data import records

    root = str(tmp_path_factory.mktemp("records"))
    records.pack(data_dir, root, val_fraction=0.25, seed=0, min_shards=2, progress=False)
    return root


@pytest.fixture
def data_copy(data_dir, tmp_path):
    """A private copy of the extracted data, for tests that damage it."""
    target = tmp_path / "data"
    shutil.copytree(data_dir, target)
    return str(target)


# The package's tiny preset, pinned to the devices above and float32 whatever the machine (its
# `--precision auto` differs between CPUs with and without native bfloat16);
# tests/test_precision.py runs the other policies.
TINY_TRAINING = dict(**__import__("tclf.training.config").training.config.TINY, gpus=TEST_GPUS, precision="float32",
                     verbose=0)


@pytest.fixture(scope="session")
def trained(records_dir, tmp_path_factory):
    """One tiny two-stage training run on the shared records (image size 32)."""
    from tclf.training import train

    models = str(tmp_path_factory.mktemp("models"))
    return train.train(train.TrainConfig(records=records_dir, models=models, **TINY_TRAINING))
