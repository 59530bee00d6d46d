"""Make a small reference fixture of the original musicnn 0.1.0 MSD model's outputs.

Why: the Keras 3 port of musicnn must reproduce the original TF1 graph. This script
runs the ORIGINAL model (tf.compat.v1 graph, restored strictly from its checkpoint)
on two 187-frame log-mel patches of real music and saves inputs and outputs, so a
test can feed the same mel patches to the port and compare.

The fixture (np.savez_compressed) holds:
    mel          float32 [2, 187, 96]  log10(10000 x + 1) mel patches (model input)
    penultimate  float32 [2, 200]      batch-normalised 200-unit dense layer
    logits       float32 [2, 50]
    tags         float32 [2, 50]       sigmoid(logits), order of MSD_LABELS
    meta         str (JSON)            musicnn version, audio basename, offset,
                                       labels, checkpoint variables in creation order

It needs an environment where the original runs (see /work/shared/musicnn/README.md),
not the project's own one. Run it with:

    /work/musicnn-venv/bin/python tools/make_musicnn_reference.py AUDIO \\
        [--out tests/fixtures/musicnn_reference.npz] [--offset 10]
"""

import argparse
import importlib.metadata
import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # must precede the TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import librosa  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import musicnn  # noqa: E402
from musicnn import configuration, models  # noqa: E402

MODEL = "MSD_musicnn"
SR = 16000
N_FRAMES = 187
N_MELS = 96
N_PATCHES = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("audio", help="real-music audio file")
    p.add_argument("--out", default="tests/fixtures/musicnn_reference.npz")
    p.add_argument("--offset", type=float, default=10.0, help="start, seconds")
    p.add_argument("--duration", type=float, default=8.0, help="seconds loaded")
    return p.parse_args(argv)


def log_mel_patches(path, offset, duration):
    """Return float32 [N_PATCHES, N_FRAMES, N_MELS] consecutive log-mel patches."""
    y, _ = librosa.load(path, sr=SR, mono=True, offset=offset, duration=duration)
    mel = librosa.feature.melspectrogram(
        y=y, sr=SR, hop_length=256, n_fft=512, n_mels=N_MELS
    ).T.astype(np.float32)
    # float32, not musicnn's float16 (where 10000 x overflows to inf).
    logmel = np.log10(np.float32(10000) * mel + np.float32(1)).astype(np.float32)
    need = N_PATCHES * N_FRAMES
    if logmel.shape[0] < need:
        raise SystemExit(f"only {logmel.shape[0]} frames, need {need}")
    return logmel[:need].reshape(N_PATCHES, N_FRAMES, N_MELS)


def checkpoint_prefix():
    return os.path.join(os.path.dirname(musicnn.__file__), MODEL, "")


def build_graph():
    """Build the original graph; return (x, is_training, logits, penultimate)."""
    tf.compat.v1.disable_eager_execution()
    x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, N_MELS])
    is_training = tf.compat.v1.placeholder(tf.bool)
    out = models.define_model(x, is_training, MODEL, len(configuration.MSD_LABELS))
    return x, is_training, out[0], out[8]


def checkpoint_variables(prefix):
    """Graph variables in creation order with shapes; check them against the checkpoint."""
    ckpt = tf.compat.v1.train.NewCheckpointReader(prefix).get_variable_to_shape_map()
    rows = []
    for v in tf.compat.v1.global_variables():
        name, shape = v.op.name, v.shape.as_list()
        if ckpt.get(name) != shape:
            raise SystemExit(f"{name}: graph {shape} vs checkpoint {ckpt.get(name)}")
        rows.append([name, shape])
    unused = sorted(n for n in ckpt if n not in {r[0] for r in rows}
                    and "Adam" not in n and n not in ("beta1_power", "beta2_power"))
    if unused:
        raise SystemExit(f"checkpoint variables not in graph: {unused}")
    return rows


def run_model(mel):
    """Run the original model strictly restored; return (logits, penultimate, variables)."""
    x, is_training, logits, penultimate = build_graph()
    prefix = checkpoint_prefix()
    variables = checkpoint_variables(prefix)
    with tf.compat.v1.Session() as sess:
        # Strict: raises if any graph variable is missing (musicnn.extractor would not).
        tf.compat.v1.train.Saver(tf.compat.v1.global_variables()).restore(sess, prefix)
        lg, pen = sess.run([logits, penultimate], {x: mel, is_training: False})
    return lg.astype(np.float32), pen.astype(np.float32), variables


def print_top_tags(tags, k=5):
    for i, row in enumerate(tags):
        top = np.argsort(row)[::-1][:k]
        print(f"patch {i}: " + ", ".join(
            f"{configuration.MSD_LABELS[j]} {row[j]:.3f}" for j in top))


def save_fixture(out, mel, logits, penultimate, meta):
    tags = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    np.savez_compressed(out, mel=mel, penultimate=penultimate, tags=tags,
                        logits=logits, meta=np.array(json.dumps(meta)))
    return tags


def main(argv=None):
    args = parse_args(argv)
    mel = log_mel_patches(args.audio, args.offset, args.duration)
    logits, penultimate, variables = run_model(mel)
    meta = {
        "musicnn_version": importlib.metadata.version("musicnn"),
        "model": MODEL,
        "audio": os.path.basename(args.audio),
        "offset_s": args.offset,
        "sr": SR, "hop_length": 256, "n_fft": 512, "n_mels": N_MELS,
        "n_frames": N_FRAMES,
        "mel_transform": "log10(10000*x+1), float32",
        "penultimate": "batch-normalised relu dense(200), is_training=False",
        "labels": configuration.MSD_LABELS,
        "variables": variables,
    }
    tags = save_fixture(args.out, mel, logits, penultimate, meta)
    for name, shape in variables:
        print(f"{name} {shape}")
    print_top_tags(tags)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
