"""tclf: a trance sub-genre classifier (Goa, Psy, Dark) from audio.

Pipeline: audio -> 10 s segments -> (mel-spectrogram PNG, 10x68 feature
matrix) -> sharded TFRecords -> tf.data -> two-branch Keras model.
Modules import TensorFlow lazily where they can, so that audio extraction
workers stay light.
"""

__version__ = "0.1.0"


LIBRARIES = ("tensorflow", "keras", "librosa", "numpy")  # What a trained model depends on.


def library_versions() -> dict[str, str]:
    """tclf's and its main libraries' installed versions (from their metadata: no import)."""
    from importlib import metadata

    found = {"tclf": __version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


class UserError(Exception):
    """An error in the user's input or setup, not in tclf.

    The CLI prints its message on one line and exits with status 1; any other
    exception is a bug and keeps its traceback. Raised as one of the classes
    below, which are also the built-in type a Python caller would expect.
    """


class InputError(UserError, ValueError):
    """A value, file or folder given by the user is wrong."""


class RunError(UserError, RuntimeError):
    """The run cannot go on: nothing usable to work on, a worker killed from outside."""


class DataWarning(UserWarning):
    """A file of the user's data was skipped; the message names it and says why."""


def report_skip(message: str) -> None:
    """Tell the user that a file of theirs was skipped (a DataWarning), whatever the warnings
    filters say: PYTHONWARNINGS=ignore, set to quiet TensorFlow, must not hide lost data."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.warn(message, DataWarning, stacklevel=3)
