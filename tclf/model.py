"""The two-branch model, built from built-in Keras layers only.

    spectrogram uint8 [H, W, 3]        -> EfficientNetB0 (average pool) -> Dense(128)
      or uint16 [frames, 96, 1]        -> / scale -> musicnn (its 200-d embedding) -> Dense(128)
    features float32 [*FEATURE_SHAPE]  -> Normalization -> GRU(128, sequences)
                                       -> self-attention (4 heads) -> GRU(64) -> Dense(64)
    concatenate -> Dense(128) -> Dropout(0.4) -> Dense(64) -> Dense(classes, softmax, float32)

Built-ins only, so model.h5 loads with ``keras.models.load_model(path, compile=False)``
without tclf; it also stores the class names (:func:`save_model`, :func:`load_class_names`).
Under a mixed precision policy feature_normalization (raw features in Hz, variances to ~1e7:
inf in float16) and the softmax compute in float32; the rest is safe in half precision, as
tests/test_precision.py checks layer by layer.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile

import numpy as np

from tclf import InputError, RunError, faults, musicnn, storage
from tclf.data.audio import BACKBONES, EFFICIENTNET, MUSICNN, MUSICNN_SCALE, spectrogram_shape
from tclf.data.schema import FEATURE_SHAPE, FEATURES_KEY, IMAGE_SIZE, SPECTROGRAM_KEY

BACKBONE_NAME = EFFICIENTNET
BACKBONE_OUTPUT_KEY = "backbone_output"  # The input of heads_model (stage 1).
CLASS_NAMES_ATTRIBUTE = "tclf_class_names"
CONFIG_ATTRIBUTE = "tclf_config"
TEMPERATURE_ATTRIBUTE = "tclf_temperature"  # tclf.evaluation.calibration; absent: 1.0.
IMAGENET_URL = ("https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5")


class WeightsError(RunError):
    """The backbone weights asked for cannot be loaded."""


def build_backbone(image_size: int = IMAGE_SIZE, weights: str | None = "imagenet",
                   backbone: str = EFFICIENTNET, frames: int | None = None):
    """The image branch's network, named after ``backbone``: EfficientNetB0 without its top,
    average-pooled, for ``image_size`` squares; or musicnn's embedding for ``frames``.

    Parameters
    ----------
    weights : "imagenet" (the pretrained weights: ImageNet's for EfficientNetB0, the Million
        Song Dataset's for musicnn), None / "none", or a path to a weights file
        (e.g. a local copy of efficientnetb0_notop.h5).
    """
    if backbone == MUSICNN:
        return _musicnn(frames, weights)
    if is_random(weights):
        weights = None
    elif weights != "imagenet":
        if not storage.exists(weights):
            raise WeightsError(f"backbone weights file {weights} not found; use --weights none, "
                               f"--weights imagenet, or the path of an existing file")
        with storage.local_copy(weights) as local:  # Keras reads local files only.
            return _efficientnet(image_size, local)
    return _efficientnet(image_size, weights)


def _musicnn(frames, weights):
    if is_random(weights):
        return musicnn.build(frames, weights=None, name=MUSICNN)
    if weights == "imagenet":  # The default: the backbone's pretrained weights.
        return musicnn.build(frames, weights="msd", name=MUSICNN)
    if not storage.exists(weights):
        raise WeightsError(f"backbone weights file {weights} not found; use --weights none, "
                           f"the default (musicnn's own), or the path of an existing file")
    try:
        with storage.local_copy(weights) as local:
            return musicnn.build(frames, weights=local, name=MUSICNN)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a bad file.
        raise WeightsError(f"could not load musicnn weights from {weights}: {error}") from None


def _efficientnet(image_size: int, weights):
    import keras

    try:
        return keras.applications.EfficientNetB0(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3),
            pooling="avg", name=BACKBONE_NAME)
    except Exception as error:
        if weights == "imagenet":
            raise WeightsError(
                f"could not get the ImageNet weights of EfficientNetB0 ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). Offline? Either train "
                f"without them (--weights none) or download {IMAGENET_URL} on a connected machine "
                f"and pass its path (--weights PATH), or put it in ~/.keras/models/.") from None
        if weights is not None:
            raise WeightsError(f"could not load backbone weights from {weights}: {error}") from None
        raise


def build_model(num_classes: int, feature_mean=None, feature_std=None,
                image_size: int = IMAGE_SIZE, feature_shape=FEATURE_SHAPE,
                weights: str | None = "imagenet",
                image_units: int = 128, gru_units: int = 128, gru2_units: int = 64,
                feature_units: int = 64, fusion_units: int = 128, head_units: int = 64,
                attention_heads: int = 4, dropout: float = 0.4, backbone: str = EFFICIENTNET,
                segment_seconds: float = 10.0):
    """Build the two-branch classifier (the module docstring's graph and precision).

    - feature_mean, feature_std: the training split's, one value per feature column
      (manifest.json); the model normalizes its features with them. None: identity.
    - image_size: side of the square spectrogram input (IMAGE_SIZE; small in tests).
    - attention_heads: over the windows; key size gru_units // attention_heads.
    - weights: backbone initialization, "imagenet" (pretrained), "none" or a weights file.
    - backbone: "efficientnetb0" or "musicnn" (the pack's); musicnn reads uint16 log-mel
      [frames, 96, 1] of ``segment_seconds`` (image_size does not apply to it).
    Returns a keras.Model {"spectrogram": uint8 [B, image_size, image_size, 3], "features":
    float32 [B, *feature_shape]} -> float32 [B, num_classes]. InputError for fewer than 2
    classes, ValueError for statistics of the wrong length.
    """
    import keras
    from keras import layers

    if num_classes < 2:
        raise InputError(f"need at least 2 classes to classify, got {num_classes}")
    steps, columns = feature_shape
    mean = np.zeros(columns) if feature_mean is None else np.asarray(feature_mean, np.float64)
    std = np.ones(columns) if feature_std is None else np.asarray(feature_std, np.float64)
    if mean.shape != (columns,) or std.shape != (columns,):
        raise ValueError(f"feature statistics must have shape ({columns},), got {mean.shape} "
                         f"and {std.shape}")
    # A column constant over the training split carries no information: leave it unscaled
    # rather than dividing by ~0 and blowing up whatever differs at prediction time.
    std = np.where(std > 1e-6, std, 1.0)

    features = keras.Input((steps, columns), dtype="float32", name=FEATURES_KEY)
    if backbone == MUSICNN:
        # The stored integers back to log-mel values, exactly (a power-of-two scale) and in
        # float32: under float16 the largest would overflow, under bfloat16 lose bits.
        shape = spectrogram_shape(MUSICNN, segment_seconds)
        spectrogram = keras.Input(shape, dtype="uint16", name=SPECTROGRAM_KEY)
        x = layers.Rescaling(1.0 / MUSICNN_SCALE, dtype="float32", name="image_to_float")(
            spectrogram)
        x = _inference_only(build_backbone(weights=weights, backbone=MUSICNN,
                                           frames=shape[0]))(x)
    else:
        spectrogram = keras.Input((image_size, image_size, 3), dtype="uint8",
                                  name=SPECTROGRAM_KEY)
        # EfficientNet rescales 0-255 itself; Rescaling(1) only casts uint8 to float.
        x = layers.Rescaling(1.0, name="image_to_float")(spectrogram)
        x = _inference_only(build_backbone(image_size, weights))(x)

    # The rest, after the backbone, is also the stage-1 model (heads_model): one description.
    # The normalization computes in float32 under every policy: the spectral columns are in
    # Hz, their variances exceed float16's maximum (65,504; the layer would output 0 for
    # them) and bfloat16 keeps 8 bits of the raw values. Its output is O(1) and safe to cast
    # to the compute dtype of the layers after it. The softmax runs in float32 so that mixed
    # precision stays stable.
    head_layers = {layer.name: layer for layer in [
        layers.Dense(image_units, activation="relu", name="image_dense"),
        layers.Normalization(axis=-1, mean=mean.tolist(), variance=(std**2).tolist(),
                             dtype="float32", name="feature_normalization"),
        layers.GRU(gru_units, return_sequences=True, name="gru_1"),
        layers.MultiHeadAttention(num_heads=attention_heads,
                                  key_dim=gru_units // attention_heads, name="self_attention"),
        layers.GRU(gru2_units, name="gru_2"),
        layers.Dense(feature_units, activation="relu", name="feature_dense"),
        layers.Concatenate(name="fusion"),
        layers.Dense(fusion_units, activation="relu", name="fusion_dense"),
        layers.Dropout(dropout, name="fusion_dropout"),
        layers.Dense(head_units, activation="relu", name="head_dense"),
        layers.Dense(num_classes, activation="softmax", dtype="float32", name="style"),
    ]}
    outputs = _heads(head_layers.__getitem__, x, features)
    return keras.Model({SPECTROGRAM_KEY: spectrogram, FEATURES_KEY: features}, outputs,
                       name="tclf")


def _heads(layer, image_vector, features):
    """The graph after the backbone: image vector [B, 1280] + features [B, *FEATURE_SHAPE]
    -> class probabilities, through the layers ``layer(name)`` returns (new, or a model's)."""
    x = layer("image_dense")(image_vector)
    # Sequence branch over the 1-second windows.
    s = layer("feature_normalization")(features)
    s = layer("gru_1")(s)
    s = layer("self_attention")(s, s)
    s = layer("gru_2")(s)
    s = layer("feature_dense")(s)
    # Fusion head.
    h = layer("fusion")([x, s])
    h = layer("fusion_dense")(h)
    h = layer("fusion_dropout")(h)
    h = layer("head_dense")(h)
    return layer("style")(h)


def _inference_only(backbone):
    """Make ``backbone`` compute as in inference whatever the training flag; return it.

    ``backbone(x, training=False)`` does not hold in Keras 3.15 functional models: the
    model's call passes its own training flag to every layer. Training mode differs only in
    BatchNormalization (inference mode whenever not trainable, which it never is here) and
    EfficientNet's stochastic-depth Dropout, whose rate is set to 0 here. So the backbone
    computes the same in both stages, and stage 1 may compute its outputs once
    (tclf.training.backbone_cache).
    """
    import keras

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return backbone


def is_random(weights) -> bool:
    """Whether ``weights`` (the --weights option) leaves the backbone randomly initialized."""
    return weights in (None, "none", "None")


def calibrate_backbone(model, images, batch_size: int = 16) -> None:
    """Set each backbone BatchNormalization layer's moving mean and variance to those of its
    input over ``images`` (uint8 spectrograms [N, H, W, 3]); for --weights none only.

    With the initial statistics a random backbone's pooled output is ~1e-5 and the image
    branch adds nothing; normalized, it is a random-feature extractor that helps
    (docs/real-music.md#what-each-change-did). Runs ``batch_size`` images at a time in
    training mode (96 at once held 17 GB at 299x299); sets the result with ``set_weights``,
    which holds on every replica of a tf.distribute strategy (a layer's own update in a
    cross-replica call does not).
    """
    import keras

    backbone = backbone_of(model)
    norms = [layer for layer in backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(backbone.inputs, [layer.input for layer in norms])
    to_float = model.get_layer("image_to_float")
    sums = None  # Per layer: (values, sum, sum of squares) over every image and position.
    for start in range(0, len(images), batch_size):
        inputs = probe(to_float(images[start:start + batch_size]), training=True)
        # Every axis but the channels': images [B, H, W, C], musicnn's vectors [B, C].
        batch = [(x.size // x.shape[-1], x.sum(axis=tuple(range(x.ndim - 1))),
                  (x * x).sum(axis=tuple(range(x.ndim - 1))))
                 for x in (np.asarray(t, np.float64) for t in inputs)]
        sums = batch if sums is None else [tuple(a + b for a, b in zip(old, new))
                                           for old, new in zip(sums, batch)]
    for layer, (count, total, squares) in zip(norms, sums):
        mean = total / count
        values = {id(layer.moving_mean): mean,
                  id(layer.moving_variance): np.maximum(squares / count - mean * mean, 0.0)}
        layer.set_weights([values.get(id(w), w.numpy()) for w in layer.weights])


def heads_model(model):
    """The part of ``model`` after the backbone, as a model of its own:
    {"backbone_output": [B, 1280], "features": [B, *FEATURE_SHAPE]} -> class probabilities.

    It holds the same layer objects as ``model``: training it trains model's heads, and
    model's backbone is not part of it. Stage 1 trains it on backbone outputs computed once.
    """
    import keras

    width = backbone_of(model).output.shape[-1]
    feature_input = model.get_layer(FEATURES_KEY)
    image_vector = keras.Input((width,), name=BACKBONE_OUTPUT_KEY)
    features = keras.Input(tuple(feature_input.batch_shape[1:]), dtype="float32",
                           name=FEATURES_KEY)
    outputs = _heads(model.get_layer, image_vector, features)
    return keras.Model({BACKBONE_OUTPUT_KEY: image_vector, FEATURES_KEY: features}, outputs,
                       name="tclf_heads")


def image_encoder(model):
    """spectrogram [B, ...] -> backbone output [B, width], with ``model``'s layers."""
    import keras

    image_input = model.get_layer(SPECTROGRAM_KEY)
    spectrogram = keras.Input(tuple(image_input.batch_shape[1:]), dtype=image_input.dtype,
                              name=SPECTROGRAM_KEY)
    x = model.get_layer("image_to_float")(spectrogram)
    return keras.Model(spectrogram, backbone_of(model)(x), name="tclf_image_encoder")


def image_size_of(model) -> int:
    """Side of the spectrogram input a model was built for (musicnn's: its frames)."""
    for tensor in model.inputs:
        if len(tensor.shape) == 4:
            return int(tensor.shape[1])
    raise ValueError("model has no image input")


@functools.lru_cache(maxsize=2)
def backbone_layer_count(backbone: str = EFFICIENTNET) -> int:
    """Layers of the backbone (the range of stage 2's unfrozen count); the same at any input
    size and with any weights."""
    if backbone == MUSICNN:
        return musicnn.layer_count()
    return len(build_backbone(32, None).layers)


def backbone_name(model) -> str:
    """The backbone a model holds: efficientnetb0 or musicnn."""
    names = {layer.name for layer in model.layers}
    for name in BACKBONES:
        if name in names:
            return name
    raise InputError(f"model {model.name!r} holds none of the backbones {', '.join(BACKBONES)}")


def check_backbone_matches(model_backbone: str, data_backbone: str, where: str) -> None:
    """One line when a model meets spectrograms made for the other backbone."""
    if model_backbone != data_backbone:
        raise InputError(f"{where} holds spectrograms for the {data_backbone} backbone, and the "
                         f"model is a {model_backbone} model; use a model trained on "
                         f"{data_backbone} data, or extract with --backbone {model_backbone}")


def backbone_of(model):
    return model.get_layer(backbone_name(model))


def freeze_backbone(model) -> None:
    """Stage 1: the whole backbone frozen (its BatchNormalization in inference mode)."""
    backbone = backbone_of(model)
    backbone.trainable = False


def unfreeze_top(model, num_layers: int = 20) -> list[str]:
    """Stage 2: the last ``num_layers`` backbone layers trainable, BatchNormalization frozen.

    Layers are counted in the backbone's layer order, BatchNormalization
    included (as in the Keras fine-tuning guide). Returns the names of the
    layers made trainable.
    """
    import keras

    backbone = backbone_of(model)
    backbone.trainable = True
    layers = backbone.layers
    if not 0 <= num_layers <= len(layers):
        raise InputError(f"can unfreeze 0-{len(layers)} backbone layers, got {num_layers}")
    top = layers[len(layers) - num_layers:] if num_layers else []
    for layer in layers:
        layer.trainable = False
    unfrozen = []
    for layer in top:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
            unfrozen.append(layer.name)
    return unfrozen


KERAS_METADATA = "tclf.json"  # model.keras: the zip entry holding what model.h5's attributes do.


def save_model(model, path: str, class_names, config: dict | None = None,
               temperature: float = 1.0) -> None:
    """Save ``path`` (no optimizer) with the class names, the training configuration and the
    calibration temperature, atomically: model.h5 (HDF5, tclf's model format) keeps them as
    HDF5 attributes, model.keras (Keras 3's own format, a zip) as its tclf.json.

    Written, tagged, then renamed into place (tclf.storage.staged), so ``path``
    may be remote and is never half-written.
    """
    import zipfile

    metadata = {CLASS_NAMES_ATTRIBUTE: json.dumps(list(class_names)),
                TEMPERATURE_ATTRIBUTE: float(temperature)}
    if config is not None:
        metadata[CONFIG_ATTRIBUTE] = json.dumps(config, default=str)
    keras_format = path.endswith(".keras")
    with storage.staged(path) as local:
        # The staging name keeps the ending, from which Keras picks the format.
        if keras_format:
            model.save(local, include_optimizer=False)
            with zipfile.ZipFile(local, "a") as archive:
                archive.writestr(KERAS_METADATA, json.dumps(metadata))
        else:
            import h5py

            absl_logger = logging.getLogger("absl")
            absl_logger.addFilter(_h5_notice)
            try:
                model.save(local, include_optimizer=False)
            finally:
                absl_logger.removeFilter(_h5_notice)
            with h5py.File(local, "a") as f:
                for name, value in metadata.items():
                    f.attrs[name] = value
        faults.point("model.saved_staged")  # Written whole, not yet renamed into place.


def _h5_notice(record: logging.LogRecord) -> bool:
    """Drop Keras' "HDF5 is legacy" notice: model.h5 is tclf's chosen model format."""
    return "saving your model as an HDF5 file" not in record.getMessage()


def _metadata(path: str) -> dict:
    """What tclf-train stored in a model file, model.h5 or model.keras: {attribute: value}."""
    import zipfile

    import h5py

    with storage.local_copy(path) as local:
        if zipfile.is_zipfile(local):
            with zipfile.ZipFile(local) as archive:
                if KERAS_METADATA not in archive.namelist():
                    return {}
                return json.loads(archive.read(KERAS_METADATA))
        with h5py.File(local, "r") as f:
            return dict(f.attrs)


def load_class_names(path: str) -> list[str]:
    """The class names stored in a model file written by tclf-train."""
    value = _metadata(path).get(CLASS_NAMES_ATTRIBUTE)
    if value is None:
        raise InputError(f"{path}: no class names in the file (not written by tclf-train)")
    return json.loads(value)


def load_config(path: str) -> dict | None:
    """The training configuration stored in a model file by tclf-train (None if absent)."""
    value = _metadata(path).get(CONFIG_ATTRIBUTE)
    return json.loads(value) if value is not None else None


def trained_librosa(config: dict | None) -> str | None:
    """The librosa version that computed the features of a model's training data (from the
    extraction settings, else the training process's), None for a model that does not say."""
    config = config or {}
    return ((config.get("extraction") or {}).get("librosa_version")
            or (config.get("library_versions") or {}).get("librosa"))


def warn_if_librosa_differs(model_path: str, config: dict | None, version: str | None,
                            computed_by: str) -> None:
    """Warn (once: call it once per command) when the features given to the model come from
    another librosa than its training data's: they may differ slightly, and so may results."""
    import warnings

    trained = trained_librosa(config)
    if trained and version and trained != version:
        warnings.warn(f"{model_path} was trained on features computed by librosa {trained}; "
                      f"{computed_by} librosa {version}, so results may differ slightly",
                      stacklevel=2)


def load_temperature(path: str) -> float:
    """The calibration temperature stored in a model file by tclf-train (1.0 if absent)."""
    return float(_metadata(path).get(TEMPERATURE_ATTRIBUTE, 1.0))


def load_model(path: str):
    """(model, class_names) from a model.h5 or model.keras written by tclf-train; not
    compiled."""
    import keras

    if not storage.exists(path):
        raise FileNotFoundError(f"model file {path} not found (train one with tclf-train, or "
                                f"pass --model)")
    if storage.isdir(path):
        raise InputError(f"{path} is a folder; --model takes a model file (model.h5 or "
                         f"model.keras in it)")
    with storage.local_copy(path) as local, tempfile.TemporaryDirectory() as tmp:
        import zipfile

        import h5py

        if zipfile.is_zipfile(local):
            if not local.endswith(".keras"):  # Keras reads a zip only under that name.
                os.symlink(os.path.abspath(local), os.path.join(tmp, "model.keras"))
                local = os.path.join(tmp, "model.keras")
        elif not h5py.is_hdf5(local):
            raise InputError(f"{path}: not an HDF5 file (model.h5) nor a Keras zip "
                             f"(model.keras); is it truncated or another kind of file?")
        try:
            model = keras.models.load_model(local, compile=False)
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(f"{path}: not a loadable Keras model ({reason})") from None
    return model, load_class_names(path)
