"""The delta files: the ranges map, data, chunks, manifest and the self-checking stream.

:mod:`.stream` is standard-library only (lvmirror ships it to bare hosts) and
raises its own StreamError family; :func:`project_error` maps those onto the
project's exceptions for everything else.
"""

from __future__ import annotations

from lvdeltafs.errors import BadInput, CorruptDelta, UnsupportedFormat
from lvdeltafs.formats.stream import StreamError, StreamUnsupported


def project_error(e: StreamError) -> BadInput:
    """The project exception for a stream error: UnsupportedFormat for newer formats, else CorruptDelta."""
    cls = UnsupportedFormat if isinstance(e, StreamUnsupported) else CorruptDelta
    err = cls(str(e))
    err.offset = e.offset  # type: ignore[attr-defined]
    return err
