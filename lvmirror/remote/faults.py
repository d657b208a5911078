"""The fault tests' kill hook: ``LVMIRROR_TEST_KILL_AT=PHASE:N`` SIGKILLs the receiver at its N-th PHASE.

Phases: ``receive`` (a record staged), ``sync`` (staging progress saved),
``undo`` (a block of an undo delta written), ``rewind`` (a rewind's delta staged),
``restore`` (a range written by ``lvmirror restore``: this one kills lvmirror itself),
``apply`` (a destination write), ``applied`` (after the destination's fsync,
before the new state), ``committed`` (after the new state, before the staging
files are removed).  Without the variable every tick is a no-op.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("LVMIRROR_TEST_KILL_AT") or ""
_phase, _, _n = _spec.partition(":")
_at = int(_n) if _n.isdigit() else 1
_count = 0


def tick(phase: str) -> None:
    global _count
    if not _spec or phase != _phase:
        return
    _count += 1
    if _count >= _at:
        os.kill(os.getpid(), signal.SIGKILL)
