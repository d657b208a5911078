"""Writing the five delta files into a directory, all replaced together or none.

The bytes come from the views of :mod:`.files`; every file is written
through an :class:`~lvdeltafs.fsio.Folder`, so a link or a file someone
planted in the directory is refused, never followed or overwritten.
"""

from __future__ import annotations

import hashlib
import os
import stat

from lvdeltafs.delta import Delta
from lvdeltafs.errors import Refused
from lvdeltafs.formats.files import NAMES, ChunksView, DeltaFiles, ManifestView, RangesView
from lvdeltafs.fsio import Folder, UnsafePath, pwrite_all, write_all


class _Staging:
    """The delta files under fresh temporary names, renamed into place together once all are complete.

    Every file is created by :meth:`Folder.create_temp` (a new random name,
    O_EXCL, no link followed), so nothing someone planted in the folder is
    ever opened; the final names are only ever renamed over, never opened.
    Until :meth:`commit` the previous set (if any) stays whole.
    """

    def __init__(self, folder: Folder):
        self.folder = folder
        self._temps: dict[str, str] = {}  # final name -> temporary name, in creation order
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def new(self, name: str) -> int:
        tmp, fd = self.folder.create_temp(name)  # private (0600): a delta holds the volume's data
        self._temps[name], self._fds[name] = tmp, fd
        return fd

    def done(self, name: str) -> None:
        """``name`` is complete: make it durable and close it."""
        fd = self._fds.pop(name)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        for name, tmp in list(self._temps.items()):
            _check_final_name(self.folder, name)  # again: a sticky folder lets others add entries meanwhile
            self.folder.rename(tmp, name)
            del self._temps[name]
        self.folder.sync()  # make the renames durable

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for tmp in self._temps.values():
            self.folder.unlink(tmp)
        self._temps.clear()


def _check_final_name(folder: Folder, name: str) -> None:
    """An existing file at a final name is replaced only if it is a regular file of ours."""
    st = folder.stat(name)
    if st is None:
        return
    where = folder.where(name)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{where} is a symbolic link; export does not replace links someone may have "
                         "planted: remove it (or export into a new directory), then run again")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{where} exists and is not a regular file: remove it, or export into a new "
                         "directory")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{where} belongs to uid {st.st_uid}, not to this user: someone else made it; "
                         "remove it (or export into a new directory), then run again")


def _open_export_folder(directory: str) -> Folder:
    """The export directory, created private if missing; refused if others could control it."""
    path = os.path.abspath(directory)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    # Folder follows a link at the directory's own name: only one we or root made may choose where it goes.
    if st is not None and stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
        raise UnsafePath(f"{path} is a symbolic link made by uid {st.st_uid}, who would choose where the "
                         "export is written: name the real directory instead")
    return Folder(path, create=True, mode=0o700)


def export(delta: Delta, directory: str) -> dict[str, int]:
    """Write the five delta files into ``directory``; returns name -> size.

    `data` is sparse: only its DATA ranges are written, the rest are holes.
    `data` and `chunks` are written in one pass over the target, which also
    gives the manifest's digest; the stream is a second pass.  A directory
    others may write (unless sticky, like /tmp), or a final name held by a
    link or by another user's file, is refused (Refused, exit 4) before
    anything is written.
    """
    try:
        with _open_export_folder(directory) as folder:
            for name in NAMES:
                _check_final_name(folder, name)
            with _Staging(folder) as staging:
                _stage_all(delta, staging)
                staging.commit()
            return {name: _size_of(folder, name) for name in NAMES}
    except UnsafePath as e:
        raise Refused(f"refusing to export into {directory}: {e}") from None


def _stage_all(delta: Delta, staging: _Staging) -> None:
    files = DeltaFiles(delta)
    ranges: RangesView = files["ranges"]
    fd = staging.new("ranges")
    ranges.extents.write_text(lambda block: write_all(fd, block))
    staging.done("ranges")

    manifest: ManifestView = files["manifest.json"]
    manifest.set_chunks_sha256(_stage_data_and_chunks(delta, files, staging))
    write_all(staging.new("manifest.json"), manifest.content())
    staging.done("manifest.json")

    fd = staging.new("delta")
    for blk in files["delta"].blocks():
        write_all(fd, blk)
    staging.done("delta")


def _stage_data_and_chunks(delta: Delta, files: DeltaFiles, staging: _Staging) -> str:
    """`data` (sparse) and `chunks` in one pass over the target; returns the sha256 of `chunks`."""
    data_fd, chunks_fd = staging.new("data"), staging.new("chunks")
    os.ftruncate(data_fd, delta.identity.target_size)
    h = hashlib.sha256()
    chunks: ChunksView = files["chunks"]
    for off, ln in chunks.pieces():
        buf = delta.read(off, ln)
        pwrite_all(data_fd, buf, off)
        write_all(chunks_fd, buf)
        h.update(buf)
    staging.done("data")
    staging.done("chunks")
    return h.hexdigest()


def _size_of(folder: Folder, name: str) -> int:
    st = folder.stat(name)
    return st.st_size if st is not None else 0

