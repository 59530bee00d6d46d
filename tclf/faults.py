"""Fault injection for the reliability tests: die hard at a named point of a command.

``TCLF_KILL_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default
the first) it passes ``point(<point>)``, as a preempted machine or the OOM killer would
stop it: no exception, no cleanup, no atexit. Unset (always, outside the tests) a point
costs one dictionary lookup. The points are named where they are placed, e.g.
``extract.track_written`` or ``train.epoch_end``; RELIABILITY.md lists the tests that use them.
"""

from __future__ import annotations

import collections
import os
import signal

_passed: collections.Counter = collections.Counter()


def point(name: str) -> None:
    """Die here if TCLF_KILL_AT names this point (and this is the chosen pass)."""
    target = os.environ.get("TCLF_KILL_AT")
    if not target:
        return
    wanted, _, count = target.partition(":")
    if wanted != name:
        return
    _passed[name] += 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
