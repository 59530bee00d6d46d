"""Command-line entry points. Each command parses options and calls one library function."""

from __future__ import annotations

import functools
import os
import sys
import warnings

# Before TensorFlow is imported anywhere: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from tclf import UserError, __version__  # noqa: E402
from tclf import model as tclf_model  # noqa: E402
from tclf.data import audio, extract, records, schema  # noqa: E402
from tclf.data.schema import SPLITS  # noqa: E402
from tclf.training import cluster as clusters  # noqa: E402
from tclf.training.config import TrainConfig, load_hparams  # noqa: E402
from tclf.training.devices import PRECISIONS  # noqa: E402
from tclf.tune.results import duration  # noqa: E402
from tclf.tune.space import OBJECTIVES, TUNERS, search_space  # noqa: E402

# Errors that mean "the user's input or setup is wrong": one line, no traceback. Anything else
# is a bug in tclf and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
INTERRUPTED = 130  # Exit status after Ctrl-C, as shells report SIGINT (128 + 2).


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def start_tensorflow() -> None:
    """Import TensorFlow and find its devices with its C++ start-up lines held back.

    TensorFlow prints "All log messages before absl::InitializeLog() ...", "Could not
    find cuda drivers" and "failed call to cuInit" straight to the process's stderr before
    TF_CPP_MIN_LOG_LEVEL applies, on every start, even with --gpus none. They are captured
    here and shown only if the start fails. TF_CPP_MIN_LOG_LEVEL=0 or TCLF_DEBUG=1 lets
    them through; what TensorFlow logs later at ERROR level still shows.
    """
    if ("tensorflow" in sys.modules or os.environ.get("TCLF_DEBUG")
            or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0"):
        return
    import tempfile

    sys.stderr.flush()
    try:
        saved, captured = os.dup(2), tempfile.TemporaryFile()
    except OSError:  # No stderr to hold back, or nowhere to hold it: start as is.
        import tensorflow  # noqa: F401

        return
    with captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def command(function=None, *, tensorflow: bool = True):
    """Wrap a click command body: TensorFlow started quietly (unless ``tensorflow=False``),
    tidy warnings, user errors as one line and exit status 1, Ctrl-C as 130."""
    if function is None:
        return functools.partial(command, tensorflow=tensorflow)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        try:
            if tensorflow:
                start_tensorflow()
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(INTERRUPTED)
        except click.ClickException:
            raise
        except (*USER_ERRORS, OSError) as error:
            # An OSError with an errno is the system's answer (disk full, read-only, ...);
            # one without is a bug.
            user = isinstance(error, USER_ERRORS) or getattr(error, "errno", None) is not None
            if os.environ.get("TCLF_DEBUG") or not user:
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise click.ClickException(f"{type(error).__name__}: {message}") from None
        except Exception as error:
            # TensorFlow's own errors (a missing or unreadable file, gs:// permissions, GPU
            # memory) are not OSError subclasses; they too get one line.
            if os.environ.get("TCLF_DEBUG") or not type(error).__module__.startswith("tensorflow"):
                raise
            message = getattr(error, "message", str(error)).strip().splitlines()[0]
            raise click.ClickException(f"{type(error).__name__}: {message}") from None

    return wrapper


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("audio_dir", type=click.Path(file_okay=False))
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--segments", "num_segments", default=6, type=click.IntRange(min=1),
              help="Standard segments per track, spread evenly over its body: the ones "
                   "validation and tclf-predict use.")
@click.option("--training-segments", default=audio.TRAINING_SEGMENTS, type=click.IntRange(min=0),
              help="Then up to this many more, for training only: non-overlapping, spread "
                   "evenly over the whole track (tclf-pack keeps them out of the validation "
                   "split). More examples of each track: real music needs them "
                   "(docs/real-music.md).")
@click.option("--segment-seconds", default=10.0, type=click.FloatRange(min=1.0, min_open=False),
              help="Length of each segment in seconds.")
@click.option("--skip-fraction", default=0.1, type=click.FloatRange(0.0, 0.45),
              help="Share of the track skipped at each end (intro, outro) when the body is long "
                   "enough for all segments.")
@click.option("--sample-rate", default=audio.SAMPLE_RATE, type=click.IntRange(min=8000),
              help="Audio is resampled to this rate (Hz), mono.")
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1),
              help="Worker processes, one track each. [default: all cores]")
@click.option("--png-compression", default=None, type=click.IntRange(0, 9),
              help="zlib level of the spectrogram PNGs, 0-9: the same pixels at every level; "
                   "0 (uncompressed, ~268 kB) decodes several times faster than 1-9 "
                   "(~100 kB) when training; 3 suits records read from slow remote storage "
                   "(docs/png-study.md). [default: 0 for a new DATA_DIR, else the folder's own]")
@click.option("--backbone", default=audio.EFFICIENTNET, type=click.Choice(audio.BACKBONES),
              help="The image branch's network, which decides the spectrogram stored: "
                   "efficientnetb0 (the 299x299 mel image; ImageNet weights) or musicnn "
                   "(its own 16 kHz log-mel; weights trained on music, from the musicnn "
                   "package). Training, prediction and evaluation read it from the data.")
@click.option("--overwrite", is_flag=True, help="Redo tracks already extracted.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@command(tensorflow=False)  # Extraction never uses TensorFlow.
def extract_command(audio_dir, data_dir, num_segments, training_segments, segment_seconds,
                    skip_fraction, sample_rate, png_compression, backbone, jobs, overwrite,
                    quiet):
    """Cut AUDIO_DIR/<class>/<audio files> into DATA_DIR/<class>/<track_id>/part_N.png + .npy.

    Each segment becomes a spectrogram PNG (299x299 mel image, or musicnn's
    log-mel with --backbone musicnn) and a 10x68 float32
    feature matrix (columns: docs/data-layout.md#feature-columns). Files that
    cannot be decoded, or are shorter than one segment, are skipped with a
    warning. Tracks already in DATA_DIR are skipped unless --overwrite.
    The settings are recorded in DATA_DIR/extract.json; a later run with
    other settings into the same folder is refused.
    """
    summary = extract.extract(audio_dir, data_dir, num_segments=num_segments,
                              training_segments=training_segments,
                              segment_seconds=segment_seconds, sample_rate=sample_rate,
                              skip_fraction=skip_fraction, jobs=jobs, overwrite=overwrite,
                              progress=not quiet, png_compression=png_compression,
                              backbone=backbone)
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
@click.option("--png-compression", default="keep", metavar="[0-9|keep]",
              type=click.Choice(["keep", *map(str, range(10))]),
              help="keep: copy each PNG's bytes as DATA_DIR holds them; 0-9: encode each PNG "
                   "again at that zlib level while packing (the same pixels; 0 decodes "
                   "fastest, 1-9 are smaller: see tclf-extract --png-compression).")
@click.option("--overwrite", is_flag=True, help="Replace records already in RECORDS_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@command
def pack_command(data_dir, records_dir, val_fraction, seed, groups_file, shard_megabytes,
                 min_shards, png_compression, overwrite, quiet):
    """Pack DATA_DIR/<class>/<track>/part_N.{png,npy} into sharded TFRecords in RECORDS_DIR.

    Writes train-*.tfrecord, val-*.tfrecord and manifest.json (classes,
    counts, shards, track ids per split, feature statistics). Bad or
    unpaired files are skipped with a warning naming them.
    """
    manifest = records.pack(data_dir, records_dir, val_fraction=val_fraction, seed=seed,
                            groups_file=groups_file, shard_megabytes=shard_megabytes,
                            min_shards=min_shards, overwrite=overwrite, progress=not quiet,
                            png_compression=(png_compression if png_compression == "keep"
                                             else int(png_compression)))
    for line in records.summary_lines(manifest):
        click.echo(line)
    click.echo(f"packed {sum(s['records'] for s in manifest['splits'].values())} records into "
               f"{records_dir} in {manifest['seconds']:.1f} s")


def _train_options(function=None, *, exclude=()):
    import dataclasses

    if function is None:
        return functools.partial(_train_options, exclude=exclude)
    for field in reversed(dataclasses.fields(TrainConfig)):
        if field.name in exclude:
            continue
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        kind = type(field.default)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        elif field.name == "precision":
            kind = click.Choice(PRECISIONS)
        function = click.option(flag, field.name, default=field.default, type=kind,
                                help=field.metadata["help"])(function)
    return function


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--hparams", "hparams_file", default=None, type=click.Path(dir_okay=False),
              help="JSON object of option: value (e.g. from a tuner search; names as below, "
                   "with dashes or underscores). Options given on the command line win over it.")
@click.option("--quiet", "-q", is_flag=True, help="No Keras progress output (--verbose 0).")
@click.option("--resume", "resume", is_flag=False, flag_value="", default=None, metavar="[vN]",
              help="Continue the unfinished run vN (default: the newest) in --models-dir from its "
                   "last completed epoch, stage, optimizer and schedule included, with the "
                   "options it started with: the same command with --resume added continues "
                   "it; only --records, --models-dir, --gpus, --cpu-devices, --verbose/-q, "
                   "--data-service and --cluster-timeout may differ. In a cluster "
                   "(TF_CONFIG), name the run, on every worker.")
@_train_options
@command
def train_command(hparams_file, quiet, resume, **options):
    """Train the two-branch model on RECORDS with the two-stage schedule.

    Stage 1 trains with the EfficientNetB0 backbone frozen, stage 2 fine-tunes
    its last layers. Writes MODELS/vX/ (model.h5, plots, reports, logs) and
    replaces MODELS/latest.h5 when the run succeeds. A folder without
    model.h5 is an unfinished or failed run: it holds UNFINISHED and a
    checkpoint after every epoch, and `tclf-train --resume vX` continues it.
    """
    from click.core import ParameterSource

    from tclf.training import train, versions  # TensorFlow: only when training.

    cluster = clusters.from_env()
    context = click.get_current_context()
    given = {k: v for k, v in options.items()
             if context.get_parameter_source(k) != ParameterSource.DEFAULT}
    if quiet and "verbose" not in given:
        given["verbose"] = 0
    if resume is not None:
        finished = versions.finish_if_unpublished(options["models"], resume or None)
        if finished:  # Killed after its model.h5: only its end was left to do.
            click.echo(finished)
            return
        values = {**(load_hparams(hparams_file) if hparams_file else {}), **given}
        config, folder = train.resume_config(options["models"], resume or None,
                                             **{k: v for k, v in values.items() if k != "models"})
        click.echo(f"resuming {folder}", err=True)
    else:
        values = load_hparams(hparams_file) if hparams_file else {}
        values.update(given if hparams_file else {**options, **given})
        config, folder = TrainConfig().replace(**values), None
        for unfinished in ([] if cluster and not cluster.is_chief
                           else versions.unfinished_runs(config.models)[:3]):
            click.echo(f"note: {unfinished} did not finish; `tclf-train --resume "
                       f"{os.path.basename(unfinished)} --models-dir {config.models}` continues "
                       f"it (a new run starts now)", err=True)
    result = train.train(config, resume=folder)
    minutes, seconds = divmod(result.seconds, 60)
    took = f"in {int(minutes)} min {seconds:.0f} s on {result.devices} ({result.precision})"
    if result.version_dir is None:  # A worker of a cluster, not its chief: it wrote nothing.
        click.echo(f"{cluster.name}: trained {took}; the chief wrote the version folder; "
                   f"weights {result.fingerprint}")
    else:
        click.echo(f"trained {result.version_dir} {took}: validation accuracy "
                   f"{result.evaluation.segment_accuracy:.3f} (segments), "
                   f"{result.evaluation.track_accuracy:.3f} (tracks)"
                   + (f"; weights {result.fingerprint}" if cluster else ""))
    if cluster:
        _leave_cluster(cluster)


def _leave_cluster(cluster) -> None:
    """End a worker of a finished cluster run now. A normal exit tears TensorFlow down slowly
    while the chief, which runs the cluster's coordination service, may already be gone:
    the other workers then log that they lost it. So the workers leave at once and the
    chief a second later (os._exit skips TensorFlow's teardown, not Python's exit
    handlers)."""
    import atexit
    import time

    atexit._run_exitfuncs()  # Python's own exit handlers (temporary files) still run.
    sys.stdout.flush()
    sys.stderr.flush()
    if cluster.is_chief:
        time.sleep(1.0)
    os._exit(0)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", default="tuning", type=click.Path(),
              help="Folder of the search: Keras Tuner's state (search/), trials.csv, "
                   "best_hparams.json, TensorBoard logs (logs/<trial>/).")
@click.option("--tuner", "kind", default="random",
              type=click.Choice(TUNERS),
              help="Search algorithm (hyperband is refused: see docs/tuning.md).")
@click.option("--max-trials", default=10, type=click.IntRange(min=1),
              help="Trials in all, those already on record included (raise it to go on).")
@click.option("--objective", default="val_track_accuracy",
              type=click.Choice(list(OBJECTIVES)),
              help="What a trial is scored by, on the validation split after stage 2: "
                   "accuracy over tracks (default), macro F1 over tracks, accuracy over "
                   "segments, or the best stage-2 val_loss.")
@click.option("--space", "space_file", default=None, type=click.Path(dir_okay=False),
              help="JSON object narrowing the search space: name: value (fixed), name: [values] "
                   "or name: {\"min\", \"max\", \"step\", \"log\"} (docs/tuning.md#the-space).")
@click.option("--hparams", "hparams_file", default=None, type=click.Path(dir_okay=False),
              help="JSON object of training options every trial uses (as tclf-train's "
                   "--hparams). Options given here or on the command line are not searched.")
@click.option("--overwrite", is_flag=True,
              help="Start the search in --out over (its trials are deleted); without it, the "
                   "same command resumes the search.")
@click.option("--worker-timeout", default=1800.0, type=click.FloatRange(min=1.0),
              help="Distributed search, chief: seconds without a worker's heartbeat (written "
                   "every 15 s) after which its trial goes back to the queue.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar for the backbone pass.")
@_train_options(exclude=("models", "cluster_timeout"))
@command
def tune_command(out_dir, kind, max_trials, objective, space_file, hparams_file, overwrite,
                 worker_timeout, quiet, **options):
    """Search hyperparameters around the two-stage schedule with Keras Tuner.

    Every trial is a tclf-train run (the same model builder and stages) without a
    version folder, scored on the validation split after stage 2. The first trial
    is the baseline (tclf-train's defaults). Prints a line per finished trial and
    the trials, best first; writes OUT/trials.csv and OUT/best_hparams.json, which
    `tclf-train --hparams` takes as it is. Run the same command again to resume.
    Distributed: set KERASTUNER_TUNER_ID (chief, tuner1, ...), KERASTUNER_ORACLE_IP
    and KERASTUNER_ORACLE_PORT (docs/tuning.md#distributed-search).
    """
    from click.core import ParameterSource

    from tclf.tune import search  # Keras Tuner and TensorFlow: only when searching.

    context = click.get_current_context()
    given = {k: v for k, v in options.items()
             if context.get_parameter_source(k) != ParameterSource.DEFAULT}
    values = load_hparams(hparams_file) if hparams_file else {}
    values.update(given)
    # Keras' per-epoch output off unless asked for: a line per trial is the progress.
    base = TrainConfig().replace(**{**options, "verbose": 0, **values})
    space = search_space(load_hparams(space_file) if space_file else None,
                         fixed={name.replace("-", "_") for name in values}, base=base)
    result = search.tune(base, out_dir, kind=kind, max_trials=max_trials, objective=objective,
                         space=space, overwrite=overwrite, worker_timeout=worker_timeout,
                         progress=not quiet, echo=click.echo)
    if result.role != "worker":
        click.echo(f"search in {out_dir}: {len(result.rows)} trial(s) on record "
                   f"({result.ran} run now), {duration(result.seconds)}; "
                   f"{os.path.join(out_dir, 'trials.csv')}, "
                   f"{os.path.join(out_dir, 'best_hparams.json')}")


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", default="models/latest.h5",
              help="A model.h5 or model.keras written by tclf-train; its class names are "
                   "read from it.")
@click.option("--per-segment", "show_segments", is_flag=True,
              help="Also show each segment's prediction.")
@click.option("--format", "output_format", type=click.Choice(["table", "json", "csv"]),
              default=None, help="Output format. [default: table on a terminal, json otherwise]")
@click.option("--batch-size", default=32, type=click.IntRange(min=1),
              help="Segments per forward pass.")
@click.option("--min-confidence", default=0.0, type=click.FloatRange(0.0, 1.0),
              help="Name a track 'unknown' when its highest probability (calibrated by "
                   "tclf-train) is below this: music of none of the styles, or too close to "
                   "call. Its probabilities are still shown.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@command
def predict_command(paths, model_path, show_segments, output_format, batch_size,
                    min_confidence, quiet):
    """Name the style of tracks: audio files, folders of audio, or data/ track folders.

    Each audio file is cut and analysed exactly as tclf-extract does, in
    memory; a track's probabilities are the mean over its segments. Files
    that cannot be read are reported and skipped; the exit code is non-zero
    only when nothing could be classified.
    """
    from tclf import predict  # TensorFlow: only when predicting.

    output_format = output_format or ("table" if sys.stdout.isatty() else "json")
    result = predict.predict_paths(list(paths), model_path, batch_size=batch_size,
                                   progress=not quiet, min_confidence=min_confidence)
    if not result.tracks:
        if output_format == "json":  # A script still gets the failed list.
            click.echo(predict.format_json(result, show_segments), nl=False)
        raise click.ClickException(f"no track could be classified ({len(result.failed)} failed)")
    click.echo(predict.FORMATTERS[output_format](result, show_segments), nl=False)
    if not quiet:
        segments = sum(len(t.segments) for t in result.tracks)
        click.echo(f"classified {len(result.tracks)} tracks ({segments} segments) in "
                   f"{result.seconds:.1f} s; {len(result.failed)} failed", err=True)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default="models/latest.h5",
              help="A model.h5 or model.keras written by tclf-train.")
@click.option("--records", "records_dir", default="records", help="Records folder (tclf-pack).")
@click.option("--split", default="val", type=click.Choice(SPLITS),
              help="Split of the records to evaluate.")
@click.option("--out", "out_dir", default=None,
              help="Write report.txt and confusion_matrix.png here (same formats as training). "
                   "Without it the report is printed.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), help="Segments per batch.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final line (no report, no file list).")
@command
def eval_command(model_path, records_dir, split, out_dir, batch_size, quiet):
    """Segment- and track-level accuracy, macro F1, report and confusion matrix of a model.

    Works for any model written by tclf-train on any packed split whose
    classes match the model's.
    """
    from tclf.evaluation import evaluate, reports  # TensorFlow: only when evaluating.

    model, classes = tclf_model.load_model(model_path)
    pack = schema.Pack.load(records_dir)
    extraction = pack.extraction or {}
    tclf_model.warn_if_librosa_differs(model_path, tclf_model.load_config(model_path),
                                       extraction.get("librosa_version"),
                                       f"the features of {records_dir} were computed by")
    evaluation = evaluate.evaluate_records(model, classes, pack, split, batch_size,
                                           tclf_model.load_temperature(model_path))
    title = f"{model_path}: {split} split of {records_dir}"
    if out_dir:
        for path in reports.write_evaluation(evaluation, out_dir, title=title):
            if not quiet:
                click.echo(f"wrote {path}")
    elif not quiet:
        click.echo(reports.format_report(evaluation, title=title), nl=False)
    click.echo(f"accuracy {evaluation.segment_accuracy:.4f} (segments), "
               f"{evaluation.track_accuracy:.4f} (tracks); macro F1 "
               f"{evaluation.segment_macro_f1:.4f} / {evaluation.track_macro_f1:.4f}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data_service_command():
    """Run a tf.data service: one dispatcher and any number of workers that read and decode
    training records for `tclf-train --data-service HOST:PORT`.

    Start the dispatcher, then a worker on each machine that should do input work; the
    workers must be able to open the records path the trainers name (a shared folder or
    gs://). Its gRPC ports are unauthenticated and unencrypted: keep them on a private
    network (docs/cluster.md).
    """


@data_service_command.command("dispatcher",
                              context_settings={"show_default": True,
                                                "help_option_names": ["-h", "--help"]})
@click.option("--port", default=5050, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, printed).")
@click.option("--work-dir", default=None,
              help="Folder (any tf.io.gfile path) where the dispatcher keeps its state, so that "
                   "a restarted dispatcher carries on (fault-tolerant mode).")
@command
def data_service_dispatcher(port, work_dir):
    """Run the dispatcher until interrupted (Ctrl-C)."""
    import socket

    import tensorflow as tf

    if clusters.port_taken(port):
        raise click.ClickException(f"port {port} is in use on this machine (another "
                                   f"dispatcher?); choose another --port, or 0 for any free one")
    service = tf.data.experimental.service
    server = service.DispatchServer(service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir)))
    click.echo(f"tf.data service dispatcher on {socket.gethostname()}:"
               f"{server.target.rsplit(':', 1)[1]} (trainers: --data-service HOST:PORT)")
    server.join()


@data_service_command.command("worker",
                              context_settings={"show_default": True,
                                                "help_option_names": ["-h", "--help"]})
@click.option("--dispatcher", "dispatcher", required=True, help="The dispatcher's host:port.")
@click.option("--port", default=0, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--host", default=None,
              help="This machine's name as the trainers reach it. [default: its hostname]")
@click.option("--timeout", default=300.0, type=click.FloatRange(min=1.0),
              help="Seconds the worker waits for an unreachable dispatcher (at the start, and "
                   "when it stops answering) before it exits with one line.")
@command
def data_service_worker(dispatcher, port, host, timeout):
    """Run a worker until interrupted (Ctrl-C)."""
    import socket

    import tensorflow as tf

    from tclf.data.reader import check_service, service_address  # TensorFlow.

    if clusters.port_taken(port):
        raise click.ClickException(f"port {port} is in use on this machine; choose another "
                                   f"--port, or 0 for any free one")
    check_service(dispatcher, timeout)  # Nothing there: one line, not a silent wait.
    service = tf.data.experimental.service
    address = service_address(dispatcher).split("://", 1)[1]
    clusters.service_watchdog(address, timeout)  # Ends this process if the dispatcher goes away.
    server = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=address, worker_address=f"{host or socket.gethostname()}:%port%",
        port=port))
    click.echo(f"tf.data service worker on {host or socket.gethostname()}, dispatcher {address}")
    server.join()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="tclf",
                      message="%(prog)s %(version)s")
def main():
    """tclf: learn the styles of tracks from audio, then name the style of new ones.

    \b
    The pipeline, one subcommand per step:
      tclf extract AUDIO_DIR data/    audio -> spectrogram PNGs + feature matrices
      tclf pack data/ records/        -> sharded TFRecords, split by track
      tclf train --gpus all           -> models/vN/model.h5 and models/latest.h5
      tclf predict new_tracks/        the style of each track
      tclf eval --out eval/           scores of a model on a packed split

    Each subcommand is also its own command (tclf-extract, tclf-pack, ...). Shell completion
    (bash): eval "$(_TCLF_COMPLETE=bash_source tclf)"; zsh: zsh_source; fish: fish_source.
    """


SUBCOMMANDS = {"extract": extract_command, "pack": pack_command, "train": train_command,
               "predict": predict_command, "eval": eval_command, "tune": tune_command,
               "data-service": data_service_command}
for _name, _command in SUBCOMMANDS.items():
    main.add_command(_command, _name)
