"""Fuzzing the audio front end: whatever bytes a file holds, analyze_file either returns
well-formed segments or raises AudioError naming the file: no other exception, no crash, no
hang, no NaN features.

Small segments (1 s) and images (16 px) keep each example cheap; the examples are few
(hypothesis' database replays any failure it found first).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import tempfile

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tclf.data import audio

OPTIONS = dict(num_segments=2, segment_seconds=1.0, image_size=16)
OUTCOMES = collections.Counter()  # What the examples got, for a look with -s.
SECONDS_PER_EXAMPLE = 60  # A hang, not a slow machine: one example takes well under 1 s.
# TCLF_FUZZ_EXAMPLES=1000 for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("TCLF_FUZZ_EXAMPLES", 30)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Starts of real formats, so that the decoders get past their first check now and then.
MAGIC = [b"", b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00", b"RIFF",
         b"ID3\x03\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x64", b"fLaC\x00\x00\x00\x22",
         b"OggS\x00\x02", b"FORM\x00\x00\x00\x00AIFF", b".snd"]


@contextlib.contextmanager
def no_hang(seconds=SECONDS_PER_EXAMPLE):
    def expire(signum, frame):
        raise TimeoutError(f"analyze_file ran for over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(path):
    """analyze_file(path): well-formed segments, or an AudioError whose message names it."""
    with no_hang():
        try:
            segments = audio.analyze_file(path, **OPTIONS)
        except audio.AudioError as error:
            message = str(error)
            assert message.startswith(f"{path}: ") and "\n" not in message, message
            OUTCOMES[message[len(path) + 2:].split(" (")[0][:40]] += 1
            return None
    OUTCOMES["segments"] += 1
    assert 1 <= len(segments) <= OPTIONS["num_segments"]
    for number, segment in enumerate(segments, start=1):
        assert segment.index == number
        assert segment.image.shape == (16, 16, 3) and segment.image.dtype == np.uint8
        assert segment.features.shape == audio.FEATURE_SHAPE
        assert segment.features.dtype == np.float32
        assert np.all(np.isfinite(segment.features)), segment.features
    return segments


@FUZZ
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=6000),
       suffix=st.sampled_from([".mp3", ".wav", ".flac", ".ogg", ".aiff", ".m4a", ".txt", ""]))
def test_random_bytes_never_raise_anything_but_audio_error(magic, body, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"fuzz file é{suffix}")
        with open(path, "wb") as f:
            f.write(magic + body)
        check(path)


samples = st.one_of(
    st.floats(-1.0, 1.0, width=32),  # Sound.
    st.floats(width=32, allow_nan=True, allow_infinity=True),  # Anything a float WAV can hold.
)


@FUZZ
@given(data=hnp.arrays(np.float32, st.tuples(st.integers(0, 6000), st.integers(1, 3)),
                       elements=samples, fill=st.just(np.float32(0.0))),
       rate=st.one_of(st.sampled_from([1, 8000, 22050, 44100]), st.integers(1, 96000)),
       kind=st.sampled_from([("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("WAV", "PCM_16"),
                             ("WAV", "PCM_U8"), ("FLAC", "PCM_16")]))
def test_random_sound_files_never_raise_anything_but_audio_error(data, rate, kind):
    file_format, subtype = kind
    if subtype not in ("FLOAT", "DOUBLE"):  # Integer formats: libsndfile clips; NaN is ours.
        data = np.clip(np.nan_to_num(data, nan=0.0), -1.0, 1.0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz." + file_format.lower())
        try:
            sf.write(path, data, rate, format=file_format, subtype=subtype)
        except sf.LibsndfileError:  # Not a file libsndfile writes (FLAC over 655350 Hz, ...).
            reject()
        segments = check(path)
    seconds = len(data) / rate
    if seconds < OPTIONS["segment_seconds"]:
        assert segments is None  # Under one segment: always refused.
    if segments is not None and subtype not in ("FLOAT", "DOUBLE"):
        assert all(s.features[0, -2] >= 0 for s in segments)  # tempo_bpm


def test_a_plain_sine_wave_passes_the_same_check(tmp_path):
    """The check above accepts good audio (so its AudioError branch is not all it sees)."""
    t = np.arange(3 * 22050) / 22050
    path = str(tmp_path / "sine.wav")
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    assert len(check(path)) == 2


def teardown_module():
    print("\nfuzz outcomes:", dict(OUTCOMES.most_common()))
