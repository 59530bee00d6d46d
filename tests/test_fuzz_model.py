"""Fuzzing the model loader: whatever bytes sit in a file named model.h5, tclf-predict and
tclf-eval get a clear InputError naming it, never another exception or a hang."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tclf import InputError
from tclf.model import load_model

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=4096),
                 st.binary(max_size=4096).map(lambda tail: HDF5_SIGNATURE + tail)))
def test_random_bytes_as_a_model_file_are_a_clear_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.h5")
        with open(path, "wb") as f:
            f.write(content)
        try:
            load_model(path)
        except InputError as error:
            assert str(error).startswith(path) and "\n" not in str(error).strip()
        else:
            raise AssertionError("random bytes loaded as a model")
