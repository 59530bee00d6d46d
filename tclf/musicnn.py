"""musicnn (Pons and Serra, 2019; ISC license) in Keras 3 layers, with the MSD_musicnn weights
read from the installed musicnn package's checkpoint (none of its code is imported).

    log-mel [B, T, 96, 1] -> BatchNorm -> front end: timbral Conv2D 7x38 and 7x67 (204 each),
    temporal Conv2D 128x1, 64x1, 32x1 (51 each), each max-pooled over frequency -> [B, T, 561]
    -> mid end: three Conv 7 over time (64), the last two residual -> [B, T, 753] (all concat)
    -> back end: max and mean over time, interleaved [1506] -> BatchNorm -> Dense(200, relu)
    -> BatchNorm = the 200-d embedding ("penultimate"); the tagger adds Dense(50) + sigmoid.

The original's tensors [B, T, F, C] are kept, with the mid end's 1-D convolutions as
Conv2D (7, 1) over [B, T, 1, C]: the same arithmetic, built-in layers only, so a tclf model
holding it still loads with plain ``keras.models.load_model``. Its dropouts are left out:
they act in training only, and tclf's backbone must compute the same in both stages.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from tclf import RunError

N_MELS = 96
EMBEDDING = 200
MSD_TAGS = 50
WEIGHTS_NAME = "MSD_musicnn"
INSTALL_HINT = "pip install --no-deps musicnn==0.1.0"  # Its metadata pins numpy < 1.17.

# Each Keras layer and the original's tf.compat.v1.layers variable scope (creation order).
CHECKPOINT_NAMES = {
    "input_norm": "batch_normalization",
    "timbral_38": "conv2d", "timbral_38_norm": "batch_normalization_1",
    "timbral_67": "conv2d_1", "timbral_67_norm": "batch_normalization_2",
    "temporal_128": "conv2d_2", "temporal_128_norm": "batch_normalization_3",
    "temporal_64": "conv2d_3", "temporal_64_norm": "batch_normalization_4",
    "temporal_32": "conv2d_4", "temporal_32_norm": "batch_normalization_5",
    "midend_1": "conv2d_5", "midend_1_norm": "batch_normalization_6",
    "midend_2": "conv2d_6", "midend_2_norm": "batch_normalization_7",
    "midend_3": "conv2d_7", "midend_3_norm": "batch_normalization_8",
    "pool_norm": "batch_normalization_9",
    "penultimate_dense": "dense", "penultimate": "batch_normalization_10",
    "tag_logits": "dense_1",
}


class MusicnnMissing(RunError):
    """The musicnn package, which holds the weights, is not installed."""


def weights_prefix() -> str:
    """The checkpoint prefix of MSD_musicnn inside the installed package (not imported: its
    TF1 code does not run here). Its `checkpoint` file names the author's own path, so the
    prefix is given directly."""
    for folder in _package_folders():
        prefix = os.path.join(folder, WEIGHTS_NAME, "")
        if os.path.exists(prefix + ".index"):
            return prefix
    raise MusicnnMissing(f"the musicnn backbone needs the weights in the musicnn package "
                         f"(ISC license), which is not installed: {INSTALL_HINT}")


def _package_folders() -> list[str]:
    spec = importlib.util.find_spec("musicnn")
    return list(spec.submodule_search_locations or []) if spec else []


def build(frames: int | None = None, tags: bool = False, weights: str | None = "msd",
          name: str = "musicnn"):
    """musicnn as a keras.Model: float log-mel [B, frames, 96, 1] -> embedding [B, 200]
    (``tags``: -> {"penultimate": [B, 200], "tags": sigmoid [B, 50]}).

    weights: "msd" (MSD_musicnn, from the package), None (random), or a Keras weights file.
    """
    import keras
    from keras import layers

    mel = keras.Input((frames, N_MELS, 1), name="log_mel")
    x = layers.BatchNormalization(name="input_norm")(mel)
    padded = layers.ZeroPadding2D(((3, 3), (0, 0)), name="timbral_pad")(x)
    front = [_block(padded, 204, (7, width), "valid", f"timbral_{width}")
             for width in (int(0.4 * N_MELS), int(0.7 * N_MELS))]
    front += [_block(x, 51, (length, 1), "same", f"temporal_{length}")
              for length in (128, 64, 32)]
    front = layers.Concatenate(name="frontend")(front)  # [B, T, 1, 561]
    mid = [front]
    for index in (1, 2, 3):
        y = layers.ZeroPadding2D(((3, 3), (0, 0)), name=f"midend_{index}_pad")(mid[-1])
        y = layers.Conv2D(64, (7, 1), activation="relu", name=f"midend_{index}")(y)
        y = layers.BatchNormalization(name=f"midend_{index}_norm")(y)
        mid.append(y if index == 1 else layers.Add(name=f"midend_{index}_residual")([y, mid[-1]]))
    features = layers.Concatenate(name="midend")(mid)  # [B, T, 1, 753]
    width = features.shape[-1]
    # The original flattens [max, mean] stacked on a last axis: they alternate, feature by
    # feature, and the next layers' weights expect that order.
    pools = [layers.Reshape((width, 1), name=f"{kind}_column")(pool(name=f"{kind}_pool")(features))
             for kind, pool in (("max", layers.GlobalMaxPooling2D),
                                ("mean", layers.GlobalAveragePooling2D))]
    x = layers.Flatten(name="pools")(layers.Concatenate(name="max_mean")(pools))
    x = layers.BatchNormalization(name="pool_norm")(x)
    x = layers.Dense(EMBEDDING, activation="relu", name="penultimate_dense")(x)
    embedding = layers.BatchNormalization(name="penultimate")(x)
    outputs = embedding
    if tags:
        logits = layers.Dense(MSD_TAGS, name="tag_logits")(embedding)
        outputs = {"penultimate": embedding,
                   "tags": layers.Activation("sigmoid", dtype="float32", name="tags")(logits)}
    model = keras.Model(mel, outputs, name=name)
    if weights == "msd":
        load_checkpoint(model, weights_prefix())
    elif weights is not None:
        model.load_weights(weights)
    return model


def _block(x, filters: int, kernel, padding: str, name: str):
    """Conv2D (relu) -> BatchNorm -> max over the whole frequency axis: [B, T, 1, filters]."""
    from keras import layers

    x = layers.Conv2D(filters, kernel, padding=padding, activation="relu", name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_norm")(x)
    return layers.MaxPooling2D((1, x.shape[2]), name=f"{name}_pool")(x)


def load_checkpoint(model, prefix: str) -> None:
    """Set ``model``'s layers from the original's checkpoint at ``prefix`` (the optimizer's
    slots are not read). Every layer of CHECKPOINT_NAMES that the model has must be there."""
    import tensorflow as tf

    # TensorFlow's own checkpoint reader: the only compat.v1 call, and it is a file reader.
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    for layer in model.layers:
        scope = CHECKPOINT_NAMES.get(layer.name)
        if scope is None:
            continue
        if layer.__class__.__name__ == "BatchNormalization":
            names = ("gamma", "beta", "moving_mean", "moving_variance")
        else:
            names = ("kernel", "bias")
        values = [reader.get_tensor(f"{scope}/{n}") for n in names]
        # The mid end's kernels are [7, C, 1, 64] there and [7, 1, C, 64] here: the same
        # numbers in the same order, as C or the 1 comes first.
        layer.set_weights([np.reshape(v, w.shape) for v, w in zip(values, layer.weights)])


def layer_count() -> int:
    """Layers of the backbone (the range of stage 2's unfrozen count)."""
    return len(build(8, weights=None).layers)
