"""Command-line entry points. Each command parses options and calls one library function."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import click

from tclf import audio

# Errors that mean "the user's input or setup is wrong": one line, no traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, RuntimeError,
               KeyError, OSError)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def command(function):
    """Wrap a click command body: tidy warnings, user errors as one line and exit code 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None
        except click.ClickException:
            raise
        except USER_ERRORS as error:
            if os.environ.get("TCLF_DEBUG"):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise click.ClickException(f"{type(error).__name__}: {message}") from None

    return wrapper


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("audio_dir", type=click.Path(file_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--segments", "num_segments", default=6, type=click.IntRange(min=1),
              help="Segments taken per track, spread evenly over its body.")
@click.option("--segment-seconds", default=10.0, type=click.FloatRange(min=1.0, min_open=False),
              help="Length of each segment in seconds.")
@click.option("--skip-fraction", default=0.1, type=click.FloatRange(0.0, 0.45),
              help="Share of the track skipped at each end (intro, outro) when the body is long "
                   "enough for all segments.")
@click.option("--sample-rate", default=audio.SAMPLE_RATE, type=click.IntRange(min=8000),
              help="Audio is resampled to this rate (Hz), mono.")
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1),
              help="Worker processes, one track each. [default: all cores]")
@click.option("--overwrite", is_flag=True, help="Redo tracks already extracted.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@command
def extract_command(audio_dir, data_dir, num_segments, segment_seconds, skip_fraction,
                    sample_rate, jobs, overwrite, quiet):
    """Cut AUDIO_DIR/<class>/<audio files> into DATA_DIR/<class>/<track_id>/part_N.png + .npy.

    Each segment becomes a 299x299 mel-spectrogram PNG and a 10x68 float32
    feature matrix (columns: see tclf/audio.py and the README). Files that
    cannot be decoded, or are shorter than one segment, are skipped with a
    warning. Tracks already in DATA_DIR are skipped unless --overwrite.
    """
    from tclf import extract

    summary = extract.extract(audio_dir, data_dir, num_segments=num_segments,
                              segment_seconds=segment_seconds, sample_rate=sample_rate,
                              skip_fraction=skip_fraction, jobs=jobs, overwrite=overwrite,
                              progress=not quiet)
    click.echo(summary.line())


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path())
@click.argument("records_dir", type=click.Path())
@click.option("--val-fraction", default=0.2, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of each class's tracks put in the validation split (split by track).")
@click.option("--seed", default=0, type=int, help="Seed of the split and of the record order.")
@click.option("--groups", "groups_file", default=None, type=click.Path(dir_okay=False),
              help="CSV of `track_id,group` (e.g. artist): a group stays on one side.")
@click.option("--shard-mb", "shard_megabytes", default=128.0, type=click.FloatRange(min=1.0),
              help="Target shard size in MB.")
@click.option("--min-shards", default=8, type=click.IntRange(min=1),
              help="At least this many shards per split (if it has that many records), so that "
                   "reads can run in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace records already in RECORDS_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@command
def pack_command(data_dir, records_dir, val_fraction, seed, groups_file, shard_megabytes,
                 min_shards, overwrite, quiet):
    """Pack DATA_DIR/<class>/<track>/part_N.{png,npy} into sharded TFRecords in RECORDS_DIR.

    Writes train-*.tfrecord, val-*.tfrecord and manifest.json (classes,
    counts, shards, track ids per split, feature statistics). Bad or
    unpaired files are skipped with a warning naming them.
    """
    from tclf import records

    manifest = records.pack(data_dir, records_dir, val_fraction=val_fraction, seed=seed,
                            groups_file=groups_file, shard_megabytes=shard_megabytes,
                            min_shards=min_shards, overwrite=overwrite, progress=not quiet)
    for line in records.summary_lines(manifest):
        click.echo(line)
    click.echo(f"packed {sum(s['records'] for s in manifest['splits'].values())} records into "
               f"{records_dir} in {manifest['seconds']:.1f} s")
