"""Training-only regularization for real music, where the heads overfit a few hundred segments
a style within a few epochs (docs/real-music.md#what-each-change-did).

Both act in ``model.fit``'s training step only: validation, evaluation, prediction and the
saved model (plain Keras) see the model as built.
- Mixup (Zhang et al. 2018): each example is blended with another of its batch, inputs and
  one-hot labels alike, with a weight drawn from Beta(alpha, alpha). Stage 1 mixes the cached
  backbone outputs and features, stage 2 the spectrograms (rounded back to uint8) and features.
- Label smoothing: the target puts 1 - e on the true style and spreads e over all styles.
"""

from __future__ import annotations

import contextlib


def loss_and_accuracy(num_classes: int, label_smoothing: float = 0.0):
    """(loss, accuracy metric) that take a batch's labels as class indices [B] (validation)
    or as class probabilities [B, C] (a mixed training batch). Without smoothing or mixup
    Keras' own sparse cross-entropy and accuracy do the same on indices."""
    import keras
    from keras import ops

    def targets(y_true, y_pred):
        # Keras hands a loss function indices [B] as [B, 1] (to y_pred's rank): the last axis
        # tells them from probabilities.
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == num_classes:
            return ops.cast(y_true, "float32")
        return ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes)

    def cross_entropy(y_true, y_pred):
        target = targets(y_true, y_pred)
        if label_smoothing:
            target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
        return keras.losses.categorical_crossentropy(target, ops.cast(y_pred, "float32"))

    def accuracy(y_true, y_pred):
        return ops.cast(ops.equal(ops.argmax(targets(y_true, y_pred), axis=-1),
                                  ops.argmax(y_pred, axis=-1)), "float32")

    return cross_entropy, keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")


@contextlib.contextmanager
def mixup(model, alpha: float, num_classes: int, seed: int | None = None):
    """While the block runs, ``model``'s training step mixes each batch before Keras' own
    step computes the loss and the gradients (compile ``model`` with
    :func:`loss_and_accuracy`'s loss). alpha 0: the step is left alone."""
    if not alpha:
        yield model
        return
    import keras
    from keras import ops

    seeds = keras.random.SeedGenerator(seed)
    own_step = model.train_step

    def mix(tensor, weight, order):
        weight = ops.reshape(weight, (-1,) + (1,) * (len(tensor.shape) - 1))
        values = ops.cast(tensor, "float32")
        mixed = weight * values + (1.0 - weight) * ops.take(values, order, axis=0)
        if "int" in str(tensor.dtype):  # Spectrograms: uint8 pixels stay pixels.
            mixed = ops.round(mixed)
        return ops.cast(mixed, tensor.dtype)

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = ops.shape(y)[0]
        weight = keras.random.beta((batch,), alpha, alpha, seed=seeds)
        order = keras.random.shuffle(ops.arange(batch), seed=seeds)
        x = keras.tree.map_structure(lambda t: mix(t, weight, order), x)
        y = mix(ops.one_hot(ops.cast(ops.reshape(y, (-1,)), "int32"), num_classes), weight,
                order)
        if sample_weight is not None:  # The class weights, blended as the labels are.
            sample_weight = mix(sample_weight, weight, order)
        return own_step(keras.utils.pack_x_y_sample_weight(x, y, sample_weight))

    before = model.__dict__.get("train_step")  # An instance's own step, if it had one.
    model.train_step = train_step
    model.train_function = None  # Traced again, with this step.
    try:
        yield model
    finally:
        if before is None:
            del model.train_step
        else:
            model.train_step = before
        model.train_function = None
