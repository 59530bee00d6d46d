"""The split of a pack: by track (never by segment), stratified by class, 80/20 by default,
deterministic for a seed, optionally keeping groups (e.g. an artist) on one side."""

from __future__ import annotations

import collections
import csv
import io

import numpy as np

from tclf import InputError, storage


def read_groups(path: str) -> dict[str, str]:
    """CSV rows `track_id,group` (a header row is allowed) -> {track_id: group}."""
    groups = {}
    text = storage.read_bytes(path).decode("utf-8")
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) < 2:
            raise InputError(f"{path}, line {number}: expected `track_id,group`, got {row}")
        if number == 1 and row[0].strip().lower() == "track_id":
            continue
        groups[row[0].strip()] = row[1].strip()
    return groups


def split_tracks(track_labels: dict[str, int], val_fraction: float = 0.2, seed: int = 0,
                 groups: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Split tracks into train and val, stratified by class, deterministic for a seed.

    Each group (by default each track is its own group) goes to one side as a
    whole. Groups are visited in a seeded random order and put in val while
    that brings every class's val count closer to round(val_fraction * n).

    Parameters
    ----------
    track_labels : {track_id: label}
    groups : {track_id or track folder name: group}, optional

    Returns
    -------
    {"train": [track ids], "val": [track ids]}, each sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = groups or {}
    per_class = collections.Counter(track_labels.values())
    target = {}
    for label, count in per_class.items():
        wanted = int(round(count * val_fraction))
        if val_fraction > 0 and count >= 2:
            wanted = min(max(wanted, 1), count - 1)
        target[label] = wanted
    members = collections.defaultdict(list)
    for track in sorted(track_labels):
        group = groups.get(track, groups.get(track.split("/", 1)[-1]))
        members[("group", group) if group is not None else ("track", track)].append(track)
    keys = sorted(members)
    order = np.random.default_rng(seed).permutation(len(keys))
    in_val = collections.Counter()
    split = {"train": [], "val": []}
    for index in order:
        tracks = members[keys[index]]
        adds = collections.Counter(track_labels[t] for t in tracks)
        change = sum(abs(in_val[c] + n - target[c]) - abs(in_val[c] - target[c])
                     for c, n in adds.items())
        side = "val" if change < 0 else "train"
        if side == "val":
            in_val.update(adds)
        split[side].extend(tracks)
    return {side: sorted(tracks) for side, tracks in split.items()}
