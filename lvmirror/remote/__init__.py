"""Everything that runs beside a destination, shipped as the same bytes locally and over ssh.  Stdlib only.

The sending lvmirror starts these modules with the far side's ``python3 -I``
(see :mod:`lvmirror.bundle`); locally it runs the same bundle the same way in
a subprocess.  :data:`SHIPPED` is the one list of what is shipped: each module
keeps its real dotted name there, and the bundle's importer refuses anything
that is neither in this list nor in the standard library.
"""

SHIPPED = (
    "lvdeltafs.fsio",               # read exactly, atomic writes, locks, no links followed
    "lvdeltafs.formats.stream",     # the delta stream format: constants, errors, records
    "lvdeltafs.formats.codecs",     # compressed records' payloads
    "lvdeltafs.formats.reader",     # the stream's reader and its checks
    "lvdeltafs.formats.overlay",    # earlier points composed from undo deltas
    "lvmirror.remote",
    "lvmirror.remote.wire",         # frames, JSON lines, error kinds, request fields (both ends)
    "lvmirror.remote.faults",       # the fault tests' kill hook
    "lvmirror.remote.destination",  # where the destination and its files are, its identity, its lock
    "lvmirror.remote.state",        # the state and progress files, and the base check
    "lvmirror.remote.staging",      # verified, durable, resumable staging of a delta
    "lvmirror.remote.history",      # undo deltas, points, retention, rewind
    "lvmirror.remote.apply",        # preflight, writes, replay, commit
    "lvmirror.remote.serving",      # a destination's bytes, now or at a point, for a restore
    "lvmirror.remote.session",      # one session's engine over one destination
    "lvmirror.remote.server",       # the request loop and main()
)
MAIN = "lvmirror.remote.server"
