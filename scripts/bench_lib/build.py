"""Compile the C helpers on the fly.

The helpers are single files in ``csrc/`` built with the system ``gcc``
into ``<out>/bin``.  A binary is rebuilt only when its source or flags
change (the name carries a hash of both), so a second run starts at once.
"""

import hashlib as _hashlib
import os as _os
import shutil as _shutil
import subprocess as _subprocess

CSRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "csrc")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


class BuildError(Exception):
    """A helper did not compile; the message carries gcc's output."""


def build(name, outdir, cc=None, flags=(), variant=""):
    """Return the path of the compiled ``csrc/<name>.c``, building it if needed.

    ``flags``: more gcc arguments (include paths, -D...); ``variant`` names a
    second build of the same source."""
    cc = cc or _os.environ.get("CC") or "gcc"
    if _shutil.which(cc) is None:
        raise BuildError(f"no C compiler '{cc}': install gcc (Debian: apt-get install gcc libc6-dev)")
    src = _os.path.join(CSRC, name + ".c")
    with open(src, "rb") as f:
        digest = _hashlib.sha256(f.read() + " ".join((cc,) + CFLAGS + tuple(flags)).encode()).hexdigest()[:12]
    bindir = _os.path.join(outdir, "bin")
    _os.makedirs(bindir, exist_ok=True)
    exe = _os.path.join(bindir, f"{name}{variant}-{digest}")
    if _os.access(exe, _os.X_OK):
        return exe
    tmp = f"{exe}.tmp{_os.getpid()}"
    res = _subprocess.run([cc, *CFLAGS, *flags, "-o", tmp, src], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise BuildError(f"cannot compile {src}:\n{res.stderr.strip()}")
    _os.replace(tmp, exe)
    return exe


def build_all(names, outdir):
    """Build every helper in ``names``; return {name: path}."""
    return {name: build(name, outdir) for name in names}
