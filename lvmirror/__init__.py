"""lvmirror: keep mirrors of LVM volumes in step by moving only the changed chunks."""

from lvdeltafs import __version__

__all__ = ["__version__"]
