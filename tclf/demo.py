"""Synthetic trance-like demo audio: numpy-rendered drum-machine and oscillator patterns.

Not real music: it lets the demo and the tests run the whole pipeline without copyrighted
audio, on something learnable; accuracy on it says nothing about real tracks. The styles
differ roughly as the sub-genres do: goa (135-145 BPM, bright saw arpeggios, pad, off-beat
bass, pumping kick), psy (140-148 BPM, sparse, rolling "KBBB" bass, blips) and dark (148-165
BPM, low-passed, distorted kick, dissonant drone, noise sweeps). Each track draws tempo, key,
patterns, levels and filters from its own seeded generator (deterministic) and has an intro,
a breakdown (tracks of 45 s or more), an outro and fades. Each instrument is rendered once
per 8-bar loop, filtered circularly in the frequency domain and tiled over the track.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

import numpy as np
import soundfile as sf

from tclf import storage

__all__ = ["STYLES", "TEMPO_RANGES", "track_seed", "synthesize_track", "make_demo_audio"]

#: The synthetic styles, in label order.
STYLES = ("goa", "psy", "dark")

#: Tempo range (BPM, inclusive) each style draws its tempo from.
TEMPO_RANGES = {"goa": (135.0, 145.0), "psy": (140.0, 148.0), "dark": (148.0, 165.0)}

_PEAK = 0.9
_LOOP_BARS = 8
_STEPS_PER_BAR = 16
_TABLE_SIZE = 4096


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------


def _style_code(style: str) -> int:
    return zlib.crc32(style.encode("utf-8"))


def track_seed(seed: int, style: str, index: int) -> int:
    """The 32-bit seed of track ``index`` of ``style`` in the demo set seeded ``seed``, for
    :func:`synthesize_track`. It does not depend on the other styles or on how many tracks
    are made. ValueError for an unknown style or a negative seed or index.
    """
    _check_style(style)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    sequence = np.random.SeedSequence([int(seed), _style_code(style), int(index)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


# --------------------------------------------------------------------------
# DSP helpers (all vectorized)
# --------------------------------------------------------------------------


def _midi_hz(note) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(note, dtype=float) - 69.0) / 12.0)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _level(x: np.ndarray, db: float) -> np.ndarray:
    """Scale ``x`` to an RMS of ``db`` dB (relative to 1.0)."""
    rms = _rms(x)
    if rms <= 1e-12:
        return x
    return x * (10.0 ** (db / 20.0) / rms)


def _filter_response(
    freqs: np.ndarray,
    lowpass: float | None = None,
    highpass: float | None = None,
    order: int = 2,
    resonance: float = 0.0,
) -> np.ndarray:
    """Butterworth-like magnitude response, optionally with a resonant bump."""
    def butterworth(ratio_squared: np.ndarray, n: int) -> np.ndarray:
        power = ratio_squared
        for _ in range(n - 1):  # integer power by multiplication (fast)
            power = power * ratio_squared
        return 1.0 / np.sqrt(1.0 + power)

    h = np.ones_like(freqs)
    if lowpass is not None:
        h *= butterworth(np.square(freqs / lowpass), order)
        if resonance > 0:
            band = (freqs > lowpass / 2) & (freqs < lowpass * 2)
            logf = np.log2(freqs[band] / lowpass)
            h[band] *= 1.0 + resonance * np.exp(-0.5 * (logf / 0.15) ** 2)
    if highpass is not None:
        h *= butterworth(np.square(highpass / np.maximum(freqs, 1e-3)), order)
    return h


def _filter(x: np.ndarray, sr: int, **kwargs) -> np.ndarray:
    """Zero-phase circular filter of a loop in the frequency domain.

    Circular filtering suits loops: the tail of the loop's end wraps into its
    start, exactly as it does when the loop is tiled.
    """
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.shape[0], 1.0 / sr)
    return np.fft.irfft(spectrum * _filter_response(freqs, **kwargs), n=x.shape[0])


def _filter_oneshot(x: np.ndarray, sr: int, **kwargs) -> np.ndarray:
    """Filter a one-shot sound (zero-padded so that nothing wraps audibly)."""
    n = x.shape[0]
    padded = np.concatenate([x, np.zeros(n)])
    return _filter(padded, sr, **kwargs)[:n]


def _wavetable(amplitudes: np.ndarray) -> np.ndarray:
    """One period of a sum of sines; ``amplitudes[k]`` is harmonic ``k+1``."""
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)
    spectrum[1 : amplitudes.shape[0] + 1] = -0.5j * _TABLE_SIZE * amplitudes
    table = np.fft.irfft(spectrum, n=_TABLE_SIZE)
    return np.append(table, table[0])  # guard point for interpolation


def _harmonics(freq: float, sr: int, kind: str = "saw", rolloff: float = 0.0,
               max_harmonics: int = 60) -> np.ndarray:
    """Band-limited harmonic amplitudes of a saw / square / mix waveform."""
    count = int(max(1, min(max_harmonics, (0.45 * sr) // max(freq, 1.0), _TABLE_SIZE // 2 - 1)))
    k = np.arange(1, count + 1, dtype=float)
    amps = 1.0 / k
    if kind == "square":
        amps = np.where(k % 2 == 1, amps, 0.0)
    elif kind == "mix":  # half saw, half square
        amps = 0.5 * amps + 0.5 * np.where(k % 2 == 1, amps, 0.0)
    elif kind == "sine":
        amps = (k == 1).astype(float)
    return amps * np.exp(-rolloff * (k - 1))


def _osc(freq: float, n: int, sr: int, kind: str = "saw", rolloff: float = 0.0,
         phase: float = 0.0) -> np.ndarray:
    """Band-limited wavetable oscillator at a fixed frequency, ``shape=(n,)``."""
    table = _wavetable(_harmonics(freq, sr, kind, rolloff))
    position = np.mod(freq * np.arange(n) / sr + phase, 1.0) * _TABLE_SIZE
    index = position.astype(np.int64)
    frac = position - index
    return table[index] + frac * (table[index + 1] - table[index])


def _supersaw(freq: float, n: int, sr: int, rng: np.random.Generator, detune_cents: float,
              voices: int = 2, kind: str = "saw", rolloff: float = 0.0) -> np.ndarray:
    spread = np.linspace(-detune_cents, detune_cents, voices) if voices > 1 else np.zeros(1)
    out = np.zeros(n)
    for cents in spread:
        out += _osc(freq * 2.0 ** (cents / 1200.0), n, sr, kind, rolloff, rng.random())
    return out / voices


def _envelope(n: int, sr: int, attack: float, decay: float, gate: float | None = None,
              release: float = 0.005) -> np.ndarray:
    """Attack / exponential-decay envelope, with an optional gate + release."""
    t = np.arange(n) / sr
    env = np.minimum(1.0, t / attack) if attack > 0 else np.ones(n)
    env = env * np.exp(-t / decay)
    if gate is not None:
        env = env * np.exp(-np.maximum(t - gate, 0.0) / release)
    if n > 8:  # avoid a click where the sample is cut
        env[-8:] *= np.linspace(1.0, 0.0, 8)
    return env


def _kick(sr: int, rng: np.random.Generator, f_start: float, f_end: float,
          decay: float, length: float, drive: float = 1.0, click: float = 0.3) -> np.ndarray:
    n = max(16, int(length * sr))
    t = np.arange(n) / sr
    freq = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.02, 0.04))
    body = np.sin(2.0 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / decay)
    tick = rng.standard_normal(n) * np.exp(-t / 0.002) * click
    x = body + _filter_oneshot(tick, sr, highpass=1500.0)
    if drive > 1.0:
        x = np.tanh(drive * x) / np.tanh(drive)
    x[-16:] *= np.linspace(1.0, 0.0, 16)
    return x


def _noise_hit(sr: int, rng: np.random.Generator, decay: float, length: float,
               **filter_kwargs) -> np.ndarray:
    n = max(16, int(length * sr))
    x = _filter_oneshot(rng.standard_normal(n), sr, **filter_kwargs)
    return x * _envelope(n, sr, 0.0005, decay)


def _backbeat_snare(grid, sr, rng, chance: float, decay: tuple, level_db: float):
    """With probability ``chance``, a snare on beats 2 and 4 of every bar (else silence)."""
    if rng.random() >= chance:
        return 0.0
    snare = grid.loop()
    _place(snare, _snare(sr, rng, rng.uniform(180, 240), rng.uniform(*decay)),
           grid.positions(range(4, grid.n_steps, 8)))
    return _level(snare, _jitter(rng, level_db))


def _snare(sr: int, rng: np.random.Generator, tone: float, decay: float) -> np.ndarray:
    n = int(0.25 * sr)
    t = np.arange(n) / sr
    body = np.sin(2.0 * np.pi * tone * t) * np.exp(-t / 0.03)
    noise = _noise_hit(sr, rng, decay, 0.25, highpass=1200.0, lowpass=7000.0)
    return 0.5 * body / (np.abs(body).max() + 1e-9) + noise / (np.abs(noise).max() + 1e-9)


def _place(loop: np.ndarray, sample: np.ndarray, positions, gains=None) -> None:
    """Add ``sample`` into ``loop`` at each position, wrapping around the end."""
    n = loop.shape[0]
    sample = sample[:n]
    m = sample.shape[0]
    for i, position in enumerate(positions):
        gain = 1.0 if gains is None else float(gains[i])
        p = int(position) % n
        end = p + m
        if end <= n:
            loop[p:end] += gain * sample
        else:
            loop[p:] += gain * sample[: n - p]
            loop[: end - n] += gain * sample[n - p :]


def _largest_prime_factor(n: int) -> int:
    largest, p = 1, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            largest = p
        p += 1
    return max(largest, n) if n > 1 else largest


def _fft_friendly_step(bpm: float, sr: int, tempo_range: tuple[float, float]) -> int:
    """A 16th-note length in samples close to ``bpm`` that keeps loop FFTs fast.

    A loop is ``128 * step`` samples long; a large prime factor in ``step``
    makes numpy's FFT fall back to a ~25x slower algorithm. Among the steps
    within 1% of the target (and inside ``tempo_range``) the closest one whose
    largest prime factor is <= 47 is used.
    """
    target = sr * 60.0 / bpm / 4.0
    lo = max(1, int(np.ceil(max(target * 0.99, sr * 15.0 / tempo_range[1]))))
    hi = max(lo, int(np.floor(min(target * 1.01, sr * 15.0 / tempo_range[0]))))
    candidates = sorted(range(lo, hi + 1), key=lambda step: abs(step - target))
    for step in candidates:
        if _largest_prime_factor(step) <= 47:
            return step
    return max(1, int(round(target)))


class _Grid:
    """Timing of one track: a 16th-note step of a whole number of samples."""

    def __init__(self, bpm: float, sr: int, tempo_range: tuple[float, float]):
        self.sr = sr
        self.step = _fft_friendly_step(bpm, sr, tempo_range)
        self.bpm = sr * 60.0 / (4.0 * self.step)  # exact tempo after rounding
        self.n_steps = _LOOP_BARS * _STEPS_PER_BAR
        self.length = self.n_steps * self.step
        self.bar_seconds = _STEPS_PER_BAR * self.step / sr
        self.step_seconds = self.step / sr

    def positions(self, steps) -> np.ndarray:
        return np.asarray(list(steps), dtype=np.int64) * self.step

    def loop(self) -> np.ndarray:
        return np.zeros(self.length)


def _sidechain(grid: _Grid, rng: np.random.Generator, depth: tuple[float, float]) -> np.ndarray:
    """Per-beat gain that ducks under the kick and recovers ("pumping").

    Besides being the sound of the genre, the pumping makes the beat (not the
    16th-note grid) the dominant period of the onset envelope.
    """
    beat = 4 * grid.step
    t = np.arange(beat) / grid.sr
    release = rng.uniform(0.25, 0.45) * beat / grid.sr
    duck = 1.0 - rng.uniform(*depth) * np.exp(-t / release)
    m = min(int(0.004 * grid.sr), beat // 4)  # glide down just before the next kick
    if m > 1:
        duck[-m:] = np.linspace(duck[-m], duck[0], m)
    return np.tile(duck, grid.n_steps // 4)


def _jitter(rng: np.random.Generator, db: float, spread: float = 1.5) -> float:
    return db + float(np.clip(rng.normal(0.0, spread), -2 * spread, 2 * spread))


# --------------------------------------------------------------------------
# Styles
# --------------------------------------------------------------------------

_SCALES = (
    (0, 2, 3, 5, 7, 8, 10),  # natural minor
    (0, 2, 3, 5, 7, 8, 11),  # harmonic minor
    (0, 1, 3, 5, 7, 8, 10),  # phrygian
)
_PROGRESSIONS = ((0, 5, 6, 4), (0, 5, 3, 4), (0, 3, 5, 6), (0, 6, 5, 6), (0, 4, 5, 3), (0, 5, 2, 6))
_ARPEGGIOS = (
    (0, 1, 2, 3) * 4,
    (3, 2, 1, 0) * 4,
    (0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3),
    (0, 2, 1, 3) * 4,
    (0, 1, 0, 2, 0, 3, 0, 2) * 2,
    (0, 2, 3, 1, 2, 0, 3, 2) * 2,
)


def _render_goa(rng: np.random.Generator, sr: int):
    grid = _Grid(rng.uniform(*TEMPO_RANGES["goa"]), sr, TEMPO_RANGES["goa"])
    step = grid.step
    scale = _SCALES[rng.integers(len(_SCALES))]
    progression = _PROGRESSIONS[rng.integers(len(_PROGRESSIONS))]
    lead_root = int(rng.integers(57, 65))  # A3 .. E4

    def degree(d: int) -> int:
        return scale[d % 7] + 12 * (d // 7)

    def chord(d: int) -> list[int]:
        return [degree(d), degree(d + 2), degree(d + 4), degree(d + 7)]

    # --- drums: four-on-the-floor kick, open hats on the off-beats, 16th hats
    perc = grid.loop()
    kick = _kick(sr, rng, rng.uniform(180, 250), rng.uniform(45, 55), rng.uniform(0.16, 0.24), 0.4,
                 click=rng.uniform(0.6, 1.0))
    kick_loop = grid.loop()
    _place(kick_loop, kick, grid.positions(range(0, grid.n_steps, 4)))
    kicks = _level(kick_loop, 0.0)
    open_hat = _noise_hit(sr, rng, rng.uniform(0.1, 0.2), 0.4, highpass=rng.uniform(6000, 8000))
    hats = grid.loop()
    _place(hats, open_hat, grid.positions(range(2, grid.n_steps, 4)))
    closed = _noise_hit(sr, rng, rng.uniform(0.015, 0.03), 0.1, highpass=rng.uniform(8000, 9500))
    closed_steps = [s for s in range(grid.n_steps) if s % 4 in (1, 3)]
    _place(hats, closed, grid.positions(closed_steps), rng.uniform(0.25, 0.5, len(closed_steps)))
    perc += _level(hats, _jitter(rng, -11.0))
    perc += _backbeat_snare(grid, sr, rng, 0.7, (0.06, 0.12), -18.0)

    # --- lead: detuned saw arpeggio over the progression, 2 bars per chord
    arp = np.array(_ARPEGGIOS[rng.integers(len(_ARPEGGIOS))])
    octave_up = (rng.random(16) < rng.uniform(0.0, 0.25)) * 12
    variant = int(rng.integers(3))  # how bars 5-8 differ from bars 1-4
    rolloff = rng.uniform(0.02, 0.09)
    detune = rng.uniform(6, 16)
    gate = rng.uniform(0.5, 0.9) * step / sr
    decay = rng.uniform(0.08, 0.25)
    note_len = 2 * step
    env = _envelope(note_len, sr, 0.008, decay, gate=gate, release=0.01)
    cache: dict[int, np.ndarray] = {}
    lead = grid.loop()
    for s in range(grid.n_steps):
        bar = s // _STEPS_PER_BAR
        tones = chord(progression[(bar // 2) % 4])
        i = s % 16
        pattern = arp
        extra = octave_up[i]
        if bar >= 4 and variant == 1:
            extra += 12
        elif bar >= 4 and variant == 2:
            pattern = np.roll(arp, 2)
        note = lead_root + tones[pattern[i]] + extra
        if note not in cache:
            cache[note] = _supersaw(_midi_hz(note), note_len, sr, rng, detune, 2, "saw", rolloff) * env
        _place(lead, cache[note], [s * step], [0.8 + 0.2 * (i % 4 == 0)])
    feedback = rng.uniform(0.25, 0.45)
    lead = lead + feedback * np.roll(lead, 3 * step) + feedback**2 * np.roll(lead, 6 * step)

    # --- pad: sustained chord, 2 bars each
    pad = grid.loop()
    pad_len = 2 * _STEPS_PER_BAR * step
    pad_env = np.minimum(1.0, np.arange(pad_len) / (0.3 * sr)) * np.minimum(
        1.0, (pad_len - np.arange(pad_len)) / (0.2 * sr))
    for c in range(4):
        tones = chord(progression[c])[:3]
        sound = sum(_supersaw(_midi_hz(lead_root - 12 + t), pad_len, sr, rng, 10.0, 2, "saw", 0.12)
                    for t in tones)
        for half in range(2):
            _place(pad, sound * pad_env, [(half * 8 + c * 2) * _STEPS_PER_BAR * step])
    music = _level(lead, _jitter(rng, -5.0)) + _level(pad, _jitter(rng, -14.0))
    pump = _sidechain(grid, rng, (0.25, 0.5))
    music *= pump

    # --- bass: off-beat bass following the chord roots
    bass_steps = ((2,), (2, 3), (3,), (2,))[rng.integers(4)]
    bass = grid.loop()
    bass_env = _envelope(step * len(bass_steps), sr, 0.002, rng.uniform(0.06, 0.12),
                         gate=0.85 * step * len(bass_steps) / sr)
    bass_cache: dict[int, np.ndarray] = {}
    for beat in range(grid.n_steps // 4):
        bar = beat // 4
        note = lead_root - 24 + degree(progression[(bar // 2) % 4])
        while note > 45:
            note -= 12
        if note not in bass_cache:
            bass_cache[note] = _osc(_midi_hz(note), bass_env.shape[0], sr, "saw", 0.05) * bass_env
        _place(bass, bass_cache[note], [(beat * 4 + bass_steps[0]) * step])
    bass = _filter(bass, sr, lowpass=rng.uniform(700, 1500), order=2)
    bass = _level(bass, _jitter(rng, -4.0)) * pump
    return grid, {"kick": kicks, "perc": perc, "bass": bass, "music": music}


def _kbbb_bass(grid: _Grid, rng: np.random.Generator, root: int, offsets_per_bar: np.ndarray,
               kind: str, rolloff: float, decay: float, detune: float, voices: int,
               fill_offsets=None) -> np.ndarray:
    """Rolling bass: three 16th notes after every kick (steps 1, 2, 3 of a beat)."""
    sr, step = grid.sr, grid.step
    env = _envelope(step, sr, 0.001, decay, gate=0.85 * step / sr, release=0.004)
    velocities = np.clip(np.array([0.85, 1.0, 0.92]) + rng.normal(0, 0.05, 3), 0.6, 1.0)
    cache: dict[int, np.ndarray] = {}
    loop = grid.loop()
    for s in range(grid.n_steps):
        if s % 4 == 0:
            continue
        offset = offsets_per_bar[s % 16]
        if fill_offsets is not None and s // 16 in (3, 7) and s % 16 >= 12:
            offset = fill_offsets[s % 4 - 1]
        note = int(root + offset)
        if note not in cache:
            cache[note] = _supersaw(_midi_hz(note), step, sr, rng, detune, voices, kind, rolloff) * env
        _place(loop, cache[note], [s * step], [velocities[s % 4 - 1]])
    return loop


def _render_psy(rng: np.random.Generator, sr: int):
    grid = _Grid(rng.uniform(*TEMPO_RANGES["psy"]), sr, TEMPO_RANGES["psy"])
    step = grid.step
    root = int(rng.integers(28, 36))  # E1 .. B1

    # --- drums: short punchy kick (it must not overlap the bass), sparse hats
    perc = grid.loop()
    kick = _kick(sr, rng, rng.uniform(200, 300), rng.uniform(50, 58), rng.uniform(0.04, 0.07),
                 step / sr, click=0.5)
    kick_loop = grid.loop()
    _place(kick_loop, kick, grid.positions(range(0, grid.n_steps, 4)))
    kicks = _level(kick_loop, 0.0)
    hats = grid.loop()
    hat = _noise_hit(sr, rng, rng.uniform(0.02, 0.045), 0.1, highpass=rng.uniform(8000, 10000))
    _place(hats, hat, grid.positions(range(2, grid.n_steps, 4)))
    if rng.random() < 0.5:
        shaker_steps = [s for s in range(grid.n_steps) if s % 2 == 1 and rng.random() < 0.6]
        _place(hats, hat * 0.3, grid.positions(shaker_steps))
    perc += _level(hats, _jitter(rng, -15.0))
    perc += _backbeat_snare(grid, sr, rng, 0.4, (0.04, 0.08), -17.0)

    # --- bass: KBBB with a per-track motif through a resonant low-pass
    motifs = np.array([[0, 0, 0], [0, 0, 0], [0, 12, 0], [0, 0, 12], [0, 7, 0], [0, 0, 3],
                       [12, 0, 0]])
    beats = motifs[rng.choice(len(motifs), size=4, p=[0.3, 0.2, 0.12, 0.12, 0.1, 0.08, 0.08])]
    offsets = np.zeros(16, dtype=int)
    for beat in range(4):
        offsets[beat * 4 + 1 : beat * 4 + 4] = beats[beat]
    fills = [(12, 10, 7), (0, 3, 5), (7, 5, 3), (0, 12, 0)][rng.integers(4)]
    bass = _kbbb_bass(grid, rng, root, offsets, "mix", rng.uniform(0.0, 0.08),
                      rng.uniform(0.05, 0.09), rng.uniform(0, 8), 2,
                      fill_offsets=fills if rng.random() < 0.6 else None)
    bass = _filter(bass, sr, lowpass=rng.uniform(380, 1000), order=2, resonance=rng.uniform(0.5, 2.5))
    bass = _level(bass, _jitter(rng, -2.0))

    # --- music: sparse percussive blips and zaps, occasional short stab
    music = grid.loop()
    density = rng.uniform(0.03, 0.08)
    blip_steps = np.flatnonzero(rng.random(grid.n_steps) < density)
    scale = _SCALES[rng.integers(len(_SCALES))]
    for s in blip_steps:
        n = int(rng.uniform(0.03, 0.09) * sr)
        t = np.arange(n) / sr
        if rng.random() < 0.6:  # FM ping
            f = _midi_hz(root + 48 + scale[rng.integers(7)] + 12 * rng.integers(0, 2))
            x = np.sin(2 * np.pi * f * t + rng.uniform(1, 4) * np.sin(2 * np.pi * 2.01 * f * t)
                       * np.exp(-t / 0.02))
        else:  # zap: falling sine
            f = rng.uniform(1500, 3500) * np.exp(-t / rng.uniform(0.01, 0.03)) + 150.0
            x = np.sin(2 * np.pi * np.cumsum(f) / sr)
        _place(music, x * _envelope(n, sr, 0.001, n / sr / 3), [s * step], [rng.uniform(0.5, 1.0)])
    if rng.random() < 0.6:  # a short squelchy stab motif every 2 bars
        stab_root = root + 36 + scale[rng.integers(7)]
        notes = stab_root + np.array([0, 0, 12, 7])[: rng.integers(2, 5)]
        start = int(rng.integers(8, 13))
        env = _envelope(step, sr, 0.001, 0.04, gate=0.6 * step / sr)
        for bar in range(1, _LOOP_BARS, 2):
            for j, note in enumerate(notes):
                x = _osc(_midi_hz(note), step, sr, "square", 0.1) * env
                _place(music, x, [(bar * 16 + start + j) * step], [0.5])
    music = _filter(music, sr, highpass=200.0, order=1)
    music = _level(music, _jitter(rng, -13.0))
    return grid, {"kick": kicks, "perc": perc, "bass": bass, "music": music}


def _noise_sweeps(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Band-passed noise whose centre frequency rises / falls over a few bars."""
    sr, L = grid.sr, grid.length
    n_bands = 10
    centres = np.geomspace(150.0, 5000.0, n_bands)
    spectrum = np.fft.rfft(rng.standard_normal(L))
    freqs = np.fft.rfftfreq(L, 1.0 / sr)
    bands = []
    for centre in centres:
        band = spectrum * _filter_response(freqs, lowpass=centre * 1.4, highpass=centre / 1.4)
        energy = np.sqrt(np.sum(np.abs(band) ** 2) * 2.0 / L**2) + 1e-12  # ~ RMS (Parseval)
        bands.append(np.fft.irfft(band / energy, n=L))
    bands = np.stack(bands)
    bar = _STEPS_PER_BAR * grid.step
    position = np.full(L, np.nan)  # fractional band index over time
    amplitude = np.zeros(L)
    rise_bars = int(rng.choice([2, 4]))
    start = L - rise_bars * bar
    ramp = np.linspace(0.0, 1.0, L - start)
    position[start:] = ramp * (n_bands - 1)
    amplitude[start:] = ramp**1.5
    if rng.random() < 0.7:  # a falling sweep after the loop restarts
        fall = int(rng.choice([1, 2])) * bar
        ramp = np.linspace(0.0, 1.0, fall)
        position[:fall] = (1.0 - ramp) * (n_bands - 1)
        amplitude[:fall] = (1.0 - ramp) ** 2
    active = np.flatnonzero(~np.isnan(position))
    out = np.zeros(L)
    for k in range(n_bands):
        weight = np.maximum(0.0, 1.0 - np.abs(position[active] - k))
        out[active] += weight * bands[k, active]
    return out * amplitude


def _render_dark(rng: np.random.Generator, sr: int):
    grid = _Grid(rng.uniform(*TEMPO_RANGES["dark"]), sr, TEMPO_RANGES["dark"])
    step, L = grid.step, grid.length
    root = int(rng.integers(26, 34))  # D1 .. A1
    cutoff = rng.uniform(1800, 3200)  # low-pass of the whole mix

    # --- drums: low distorted kick, noisy 16th hats, optional snare
    perc = grid.loop()
    kick = _kick(sr, rng, rng.uniform(130, 190), rng.uniform(38, 46), rng.uniform(0.06, 0.1),
                 1.2 * step / sr, drive=rng.uniform(2.0, 5.0), click=rng.uniform(0.3, 0.6))
    kick = _filter_oneshot(kick, sr, lowpass=cutoff)
    kick_loop = grid.loop()
    _place(kick_loop, kick, grid.positions(range(0, grid.n_steps, 4)))
    kicks = _level(kick_loop, 0.0)
    hats = grid.loop()
    hat = _noise_hit(sr, rng, rng.uniform(0.02, 0.05), 0.12, highpass=rng.uniform(3000, 5000))
    hat_steps = [s for s in range(grid.n_steps) if s % 4 == 2 or (s % 2 == 1 and rng.random() < 0.7)]
    hat_gains = [1.0 if s % 4 == 2 else rng.uniform(0.25, 0.5) for s in hat_steps]
    _place(hats, hat, grid.positions(hat_steps), hat_gains)
    perc += _level(hats, _jitter(rng, -17.0))
    if rng.random() < 0.5:
        snare = grid.loop()
        _place(snare, _snare(sr, rng, rng.uniform(150, 200), rng.uniform(0.08, 0.15)),
               grid.positions(range(4, grid.n_steps, 8)))
        perc += _level(snare, _jitter(rng, -15.0))

    # --- bass: rumbling KBBB with minor-second / tritone steps, plus noise rumble
    choices = np.array([0, 0, 0, 1, 6, 12, 13])
    offsets = np.where(np.arange(16) % 4 == 0, 0, choices[rng.integers(len(choices), size=16)])
    offsets[np.arange(16) % 4 == 1] = 0
    bass = _kbbb_bass(grid, rng, root, offsets, "saw", rng.uniform(0.0, 0.05),
                      rng.uniform(0.06, 0.1), rng.uniform(10, 25), 3,
                      fill_offsets=(1, 6, 13) if rng.random() < 0.5 else None)
    bass = _filter(bass, sr, lowpass=rng.uniform(160, 320), order=4, resonance=rng.uniform(0, 1.0))
    pump = _sidechain(grid, rng, (0.5, 0.8))
    rumble = _filter(rng.standard_normal(L), sr, lowpass=rng.uniform(80, 180), order=4) * pump
    bass = _level(bass, _jitter(rng, -3.0)) + _level(rumble, _jitter(rng, -10.0))

    # --- music: dissonant cluster drone, noise sweeps, dissonant stabs
    clusters = ((0, 1, 6), (0, 6, 7), (0, 1, 6, 7), (0, 6, 13), (0, 1, 7))
    cluster = clusters[rng.integers(len(clusters))]
    drone_root = root + int(rng.choice([24, 36]))
    t = np.arange(L) / sr
    drone = np.zeros(L)
    for interval in cluster:
        f = _midi_hz(drone_root + interval)
        f = max(1, round(f * L / sr)) * sr / L  # whole cycles per loop: seamless
        cycles = int(rng.choice([1, 2, 4, 8]))  # tremolo with a whole number of cycles per loop
        tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * cycles * t * sr / L + rng.uniform(0, 2 * np.pi))
        drone += _osc(f, L, sr, "saw", 0.1, rng.random()) * tremolo
    drone = _filter(drone, sr, lowpass=rng.uniform(500, 1200), order=2)
    sweeps = _noise_sweeps(grid, rng)
    stabs = grid.loop()
    stab_steps = np.flatnonzero(rng.random(grid.n_steps) < rng.uniform(0.02, 0.06))
    stab_len = int(rng.uniform(0.1, 0.25) * sr)
    stab_env = _envelope(stab_len, sr, 0.002, stab_len / sr / 3)
    stab_root = root + int(rng.choice([36, 48]))
    stab = sum(_osc(_midi_hz(stab_root + i), stab_len, sr, "saw", 0.05, rng.random())
               for i in (0, 1, 6)) * stab_env
    _place(stabs, stab, grid.positions(stab_steps), rng.uniform(0.5, 1.0, len(stab_steps)))
    music = (_level(drone, _jitter(rng, -10.0)) + _level(sweeps, _jitter(rng, -14.0))) * pump
    if stab_steps.size:
        music += _level(stabs, _jitter(rng, -16.0))

    # --- the mix (apart from the kick, filtered above) goes through a low-pass,
    # after the levels are set: dark, muffled timbre
    perc = _filter(perc, sr, lowpass=cutoff, order=2)
    music = _filter(music, sr, lowpass=cutoff, order=2)
    return grid, {"kick": kicks, "perc": perc, "bass": bass, "music": music}


_RENDERERS = {"goa": _render_goa, "psy": _render_psy, "dark": _render_dark}


# --------------------------------------------------------------------------
# Arrangement
# --------------------------------------------------------------------------


def _curve(t: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    xs = np.maximum.accumulate(np.array([p[0] for p in points], dtype=float))
    ys = np.array([p[1] for p in points], dtype=float)
    return np.interp(t, xs, ys)


def _arrange(grid: _Grid, groups: dict[str, np.ndarray], n_total: int,
             rng: np.random.Generator) -> np.ndarray:
    """Tile the loops over the track and apply intro / breakdown / outro."""
    sr = grid.sr
    duration = n_total / sr
    bar = grid.bar_seconds
    intro = min(8 * bar, 0.2 * duration)
    outro = min(8 * bar, 0.2 * duration)
    ramp = min(bar, 0.05 * duration)
    # Gains are piecewise linear: evaluate them every `hop` samples, then hold.
    hop = 32
    t = np.arange(-(-n_total // hop)) * (hop / sr)

    def ramp_in(at):
        return [(max(0.0, at - ramp), 0.0), (at, 1.0)]

    def ramp_out(at):
        return [(at, 1.0), (min(duration, at + ramp), 0.0)]

    curves = {
        "kick": [(0.0, 1.0), (duration, 1.0)],
        "perc": [(0.0, 1.0), (duration, 1.0)],
        "bass": [(0.0, 0.0)] + ramp_in(0.5 * intro) + ramp_out(duration - 0.5 * outro)
        + [(duration, 0.0)],
        "music": [(0.0, 0.0)] + ramp_in(intro) + ramp_out(duration - outro) + [(duration, 0.0)],
    }
    fade_in = min(2.0, 0.1 * duration)
    fade_out = min(4.0, 0.1 * duration)
    master = _curve(t, [(0.0, 0.0), (fade_in, 1.0), (duration - fade_out, 1.0), (duration, 0.0)])
    gains = {name: _curve(t, points) * master for name, points in curves.items()}
    if duration >= 45.0:  # breakdown: kick and bass drop out for a few bars
        start = round(rng.uniform(0.5, 0.6) * duration / bar) * bar
        stop = start + min(int(rng.choice([4, 8])) * bar, 0.12 * duration)
        dip = 1.0 - _curve(t, [(start, 0.0), (start + 0.05, 1.0), (stop - 0.01, 1.0), (stop, 0.0)])
        gains["kick"] *= dip
        gains["bass"] *= dip

    reps = -(-n_total // grid.length)
    mix = np.zeros(n_total)
    for name, loop in groups.items():
        gain = np.repeat(gains[name], hop)[:n_total]
        mix += np.tile(loop, reps)[:n_total] * gain
    return mix


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def synthesize_track(style: str, seed: int, duration: float = 75.0,
                     sample_rate: int = 22050) -> np.ndarray:
    """Render one synthetic trance-like track (not real music) of ``style`` (:data:`STYLES`).

    ``seed`` (int >= 0) draws the tempo (within TEMPO_RANGES[style]), key, patterns, levels
    and filters: the same (style, seed) always gives the same audio. ``duration`` is in
    seconds, ``sample_rate`` in Hz. Returns mono float32 [round(duration * sample_rate)] in
    [-1, 1] with a peak of 0.9 (unless silent), e.g. shape (110250,) for 5 s at 22050 Hz.
    ValueError for an unknown style, duration or sample_rate <= 0, or a negative seed.
    """
    _check_style(style)
    if not np.isfinite(duration) or duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    sample_rate = int(sample_rate)
    n_total = max(1, int(round(duration * sample_rate)))
    rng = np.random.default_rng([int(seed), _style_code(style)])
    grid, groups = _RENDERERS[style](rng, sample_rate)
    mix = _arrange(grid, groups, n_total, rng)
    peak = float(np.max(np.abs(mix)))
    if peak > 0:
        mix = np.tanh(1.5 * mix / peak)  # gentle saturation glues the mix
        mix *= _PEAK / float(np.max(np.abs(mix)))
    return mix.astype(np.float32)


def make_demo_audio(out_dir: str, tracks_per_style: int = 20, duration: float = 75.0,
                    seed: int = 0, sample_rate: int = 22050,
                    styles: Iterable[str] = STYLES) -> list[str]:
    """Write ``tracks_per_style`` synthetic tracks of each of ``styles`` as 16-bit WAV files
    ``out_dir/<style>/<style>_<NN>.wav`` (folders created; NN: the index, 2 digits or more);
    return their paths, style by style, in index order.

    Track NN is ``synthesize_track(style, track_seed(seed, style, NN), duration,
    sample_rate)``, independent of the other tracks. Each file is staged and renamed into
    place (tclf.storage.staged), so an interrupted run leaves no partial .wav; existing files
    are overwritten. ValueError for an unknown style, tracks_per_style < 0, duration or
    sample_rate <= 0, or seed < 0.
    """
    styles = tuple(styles)
    for style in styles:
        _check_style(style)
    if tracks_per_style < 0:
        raise ValueError(f"tracks_per_style must be >= 0, got {tracks_per_style}")
    if not np.isfinite(duration) or duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    width = max(2, len(str(max(tracks_per_style - 1, 0))))
    paths = []
    for style in styles:
        style_dir = os.path.join(out_dir, style)
        os.makedirs(style_dir, exist_ok=True)
        for index in range(tracks_per_style):
            y = synthesize_track(style, track_seed(seed, style, index), duration, sample_rate)
            path = os.path.join(style_dir, f"{style}_{index:0{width}d}.wav")
            with storage.staged(path) as staging:
                sf.write(staging, y, int(sample_rate), subtype="PCM_16", format="WAV")
            paths.append(path)
    return paths
