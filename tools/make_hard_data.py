#!/usr/bin/env python
"""A harder synthetic data set than the demo: demo tracks buried in noise and in each other.

Each track of style S is the demo track mixed with a track of another style (3-6 dB below
it) and with pink noise (3-6 dB below it), so that the styles overlap: the
other style's kick, bass and leads sit in every segment. Used to choose stage 1's epoch
budget (docs/commands.md#schedule); not part of the tests.

    .venv/bin/python tools/make_hard_data.py hard_audio/ --tracks-per-style 30 --duration 60
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import numpy as np  # noqa: E402


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


@click.command()
@click.argument("out_dir")
@click.option("--tracks-per-style", default=30)
@click.option("--duration", default=60.0)
@click.option("--seed", default=7)
def main(out_dir, tracks_per_style, duration, seed):
    """Write OUT_DIR/<style>/<style>_NN.wav, harder to tell apart than the demo's."""
    import soundfile as sf

    from tclf import demo, storage

    rng = np.random.default_rng(seed)
    sr = 22050
    tracks = {style: [demo.synthesize_track(style, demo.track_seed(seed, style, i), duration, sr)
                      for i in range(tracks_per_style)] for style in demo.STYLES}
    for style in demo.STYLES:
        os.makedirs(os.path.join(out_dir, style), exist_ok=True)
        others = [s for s in demo.STYLES if s != style]
        for i, track in enumerate(tracks[style]):
            rms = np.sqrt(np.mean(track**2)) + 1e-12
            other = tracks[others[rng.integers(len(others))]][rng.integers(tracks_per_style)]
            other = other / (np.sqrt(np.mean(other**2)) + 1e-12) * rms
            mix = (track + other * 10 ** (-rng.uniform(3, 6) / 20)
                   + pink_noise(track.size, rng) * rms * 10 ** (-rng.uniform(3, 6) / 20))
            mix = 0.9 * mix / np.abs(mix).max()
            path = os.path.join(out_dir, style, f"{style}_{i:02d}.wav")
            with storage.staged(path) as staging:
                sf.write(staging, mix.astype(np.float32), sr, subtype="PCM_16", format="WAV")
    print(f"wrote {3 * tracks_per_style} tracks to {out_dir}")


if __name__ == "__main__":
    main()
