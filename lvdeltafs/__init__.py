"""lvdeltafs: the changes between two LVM snapshots, as ordinary files."""

from lvdeltafs.cpu_quirks import avoid_slow_avx512_sort

__version__ = "0.1.0"

avoid_slow_avx512_sort()  # before anything imports numpy: see lvdeltafs.cpu_quirks
