"""Fuzzing the pack's inputs (issue 10): whatever bytes sit in part_N.png, part_N.npy or
manifest.json, reading them ends in a valid result or an InputError (a ValueError) naming
the file: never another exception type, never a long wait."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tclf import InputError
from tclf.data import records, schema
from tclf.data.audio import encode_png

# TCLF_FUZZ_EXAMPLES=2000 runs a longer, random search; by default 40 fixed examples a test.
EXAMPLES = int(os.environ.get("TCLF_FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECONDS = 5.0  # No single read may take longer (a hang would show as far more).


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import tensorflow  # noqa: F401 (load_manifest's first call would pay its import)

    return tmp_path_factory.mktemp("fuzz")


def _valid_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    return encode_png(pixels)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


VALID_PNG = _valid_png()
VALID_NPY = _npy_bytes(np.zeros((10, 68), np.float32))


def _mutated(valid: bytes):
    """A valid file's bytes with a few bytes replaced, and maybe cut short."""
    return st.tuples(
        st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=8),
        st.integers(0, len(valid))).map(lambda edit: _apply(valid, *edit))


def _apply(valid: bytes, changes, length) -> bytes:
    content = bytearray(valid)
    for position, value in changes:
        content[position] = value
    return bytes(content[:length])


def _read(folder, png: bytes, npy: bytes):
    png_path, npy_path = folder / "part_1.png", folder / "part_1.npy"
    png_path.write_bytes(png)
    npy_path.write_bytes(npy)
    sample = records.Sample(0, "goa/t", 1, str(png_path), str(npy_path))
    start = time.perf_counter()
    try:
        return sample, records.read_sample(sample), None
    except InputError as error:  # Anything else fails the test.
        return sample, None, error
    finally:
        assert time.perf_counter() - start < SECONDS


@FUZZ
@given(content=st.one_of(st.binary(max_size=2000), _mutated(VALID_NPY)))
def test_any_bytes_as_part_npy(folder, content):
    sample, result, error = _read(folder, VALID_PNG, content)
    if error is not None:
        assert str(error).startswith(f"{sample.npy_path}: "), error
    else:
        _, features, _ = result
        assert features.dtype == np.float32 and features.shape == (10, 68)
        assert np.all(np.isfinite(features))


ARRAYS = hnp.arrays(
    dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                    hnp.array_dtypes(max_size=3)),
    shape=st.one_of(st.just((10, 68)), hnp.array_shapes(min_dims=0, max_dims=3, max_side=12)))


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")
@FUZZ
@given(array=ARRAYS)
def test_any_array_as_part_npy(folder, array):
    sample, result, error = _read(folder, VALID_PNG, _npy_bytes(array))
    real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if error is not None:
        assert str(error).startswith(f"{sample.npy_path}: "), error
        assert not (real and array.shape == (10, 68)
                    and np.all(np.isfinite(array.astype(np.float64)))
                    and np.all(np.abs(array.astype(np.float64)) < 3e38)), error
    else:
        assert real and array.shape == (10, 68)
        np.testing.assert_array_equal(result[1], array.astype(np.float32))


@FUZZ
@given(content=st.one_of(st.binary(max_size=2000), _mutated(VALID_PNG[:4000]),
                         _mutated(VALID_PNG)))
def test_any_bytes_as_part_png(folder, content):
    sample, result, error = _read(folder, content, VALID_NPY)
    if error is not None:
        assert str(error).startswith(f"{sample.png_path}: "), error
    else:
        assert result[2].shape == (299, 299, 3) and result[2].dtype == np.uint8


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


def _good_manifest() -> dict:
    classes = ["dark", "goa"]
    side = {"records": 2, "counts": {"dark": 1, "goa": 1},
            "shards": [{"file": "train-00000-of-00001-0123abcd.tfrecord", "records": 2}],
            "tracks": ["dark/a", "goa/b"]}
    return {"schema_version": schema.SCHEMA_VERSION, "classes": classes,
            "splits": {"train": side, "val": side}, "feature_shape": [10, 68],
            "image_size": [299, 299, 3], "feature_mean": [0.0] * 68, "feature_std": [1.0] * 68}


def _damaged_manifests():
    """The good manifest with one entry, at any depth, replaced by a random JSON value."""
    def paths(value, prefix=()):
        yield prefix
        if isinstance(value, dict):
            for key, item in value.items():
                yield from paths(item, prefix + (key,))
        elif isinstance(value, list):
            for index, item in enumerate(value[:3]):
                yield from paths(item, prefix + (index,))

    good = _good_manifest()
    where = list(paths(good))[1:]

    def damage(choice):
        path, value, delete = choice
        manifest = json.loads(json.dumps(good))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return json.dumps(manifest)

    return st.tuples(st.sampled_from(where), JSON, st.booleans()).map(damage)


def _load(folder, content: bytes):
    path = folder / "manifest.json"
    path.write_bytes(content)
    start = time.perf_counter()
    try:
        return path, schema.load_manifest(str(folder)), None
    except InputError as error:
        return path, None, error
    finally:
        assert time.perf_counter() - start < SECONDS


@FUZZ
@given(content=st.one_of(st.binary(max_size=500),
                         JSON.map(lambda v: json.dumps(v).encode()),
                         _damaged_manifests().map(str.encode),
                         _mutated(json.dumps(_good_manifest()).encode())))
def test_any_manifest_json(folder, content):
    path, manifest, error = _load(folder, content)
    if error is not None:
        assert str(error).startswith(f"{path}: "), error
    else:
        assert schema.check_manifest(manifest) is None
        for side in schema.SPLITS:  # What the reader and training take from it.
            assert all(c in manifest["splits"][side]["counts"] for c in manifest["classes"])
            assert all(os.path.basename(s["file"]) == s["file"]
                       for s in manifest["splits"][side]["shards"])


def test_a_deeply_nested_manifest_is_an_input_error(folder):
    path, _, error = _load(folder, b"[" * 100_000 + b"]" * 100_000)
    assert error is not None and str(error).startswith(f"{path}: not a valid JSON file")


def test_the_good_manifest_of_the_fuzz_passes(folder):
    _, manifest, error = _load(folder, json.dumps(_good_manifest()).encode())
    assert error is None and manifest["classes"] == ["dark", "goa"]
