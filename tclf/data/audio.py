"""Audio -> segments -> (spectrogram image, feature matrix): the one audio front end.

`tclf-extract` uses it to write data/ and `tclf-predict` in memory, so the model sees a
track the same way in training and in prediction. Per segment (10 s of mono audio at
22050 Hz) one STFT is computed, and every feature but the zero-crossing rate and the RMS
is derived from it. The 68 feature columns (one row per 1 s window) are listed in
docs/data-layout.md#feature-columns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import struct
import zlib

import numpy as np

from tclf import InputError

SAMPLE_RATE = 22050
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 128
TOP_DB = 80.0
IMAGE_SIZE = 299
WINDOWS = 10
NUM_FEATURES = 68
FEATURE_SHAPE = (WINDOWS, NUM_FEATURES)
COLORMAP = "magma"
# PNG encoding of the spectrograms (tclf-extract --png-compression, tclf-pack --png-compression):
# a zlib level 0-9 of tclf's own encoder, which writes no PNG row filter; 0 stores the rows
# uncompressed (about 268 kB a 299x299 PNG) and decodes several times faster than any
# compressed level (see docs/png-study.md).
PNG_COMPRESSION = 0
PNG_LEVELS = tuple(range(10))
# Samples are -1..1 (float files may go a little over); beyond this no audio is meant, and
# the spectrum's power would overflow float32 near 1e16.
MAX_PEAK = 1000.0
# The backbones, each with the spectrogram it reads (tclf-extract --backbone; recorded in
# extract.json, the manifest and the model). efficientnetb0: the 299x299 colour-mapped mel
# image. musicnn: its own input, log10(1 + 10000 mel) at 16 kHz (512-point FFT, hop 256,
# 96 bands), stored as 16-bit grayscale [frames, 96] of round(value * MUSICNN_SCALE).
EFFICIENTNET = "efficientnetb0"
MUSICNN = "musicnn"
BACKBONES = (EFFICIENTNET, MUSICNN)
MUSICNN_RATE = 16000
MUSICNN_N_FFT = 512
MUSICNN_HOP = 256
MUSICNN_MELS = 96
# A power of two: the stored integers divide back exactly. Values reach about 7 for loud
# music (a full-scale sine: 6.8); 16 is the ceiling, 1/8192 the largest rounding error.
MUSICNN_SCALE = 4096.0
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus",
                    ".m4a")

_PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FEATURE_NAMES = tuple(
    [f"mfcc_mean_{i:02d}" for i in range(1, 21)]
    + [f"mfcc_std_{i:02d}" for i in range(1, 16)]
    + [f"chroma_mean_{p}" for p in _PITCH_CLASSES]
    + [f"tonnetz_mean_{i}" for i in range(1, 7)]
    + ["centroid_mean", "centroid_std", "bandwidth_mean", "bandwidth_std",
       "rolloff_mean", "rolloff_std", "zcr_mean", "zcr_std",
       "rms_mean", "rms_std", "rms_max", "onset_mean", "onset_std",
       "tempo_bpm", "tempo_confidence"]
)
assert len(FEATURE_NAMES) == NUM_FEATURES  # A programming error, not an input check.


class AudioError(InputError):
    """An audio file that cannot be decoded or is too short to use."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """One analysed segment of a track.

    Attributes
    ----------
    index : int
        1-based position in the track (part_<index>.png / .npy).
    start : float
        Start time in seconds in the source audio.
    image : np.ndarray
        What the backbone reads: efficientnetb0, the mel spectrogram rendered as RGB
        uint8 [size, size, 3] (low frequencies at the bottom); musicnn, its quantized log-mel
        uint16 [frames, 96].
    features : np.ndarray [shape=(10, 68), dtype=float32]
        The feature matrix (columns: docs/data-layout.md#feature-columns).
    """

    index: int
    start: float
    image: np.ndarray
    features: np.ndarray

    def png_bytes(self, compression: int | None = None) -> bytes:
        """The image as PNG bytes (see :func:`encode_png`); default ``PNG_COMPRESSION``."""
        return encode_png(self.image, PNG_COMPRESSION if compression is None else compression)


def spectrogram_shape(backbone: str = EFFICIENTNET, segment_seconds: float = 10.0) -> tuple:
    """(height, width, channels) of the stored spectrogram that ``backbone`` reads."""
    if backbone == MUSICNN:
        samples = int(round(segment_seconds * MUSICNN_RATE))
        return (1 + samples // MUSICNN_HOP, MUSICNN_MELS, 1)
    return (IMAGE_SIZE, IMAGE_SIZE, 3)


def backbone_of_settings(settings: dict | None) -> str:
    """The backbone of extraction settings (extract.json, a manifest's or a model's); those
    of a tclf before the choice existed are efficientnetb0's."""
    return (settings or {}).get("backbone", EFFICIENTNET)


def check_backbone(backbone) -> str:
    if backbone not in BACKBONES:
        raise InputError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    return backbone


# ---------------------------------------------------------------------------
# Decoding and segmenting.
# ---------------------------------------------------------------------------


# Segments for training only, after the standard ones (tclf-extract --training-segments): up
# to this many more, non-overlapping, over the whole track. Real music needs them
# (docs/real-music.md#what-each-change-did); validation and prediction use the standard
# segments only.
TRAINING_SEGMENTS = 24


def training_segment_starts(duration: float, count: int, segment_seconds: float = 10.0
                            ) -> list[float]:
    """Start times of up to ``count`` training-only segments: non-overlapping, spread evenly
    over the whole track (intro and outro included), as many as fit."""
    return segment_starts(duration, count, segment_seconds, 0.0) if count > 0 else []


def segment_starts(duration: float, num_segments: int = 6, segment_seconds: float = 10.0,
                   skip_fraction: float = 0.1) -> list[float]:
    """Start times of the segments taken from a track.

    Segments never overlap. They are spread evenly over the body of the track
    (without the first and last ``skip_fraction``) when that fits
    ``num_segments``; otherwise over the whole track; a track that holds
    fewer than ``num_segments`` yields as many as fit; under one segment,
    none.

    Parameters
    ----------
    duration : float
        Length of the track in seconds.

    Returns
    -------
    starts : list of float, in seconds, ascending.
    """
    if num_segments < 1 or segment_seconds <= 0:
        raise InputError(f"num_segments must be >= 1 and segment_seconds > 0, got "
                         f"{num_segments} and {segment_seconds}")
    begin, end = duration * skip_fraction, duration * (1.0 - skip_fraction)
    if end - begin < num_segments * segment_seconds:
        begin, end = 0.0, duration
    count = min(num_segments, int(math.floor((end - begin) / segment_seconds + 1e-9)))
    if count <= 0:
        return []
    if count == 1:
        return [begin + (end - begin - segment_seconds) / 2.0]
    step = (end - begin - segment_seconds) / (count - 1)
    return [begin + i * step for i in range(count)]


def _to_mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def load_segments(path: str, num_segments: int = 6, segment_seconds: float = 10.0,
                  sample_rate: int = SAMPLE_RATE, skip_fraction: float = 0.1,
                  training_segments: int = 0) -> list[tuple[float, np.ndarray]]:
    """(start seconds, mono float32 samples at ``sample_rate``) of the ``num_segments``
    standard segments of an audio file, then of up to ``training_segments`` more.

    libsndfile's formats are read segment by segment (a long track is never decoded whole),
    others through librosa/audioread; the decoders' own messages are held back. AudioError,
    starting with the path, for a file that is missing, not a regular file, unreadable,
    empty, not decodable, shorter than one segment, or holds NaN, infinite or huge samples.
    """
    head = _first_bytes(path)
    length = int(round(segment_seconds * sample_rate))
    with _decoder_output_held_back():
        segments, source_rate, duration = _decode(path, head, num_segments, segment_seconds,
                                                  skip_fraction, training_segments)
    if not segments:
        raise AudioError(f"{path}: {math.floor(duration * 10) / 10:.1f} s is shorter than one "
                         f"{segment_seconds:g} s segment")
    for start, y in segments:
        if not np.all(np.isfinite(y)):
            raise AudioError(f"{path}: the segment at {start:.1f} s holds NaN or infinite "
                             f"samples (a damaged file?)")
        peak = float(np.max(np.abs(y))) if len(y) else 0.0
        if peak > MAX_PEAK:
            raise AudioError(f"{path}: the segment at {start:.1f} s holds samples far outside "
                             f"-1..1 (peak {peak:.3g}; a damaged float file?)")
    return [(start, _fit(_resample(y, source_rate, sample_rate), length))
            for start, y in segments]


def _first_bytes(path: str, size: int = 4096) -> bytes:
    """The file's first bytes, read before any decoder sees it, so that a missing, special,
    unreadable or empty file gets its own message (libsndfile calls them all "does not exist
    or is not a regular file"), and a FIFO is never opened (reading it would wait forever)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise AudioError(f"{path}: no such file{broken}") from None
    except OSError as error:
        raise AudioError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise AudioError(f"{path}: not a regular file ({kind})")
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except PermissionError:
        raise AudioError(f"{path}: cannot read it (permission denied)") from None
    except OSError as error:
        raise AudioError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not head:
        raise AudioError(f"{path}: empty file (0 bytes)")
    return head


def _looks_like_text(head: bytes) -> bool:
    """True for bytes that are printable UTF-8 text (a playlist, notes, an HTML error page)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # The 4096 bytes may end inside a multi-byte character.
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _decode(path, head, num_segments, segment_seconds, skip_fraction, training_segments=0):
    """(segments, source_rate, duration): libsndfile first, then audioread."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            source_rate, frames = f.samplerate, f.frames
            if frames <= 0 or source_rate <= 0:
                raise AudioError(f"{path}: no audio frames (the file holds a header only)")
            duration = frames / source_rate
            starts = _starts(duration, num_segments, segment_seconds, skip_fraction,
                             training_segments)
            segments = []
            for start in starts:
                f.seek(int(round(start * source_rate)))
                y = _to_mono(f.read(int(math.ceil(segment_seconds * source_rate)),
                                    dtype="float32", always_2d=False))
                segments.append((start, y))
            return segments, source_rate, duration
    except AudioError:
        raise
    except Exception as error:  # libsndfile cannot read it: try audioread, segment by segment.
        first_error = error
    try:
        import warnings

        import librosa

        with warnings.catch_warnings():  # librosa warns about its own fallback; we report.
            warnings.simplefilter("ignore")
            duration = librosa.get_duration(path=path)
            starts = _starts(duration, num_segments, segment_seconds, skip_fraction,
                             training_segments)
            segments = []
            for start in starts:
                y, source_rate = librosa.load(path, sr=None, mono=True, offset=start,
                                              duration=segment_seconds)
                segments.append((start, y))
            if not starts:
                source_rate = 0
            return segments, source_rate, duration
    except Exception:
        pass
    raise AudioError(f"{path}: not a decodable audio file ({_reason(path, head, first_error)})")


def _starts(duration, num_segments, segment_seconds, skip_fraction, training_segments):
    standard = segment_starts(duration, num_segments, segment_seconds, skip_fraction)
    if len(standard) < num_segments:  # A short track: the standard ones hold all of it.
        return standard
    # Not twice the same audio: a training segment where a standard one is, is left out.
    return standard + [t for t in training_segment_starts(duration, training_segments,
                                                          segment_seconds)
                       if min(abs(t - s) for s in standard) >= segment_seconds / 2]


def _reason(path: str, head: bytes, error: Exception) -> str:
    """Why no decoder took the file, in words: libsndfile's message without its "Error opening
    '<path>': " prefix, and without its "does not exist or is not a regular file (possibly a
    pipe?)", which it says of a corrupt mp3 (the file was just read: it exists)."""
    if _looks_like_text(head):
        return "it holds text"
    message = str(error).strip()
    prefix = f"Error opening {path!r}: "
    message = (message[len(prefix):] if message.startswith(prefix)
               else re.sub(r"^Error opening .*?: ", "", message, flags=re.DOTALL)).strip()
    if not message or "not a regular file" in message or "does not exist" in message:
        return "unrecognised or corrupt data"
    return message.rstrip(".")


@contextlib.contextmanager
def _decoder_output_held_back():
    """Send what C decoders write to file descriptor 2 (libmpg123's "Note: Illegal
    Audio-MPEG-Header", ffmpeg's lines) to /dev/null while a file is decoded.

    The AudioError raised for a broken file says what is wrong; the raw lines only confuse.
    TCLF_DEBUG=1 lets them through. Without a file descriptor 2 (or when it cannot be
    duplicated) the decode runs as is. Python's own sys.stderr is flushed first and is not
    written to in between (decoding emits no Python output; warnings are caught).
    """
    import os
    import sys

    if os.environ.get("TCLF_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or odd sys.stderr: nothing to flush.
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _resample(y: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return y.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(y, source_rate, target_rate, quality="HQ").astype(np.float32)


def _fit(y: np.ndarray, length: int) -> np.ndarray:
    if len(y) >= length:
        return np.ascontiguousarray(y[:length])
    return np.pad(y, (0, length - len(y)))


# ---------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _filter_banks(sample_rate: int):
    import librosa

    mel = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
    chroma = librosa.filters.chroma(sr=sample_rate, n_fft=N_FFT).astype(np.float32)
    frequencies = librosa.fft_frequencies(sr=sample_rate, n_fft=N_FFT).astype(np.float32)
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann, as librosa.
    return mel, chroma, frequencies, window


@functools.lru_cache(maxsize=2)
def _colormap_lut(name: str = COLORMAP) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def _stft_magnitude(y: np.ndarray, window: np.ndarray) -> np.ndarray:
    """|STFT| [shape=(1 + N_FFT/2, frames)], centred frames, as librosa.stft."""
    import scipy.fft

    padded = np.pad(y, N_FFT // 2, mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    # scipy keeps float32 in complex64 (numpy would widen to complex128): half the memory traffic.
    return np.abs(scipy.fft.rfft(frames * window, axis=1)).T


@functools.lru_cache(maxsize=1)
def _musicnn_filters():
    import librosa

    return librosa.filters.mel(sr=MUSICNN_RATE, n_fft=MUSICNN_N_FFT,
                               n_mels=MUSICNN_MELS).astype(np.float32)


def musicnn_input(y: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """musicnn's input for one segment, quantized: uint16 [frames, 96] of
    round(log10(1 + 10000 mel) * MUSICNN_SCALE), mel as librosa.feature.melspectrogram(
    sr=16000, n_fft=512, hop_length=256, n_mels=96) computes it, all in float32 (musicnn's
    own float16 overflows to inf on loud bands)."""
    import librosa

    y16 = _resample(np.asarray(y, np.float32), sample_rate, MUSICNN_RATE)
    power = np.abs(librosa.stft(y16, n_fft=MUSICNN_N_FFT, hop_length=MUSICNN_HOP)) ** 2
    log_mel = np.log10(1.0 + 10000.0 * (_musicnn_filters() @ power)).T
    return np.ascontiguousarray(np.clip(np.rint(log_mel * MUSICNN_SCALE), 0, 65535),
                                dtype=np.uint16)


def render_image(mel_db: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Map a mel dB matrix to an RGB image, with no axes and no margins.

    Parameters
    ----------
    mel_db : np.ndarray [shape=(n_mels, frames)]
        Mel power in dB relative to the segment's maximum, within [-TOP_DB, 0].

    Returns
    -------
    image : np.ndarray [shape=(size, size, 3), dtype=uint8]
    """
    from PIL import Image

    scaled = np.clip((mel_db + TOP_DB) / TOP_DB, 0.0, 1.0)[::-1]  # Low frequencies at the bottom.
    resized = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32), mode="F").resize(
        (size, size), Image.BILINEAR)
    index = np.clip(np.asarray(resized) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _colormap_lut()[index]


def check_png_compression(compression) -> int:
    """``compression`` if it is a level 0-9; InputError otherwise."""
    if (isinstance(compression, int) and not isinstance(compression, bool)
            and compression in PNG_LEVELS):
        return compression
    raise InputError(f"PNG compression must be a level 0-9, got {compression!r}")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, compression: int = PNG_COMPRESSION) -> bytes:
    """Encode an RGB uint8 image (or a uint16 grayscale one [H, W], musicnn's input) as PNG
    bytes; the pixels decode the same at every setting.

    Parameters
    ----------
    image : np.ndarray [shape=(height, width, 3), dtype=uint8] or [(height, width), uint16]
    compression : int
        A zlib level 0-9: 8-bit RGB, one IDAT chunk, every row with filter type 0 (none).
        A colour-mapped spectrogram compresses better unfiltered than with the adaptive
        filters of Pillow or libpng (the colour map's few, repeated byte triples turn
        into noise when differenced), and its rows decode without the unfiltering pass.
        Level 0 writes stored deflate blocks: decoding is a copy and two checksums.
    """
    compression = check_png_compression(compression)
    image = np.asarray(image)
    if image.dtype == np.uint16 and image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint16 and image.ndim == 2:
        height, width = image.shape
        depth, colour = 16, 0
        data = np.ascontiguousarray(image, dtype=">u2").view(np.uint8)  # PNG: big-endian.
    elif image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        height, width, _ = image.shape
        depth, colour, data = 8, 2, image
    else:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3] or a uint16 grayscale one "
                         f"[H, W], got {image.dtype} {image.shape}")
    data = data.reshape(height, -1)
    rows = np.empty((height, data.shape[1] + 1), np.uint8)
    rows[:, 0] = 0  # Filter type 0 (none) on every row.
    rows[:, 1:] = data
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)  # No interlace.
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compression))
            + _png_chunk(b"IEND", b""))


def _window_stats(frames: np.ndarray, window_of_frame: np.ndarray, windows: int):
    """Mean and std over frames per window. frames [shape=(d, t)] -> 2x [shape=(windows, d)].

    window_of_frame is non-decreasing and covers every window, so each window is
    a contiguous run of frames and np.add.reduceat sums it.
    """
    starts = np.searchsorted(window_of_frame, np.arange(windows))
    counts = np.diff(np.append(starts, len(window_of_frame)))[:, None].astype(np.float64)
    values = frames.T.astype(np.float64)
    mean = np.add.reduceat(values, starts, axis=0) / counts
    squares = np.add.reduceat(values**2, starts, axis=0) / counts
    return mean, np.sqrt(np.maximum(squares - mean**2, 0.0))


def analyze_segment(y: np.ndarray, sample_rate: int = SAMPLE_RATE, image_size: int = IMAGE_SIZE,
                    windows: int = WINDOWS, backbone: str = EFFICIENTNET
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Spectrogram image and feature matrix of one segment.

    Parameters
    ----------
    y : np.ndarray [shape=(n,)]
        Mono audio of one segment (normally 10 s at ``sample_rate``).

    Returns
    -------
    image : np.ndarray [shape=(image_size, image_size, 3), dtype=uint8], or with the
        musicnn backbone its input (:func:`musicnn_input`)
    features : np.ndarray [shape=(windows, 68), dtype=float32]
    """
    import librosa

    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or len(y) < N_FFT:
        raise AudioError(f"segment must be mono with at least {N_FFT} samples, got shape {y.shape}")
    mel_basis, chroma_basis, frequencies, window = _filter_banks(sample_rate)
    magnitude = _stft_magnitude(y, window)  # [1025, t]
    power = magnitude**2
    mel = mel_basis @ power  # [128, t]
    mel_db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    peak = mel_db.max()
    image = (musicnn_input(y, sample_rate) if backbone == MUSICNN
             else render_image(np.maximum(mel_db - peak, -TOP_DB), image_size))

    # MFCC as librosa.feature.mfcc(S=power_to_db(mel), n_mfcc=20): top_db clipped, DCT-II ortho.
    import scipy.fft

    mfcc = scipy.fft.dct(np.maximum(mel_db, peak - TOP_DB), axis=0, type=2, norm="ortho")[:20]
    chroma = chroma_basis @ power
    chroma /= np.maximum(chroma.max(axis=0, keepdims=True), 1e-10)  # As chroma_stft (inf-norm).
    tonnetz = librosa.feature.tonnetz(chroma=chroma, sr=sample_rate)
    centroid, bandwidth, rolloff = _spectral_shape(magnitude, frequencies)
    zcr = _zero_crossing_rate(y)
    rms = librosa.feature.rms(y=y, frame_length=N_FFT, hop_length=HOP_LENGTH)[0]
    onset = librosa.onset.onset_strength(S=np.maximum(mel_db, peak - TOP_DB), sr=sample_rate,
                                         hop_length=HOP_LENGTH)
    tempo, confidence = _tempo(onset, sample_rate)

    frames = magnitude.shape[1]
    if frames < 2 * windows:
        raise AudioError(f"segment of {len(y)} samples is too short for {windows} windows")
    seconds = len(y) / sample_rate
    window_of_frame = np.minimum(
        (np.arange(frames) * HOP_LENGTH / sample_rate * windows / seconds).astype(np.int64),
        windows - 1)
    per_frame = np.vstack([mfcc, chroma, tonnetz, centroid, bandwidth, rolloff,
                           zcr[:frames], rms[:frames], onset[:frames]])
    mean, std = _window_stats(per_frame, window_of_frame, windows)
    # Rows of per_frame: 0-19 mfcc, 20-31 chroma, 32-37 tonnetz, 38 centroid, 39 bandwidth,
    # 40 rolloff, 41 zcr, 42 rms, 43 onset.
    rms_max = np.maximum.reduceat(rms[:frames], np.searchsorted(window_of_frame,
                                                                 np.arange(windows)))
    spectral = np.stack([mean[:, 38:44], std[:, 38:44]], axis=2).reshape(windows, 12)[:, :10]
    features = np.hstack([
        mean[:, 0:20], std[:, 0:15], mean[:, 20:32], mean[:, 32:38],
        spectral,  # centroid, bandwidth, rolloff, zcr, rms: (mean, std) each.
        rms_max[:, None], mean[:, 43:44], std[:, 43:44],
        np.full((windows, 1), tempo), np.full((windows, 1), confidence),
    ]).astype(np.float32)
    return image, features


def _spectral_shape(magnitude: np.ndarray, frequencies: np.ndarray):
    """Centroid, bandwidth (p=2) and 85% roll-off per frame, as librosa's, in one pass.

    librosa normalizes the spectrogram once per feature; here the three share it.
    """
    magnitude = magnitude.astype(np.float64)
    total = magnitude.sum(axis=0)
    safe = np.where(total > 0, total, 1.0)
    centroid = (frequencies @ magnitude) / safe
    second = (frequencies.astype(np.float64) ** 2 @ magnitude) / safe
    bandwidth = np.sqrt(np.maximum(second - centroid**2, 0.0))
    cumulative = np.cumsum(magnitude, axis=0)
    rolloff = frequencies[np.argmax(cumulative >= 0.85 * cumulative[-1], axis=0)]
    return centroid, bandwidth, rolloff


def _zero_crossing_rate(y: np.ndarray) -> np.ndarray:
    """Sign changes per sample in each centred STFT frame, as librosa.feature.zero_crossing_rate."""
    padded = np.pad(y, N_FFT // 2, mode="edge")
    negative = np.signbit(np.where(np.abs(padded) <= 1e-10, 0.0, padded))
    counts = np.concatenate([[0], np.cumsum(negative[1:] != negative[:-1])])
    starts = np.arange(0, len(padded) - N_FFT + 1, HOP_LENGTH)
    return (counts[starts + N_FFT - 1] - counts[starts]) / N_FFT


def _tempo(onset: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """Tempo (BPM) of an onset envelope and how clearly it pulses (0-1)."""
    import librosa

    tempo = float(librosa.feature.tempo(onset_envelope=onset, sr=sample_rate,
                                        hop_length=HOP_LENGTH)[0])
    centred = onset - onset.mean()
    autocorrelation = librosa.autocorrelate(centred)
    if autocorrelation[0] <= 0 or tempo <= 0:
        return tempo, 0.0
    lag = int(round(60.0 * sample_rate / HOP_LENGTH / tempo))
    if lag >= len(autocorrelation):
        return tempo, 0.0
    return tempo, float(np.clip(autocorrelation[lag] / autocorrelation[0], 0.0, 1.0))


def analyze_file(path: str, num_segments: int = 6, segment_seconds: float = 10.0,
                 sample_rate: int = SAMPLE_RATE, image_size: int = IMAGE_SIZE,
                 skip_fraction: float = 0.1, training_segments: int = 0,
                 backbone: str = EFFICIENTNET) -> list[Segment]:
    """All segments of one audio file, analysed: the standard ones (indices 1 to
    num_segments at most), then the training-only ones (:func:`load_segments`).

    Raises
    ------
    AudioError
        For an unusable file (see :func:`load_segments`), or one whose samples are so far out
        of range that a feature overflows (a float WAV of 1e30s); the message names the file.
    """
    segments = []
    for index, (start, y) in enumerate(
            load_segments(path, num_segments, segment_seconds, sample_rate, skip_fraction,
                          training_segments), start=1):
        try:
            image, features = analyze_segment(y, sample_rate, image_size, backbone=backbone)
        except AudioError as error:
            raise AudioError(f"{path}: {error}") from None
        if not np.all(np.isfinite(features)):
            raise AudioError(f"{path}: the segment at {start:.1f} s gives non-finite features "
                             f"(samples far outside -1..1?)")
        segments.append(Segment(index, start, image, features))
    return segments


def is_audio_file(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)
