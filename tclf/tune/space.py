"""What a search explores and how a trial is scored: the space (TrainConfig fields), its
--space overrides, the tuners and the objectives. No Keras Tuner import: the CLI reads it."""

from __future__ import annotations

import math

from tclf import InputError, report_skip
from tclf.training.config import TrainConfig

TUNERS = ("random", "bayesian", "hyperband")
OBJECTIVES = {  # name: direction. Every trial reports all of them.
    "val_track_accuracy": "max",
    "val_track_macro_f1": "max",
    "val_accuracy": "max",
    "val_loss": "min",
}

# The search space: TrainConfig fields. The defaults are TrainConfig's (the spec's values),
# so the first trial is the baseline.
SPACE = {
    "image_units": {"values": [64, 128, 256]},
    "feature_units": {"values": [32, 64, 128]},
    "fusion_units": {"values": [64, 128, 256]},
    "head_units": {"values": [32, 64, 128]},
    "gru_units": {"values": [64, 128, 256]},
    "gru2_units": {"values": [32, 64, 128]},
    "attention_heads": {"values": [1, 2, 4, 8]},
    "dropout": {"min": 0.1, "max": 0.6, "step": 0.05},
    "stage1_lr": {"min": 1e-5, "max": 1e-3, "log": True},
    "stage2_lr": {"min": 1e-6, "max": 1e-4, "log": True},
    "stage1_warmup_epochs": {"min": 0.0, "max": 3.0, "step": 0.5},
    "stage2_warmup_epochs": {"min": 0.0, "max": 2.0, "step": 0.5},
    "stage2_layers": {"min": 0, "max": 80, "step": 10},
}
# Ranges that count backbone layers, per backbone other than EfficientNetB0 (238 layers).
# musicnn has 40: its top 20 are the mid end and the embedding's Dense, the rest the front end.
BACKBONE_SPACE = {"musicnn": {"stage2_layers": {"min": 0, "max": 40, "step": 5}}}


def for_backbone(space: dict, backbone: str, layer_count: int) -> dict:
    """``space`` for a pack of ``backbone`` (with ``layer_count`` layers): the default range of
    each option that counts its layers replaced by the backbone's, and every value checked
    against the count."""
    space = {name: dict(spec) for name, spec in space.items()}
    spec = space.get("stage2_layers")
    if spec is None:
        return space
    default = {k: v for k, v in SPACE["stage2_layers"].items()}
    if {k: v for k, v in spec.items() if k != "default"} == default:
        own = BACKBONE_SPACE.get(backbone, {}).get("stage2_layers", default)
        spec = {**own, "default": _nearest(own, TrainConfig().stage2_layers)}
        space["stage2_layers"] = spec
    highest = max(spec["values"]) if "values" in spec else spec["max"]
    if highest > layer_count:
        raise InputError(f"--space: stage2_layers: {highest} is more than the {layer_count} "
                         f"layers of the {backbone} backbone")
    return space

def search_space(overrides: dict | None = None, fixed=None,
                 base: TrainConfig | None = None) -> dict:
    """SPACE narrowed by ``overrides`` (a --space file: name -> value to fix, list of choices,
    or {"min", "max", "step" | "log"} / {"values"}), minus the names in ``fixed`` (options the
    user gave, which every trial uses). Each value is checked as an option of ``base`` (the
    search's other options). Returns name -> spec with a "default" (TrainConfig's)."""
    defaults = TrainConfig()
    base = base or defaults
    space = {name: dict(spec) for name, spec in SPACE.items()}
    for name, value in (overrides or {}).items():
        if name not in SPACE:
            raise InputError(f"--space: {name!r} is not searched; searched: "
                             f"{', '.join(SPACE)}")
        kind = type(getattr(defaults, name))
        if isinstance(value, list):
            value = {"values": value}
        if isinstance(value, dict):
            unknown = set(value) - {"values", "min", "max", "step", "log"}
            if unknown or not value or ("values" in value and len(value) > 1):
                raise InputError(f"--space: {name}: expected a value, a list of values, "
                                 f"{{\"values\": [...]}} or {{\"min\", \"max\", \"step\" or "
                                 f"\"log\"}}, got {value!r}")
            if "values" in value:
                spec = {"values": value["values"]}
            else:
                if "values" in SPACE[name] and not {"min", "max"} <= set(value):
                    raise InputError(f"--space: {name} is searched over a list of values; a "
                                     f"range for it needs both min and max")
                if value.get("log") and value.get("step") is not None:
                    raise InputError(f"--space: {name}: step and log exclude each other")
                spec = {**{k: v for k, v in SPACE[name].items() if k != "values"}, **value}
                if value.get("step") is not None:
                    spec.pop("log", None)
                if spec.get("log"):
                    spec.pop("step", None)
        else:
            spec = {"values": [value]}
        space[name] = _checked(name, spec, kind, base)
    for name in fixed or ():
        if name in (overrides or {}):  # Both say something: the command line's value wins.
            report_skip(f"--space: {name} is also given as an option ({name.replace('_', '-')} "
                        f"{getattr(base, name)!r}), which every trial uses; the --space entry "
                        f"{overrides[name]!r} is ignored")
        space.pop(name, None)
    for name, spec in space.items():
        spec["default"] = _nearest(spec, getattr(defaults, name))
    return space


def _checked(name: str, spec: dict, kind: type, base: TrainConfig) -> dict:
    def number(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"--space: {name}: {value!r} is not a number")
        if kind is int and value != int(value):
            raise InputError(f"--space: {name}: {value!r} is not an integer")
        value = kind(value)
        try:  # The option's own checks: a value no trial could use is refused now.
            base.replace(**{name: value}).validate()
        except InputError as error:
            raise InputError(f"--space: {name}: {value!r}: {error}") from None
        if name == "stage2_layers" and value < 0:
            raise InputError(f"--space: {name}: {value!r}: must be >= 0")
        return value

    if "values" in spec:
        values = [number(v) for v in spec["values"]]
        if not values:
            raise InputError(f"--space: {name}: no values")
        return {"values": sorted(set(values))}
    low, high = number(spec["min"]), number(spec["max"])
    if low > high:
        raise InputError(f"--space: {name}: min {low} > max {high}")
    out = {"min": low, "max": high}
    if spec.get("log"):
        if low <= 0:
            raise InputError(f"--space: {name}: a log range needs min > 0")
        out["log"] = True
    elif spec.get("step") is not None:
        step = spec["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or (
                kind is int and step != int(step)):
            raise InputError(f"--space: {name}: step must be a positive "
                             f"{'integer' if kind is int else 'number'}, got {step!r}")
        out["step"] = kind(step)
    return out


def _grid(spec: dict) -> int:
    """The index of the last step of a stepped range that is not above its max."""
    return math.floor((spec["max"] - spec["min"]) / spec["step"] + 1e-9)


def _nearest(spec: dict, value):
    """The spec's value nearest ``value`` (the baseline, where the space allows it)."""
    if "values" in spec:
        return min(spec["values"], key=lambda v: (abs(v - value), v))
    low, high = spec["min"], spec["max"]
    clipped = min(max(value, low), high)
    if spec.get("step"):
        clipped = low + min(round((clipped - low) / spec["step"]), _grid(spec)) * spec["step"]
    return tidy(type(low)(clipped))


def tidy(value):
    """Floats on a step grid without binary noise (0.15, not 0.15000000000000002)."""
    return round(value, 10) if isinstance(value, float) else value


def declare(hp, space: dict) -> None:
    """Declare ``space`` in a keras_tuner HyperParameters."""
    for name, spec in space.items():
        if "values" in spec:
            hp.Choice(name, spec["values"], default=spec["default"])
        elif isinstance(spec["min"], int):
            hp.Int(name, spec["min"], spec["max"],
                   step=None if spec.get("log") else spec.get("step", 1),
                   sampling="log" if spec.get("log") else "linear", default=spec["default"])
        elif spec.get("step"):
            # Keras Tuner counts a float grid's values with a floor that can drop the max
            # (0.1 to 0.6 step 0.05 gave 0.1 ... 0.55): the max is nudged up, and the values
            # rounded where they are read (tidy).
            hp.Float(name, spec["min"], spec["min"] + _grid(spec) * spec["step"] + 1e-9,
                     step=spec["step"], default=spec["default"])
        else:
            hp.Float(name, spec["min"], spec["max"],
                     sampling="log" if spec.get("log") else "linear", default=spec["default"])


