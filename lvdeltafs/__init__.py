"""lvdeltafs: the changes between two LVM snapshots, as ordinary files."""

__version__ = "0.1.0"
