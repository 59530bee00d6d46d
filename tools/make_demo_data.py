"""Write the synthetic demo audio set (not real music) used by the demo and tests.

Usage, from the repository root::

    python tools/make_demo_data.py audio/

writes ``audio/<style>/<style>_<NN>.wav`` for the styles goa, psy and dark
(see :mod:`tclf.demo`).
"""

from __future__ import annotations

import os
import sys
import time

import click

try:
    import tclf  # noqa: F401  (normally pip-installed in editable mode)
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tclf.demo import STYLES, make_demo_audio  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, dir_okay=True, writable=True))
@click.option("--tracks-per-style", default=20, show_default=True, type=click.IntRange(min=1),
              help=f"Number of tracks to write for each style ({', '.join(STYLES)}).")
@click.option("--duration", default=75.0, show_default=True,
              type=click.FloatRange(min=0.0, min_open=True),
              help="Length of each track in seconds.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the whole set; the same seed always gives the same files.")
@click.option("--sample-rate", default=22050, show_default=True, type=click.IntRange(min=1000),
              help="Sampling rate of the WAV files in Hz (16-bit PCM, mono).")
def main(out_dir: str, tracks_per_style: int, duration: float, seed: int, sample_rate: int) -> None:
    """Write synthetic goa / psy / dark demo tracks to OUT_DIR/<style>/<style>_<NN>.wav.

    The tracks are synthetic trance-like patterns, not real music. Existing
    files with the same names are overwritten.
    """
    start = time.perf_counter()
    paths = make_demo_audio(out_dir, tracks_per_style=tracks_per_style, duration=duration,
                            seed=seed, sample_rate=sample_rate)
    minutes = len(paths) * duration / 60.0
    click.echo(f"wrote {len(paths)} files to {out_dir} ({minutes:.1f} min of audio) "
               f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
