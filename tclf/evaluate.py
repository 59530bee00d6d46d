"""Evaluate a model on a packed split: used after training and by `tclf-eval`."""

from __future__ import annotations

import numpy as np

from tclf import InputError, data, records, reports


def predict_records(model, records_dir: str, split: str = "val", batch_size: int = 32,
                    image_size: int | None = None):
    """Run a model over one split, in the records' fixed order.

    Returns
    -------
    probabilities : np.ndarray [shape=(n, classes)]
    labels : np.ndarray [shape=(n,)]
    track_ids : list of str [length n]
    """
    if image_size is None:  # Feed the size the model was built for.
        from tclf.model import image_size_of

        image_size = image_size_of(model)
    dataset = data.make_dataset(records_dir, split, batch_size=batch_size, training=False,
                                image_size=image_size, include_track_id=True)
    probabilities, labels, track_ids = [], [], []
    with data.naming_corrupt_shards(records_dir, split):
        for inputs, label, track in dataset:
            probabilities.append(np.asarray(model(inputs, training=False), np.float64))
            labels.append(label.numpy())
            track_ids.extend(t.decode() for t in track.numpy())
    return np.concatenate(probabilities), np.concatenate(labels), track_ids


def evaluate_records(model, class_names, records_dir: str, split: str = "val",
                     batch_size: int = 32) -> reports.Evaluation:
    """Segment- and track-level metrics of a model on a packed split."""
    manifest = records.load_manifest(records_dir)
    if list(manifest["classes"]) != list(class_names):
        raise InputError(f"the model's classes {list(class_names)} differ from the records' "
                         f"{manifest['classes']} ({records_dir})")
    probabilities, labels, track_ids = predict_records(model, records_dir, split, batch_size)
    return reports.evaluate(probabilities, labels, track_ids, class_names)
