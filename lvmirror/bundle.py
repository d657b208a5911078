"""The receiver as shipped: a constant bootstrap, and a blob of the modules in ``lvmirror.remote.SHIPPED``.

Both transports run exactly this: ``python3 -I -c BOOTSTRAP`` (over ssh
through the far user's shell, locally without one), then the blob on its
stdin, then the protocol on the same stdin/stdout.  Everything user-controlled
(the destination path, options) travels in the blob as data, so the command
line is a constant.  The modules are executed in memory under their real
dotted names (nothing is written on the far host before the receiver decides
what to write), and the bootstrap's importer refuses every import that is
neither shipped nor in the standard library nor in ``OPTIONAL``: a receiver
that imported numpy or a project module by mistake fails on every host, this
one included.  ``OPTIONAL`` are the far host's own packages the receiver may
use when they are there and does without when not (zstandard: the zstd codec,
:mod:`lvdeltafs.formats.codecs`; isal: a faster CRC-32, :mod:`lvdeltafs.formats.stream`);
nothing of them is shipped.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import marshal
import re
import shlex
import sys
from pathlib import Path

from lvdeltafs.errors import BadInput, ConnectionProblem
from lvmirror.remote import MAIN, SHIPPED

# Exit statuses of the bootstrap: 127 is the shell's "command not found".
EXIT_NOT_FOUND = 127
EXIT_PYTHON_TOO_OLD = 90
EXIT_BAD_BLOB = 91
RESUMES = "the next run resumes from what the receiver holds"
MIN_PYTHON = (3, 10)  # sys.stdlib_module_names, dataclass(slots=True)
OPTIONAL = ("zstandard", "isal")

# The blob is read from fd 0 with os.read, never through sys.stdin's buffer, so no byte of the
# protocol that follows is swallowed by a read-ahead the receiver would not see.
BOOTSTRAP = f"""\
import sys, os, json, linecache, importlib, importlib.util, base64, marshal
if sys.version_info < {MIN_PYTHON!r}:
    sys.stderr.write('lvmirror: python %d.%d on this host is too old; the receiver needs '
                     '{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer\\n' % sys.version_info[:2])
    sys.exit({EXIT_PYTHON_TOO_OLD})
def take(n):
    buf = b''
    while len(buf) < n:
        more = os.read(0, n - len(buf))
        if not more:
            sys.stderr.write('lvmirror: the bootstrap blob ended early\\n')
            sys.exit({EXIT_BAD_BLOB})
        buf += more
    return buf
blob = json.loads(take(int.from_bytes(take(8), 'little')))
sources = dict(blob['modules'])
packages = set(blob['packages'])
codes = blob.get('code', {{}}) if blob.get('magic') == importlib.util.MAGIC_NUMBER.hex() else {{}}
class Bundle:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in sources or name in packages:
            return importlib.util.spec_from_loader(name, cls, is_package=name in packages)
        top = name.partition('.')[0]
        if top in ('lvdeltafs', 'lvmirror') or not (top in sys.stdlib_module_names or top in {OPTIONAL!r}):
            raise ImportError('lvmirror receiver: ' + name + ' is neither shipped nor in the standard '
                              'library; the receiver may import only those', name=name)
        return None
    @staticmethod
    def create_module(spec):
        return None
    @staticmethod
    def exec_module(module):
        name = module.__name__
        source = sources.get(name, '')
        filename = '<lvmirror ' + name + '>'
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = filename
        code = codes.get(name)
        if code is None:
            code = compile(source, filename, 'exec')
        else:
            code = marshal.loads(base64.b64decode(code))
            linecache.cache[code.co_filename] = linecache.cache[filename]
        exec(code, module.__dict__)
sys.meta_path.insert(0, Bundle)
sys.exit(importlib.import_module(blob['main']).main(blob['argv']))
"""


def remote_command(remote_python: str = "python3") -> str:
    """The one command line sent to the far user's shell: a constant except for the python name.

    The code travels base64-encoded in one line, so any login shell (sh, bash, csh, fish) passes
    it through untouched; ``remote_python`` is checked to be a plain command name or path.
    """
    if not re.fullmatch(r"[A-Za-z0-9_./+-]+", remote_python):
        raise BadInput(f"remote python {remote_python!r} must be a plain command name or path")
    encoded = base64.b64encode(BOOTSTRAP.encode()).decode()
    code = f"import base64;exec(base64.b64decode('{encoded}'))"
    # -I: ignore PYTHON* variables and the user's site-packages on the far side.
    return f"exec {shlex.quote(remote_python)} -I -c {shlex.quote(code)}"


def local_argv() -> list[str]:
    """The same bootstrap on this host: the system's python3 (not the virtualenv's), isolated."""
    python = getattr(sys, "_base_executable", "") or sys.executable
    return [python, "-I", "-c", BOOTSTRAP]


@functools.cache
def shipped_sources() -> list[tuple[str, str]]:
    """(dotted name, source) of every shipped module, read from this installation."""
    out = []
    for name in SHIPPED:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise BadInput(f"the receiver module {name} is missing from this installation: "
                           "reinstall lvmirror")
        out.append((name, Path(spec.origin).read_text()))
    return out


@functools.cache
def shipped_code() -> dict[str, str]:
    """The shipped modules compiled, as this installation's own bytecode cache holds them (base64 of
    marshal): for a receiver run by this python, which then skips compiling (measured: 40 ms of a
    local receiver's 100 ms start).  Only valid for the very same python version (the bootstrap checks
    the magic number and compiles the sources otherwise)."""
    out = {}
    for name in SHIPPED:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            return {}
        out[name] = base64.b64encode(marshal.dumps(spec.loader.get_code(name))).decode()
    return out


def packages_of(names: list[str]) -> list[str]:
    """Every package a shipped module lives in (created empty unless it is shipped itself)."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(out)


def blob(argv: list[str], modules: list[tuple[str, str]] | None = None, main: str = MAIN, *,
         compiled: bool = False) -> bytes:
    """The length-prefixed JSON the bootstrap reads: modules, packages, then main(argv).

    ``compiled``: the shipped modules' bytecode too, for a receiver run by this same python (the local
    one); over ssh the far python's version is not known, and the sources alone are smaller."""
    doc: dict = {"main": main, "argv": argv}
    if modules is None:
        modules = shipped_sources()
        if compiled:
            doc.update(magic=importlib.util.MAGIC_NUMBER.hex(), code=shipped_code())
    names = [n for n, _ in modules]
    doc.update(modules=modules, packages=packages_of(names))
    raw = json.dumps(doc).encode()
    return len(raw).to_bytes(8, "little") + raw


def exit_problem(host: str, remote_python: str, status: int | None, last: str,
                 what: str) -> ConnectionProblem:
    """Why the far side went away, from the remote command's exit status and its last stderr line.

    Both ssh transports use it: OpenSSH's ssh passes the remote status through as its own.
    """
    if status == EXIT_NOT_FOUND:
        said = f" ({last})" if last else ""
        return ConnectionProblem(
            f"{remote_python} was not found on {host} (exit status 127){said}: install "
            "python3 there; the receiver needs nothing else")
    if status in (EXIT_PYTHON_TOO_OLD, EXIT_BAD_BLOB):
        return ConnectionProblem(f"the receiver could not start on {host}: {last}")
    if status is not None:
        detail = f": {last}" if last else ""
        return ConnectionProblem(f"the receiver on {host} ended unexpectedly (exit status {status})"
                                 f"{detail}; {RESUMES}")
    return ConnectionProblem(f"the ssh connection to {host} was lost ({what}); {RESUMES}")
