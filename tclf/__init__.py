"""tclf: a trance sub-genre classifier (Goa, Psy, Dark) from audio.

Pipeline: audio -> 10 s segments -> (mel-spectrogram PNG, 10x68 feature
matrix) -> sharded TFRecords -> tf.data -> two-branch Keras model.
Modules import TensorFlow lazily where they can, so that audio extraction
workers stay light.
"""

__version__ = "0.1.0"


class DataWarning(UserWarning):
    """A file of the user's data was skipped; the message names it and says why."""
