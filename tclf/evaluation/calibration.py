"""Probabilities that mean what they say: temperature scaling and its measure.

A model's softmax is often overconfident after training on a few hundred segments. One
temperature T, fitted on the validation split's segments after training (the negative
log-likelihood at T, minimized), divides the logits: p_T is proportional to p ** (1 / T),
so the ranking of the classes, and every accuracy, stay as they were. tclf-train stores T
in model.h5 (the attribute ``tclf_temperature``); tclf-eval and tclf-predict apply it to
every segment's probabilities before a track's are averaged.
"""

from __future__ import annotations

import numpy as np

TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities, temperature: float) -> np.ndarray:
    """Segment probabilities [N, C] at ``temperature`` (1: unchanged)."""
    probs = np.asarray(probabilities, np.float64)
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities, labels) -> float:
    probs = np.asarray(probabilities, np.float64)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(probs)), labels], 1e-12, 1.0))))


def fit_temperature(probabilities, labels) -> float:
    """The temperature within TEMPERATURE_RANGE that minimizes the negative log-likelihood
    of ``labels`` (int [N]) under ``probabilities`` [N, C]; 1.0 for an empty split."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, np.int64)
    if not len(labels):
        return 1.0
    low, high = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(apply_temperature(probabilities, np.exp(log_t)),
                                              labels),
        bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def expected_calibration_error(probabilities, labels, bins: int = 10) -> float:
    """ECE: the mean over equal-width confidence bins of |accuracy - confidence|, weighted
    by each bin's share of the predictions (top-label, as in Guo et al. 2017)."""
    probs = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    if not len(labels):
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)
