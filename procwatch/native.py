"""The optional C extension, ``procwatch._hotstep``, and the word that says which path runs.

The extension holds the detector's hot step (recv -> decode -> lookup ->
pidfd check -> compare-and-swap of the PID word -> FUTEX_WAKE, all without
the GIL), the atomics every clear of a PID word goes through, and the C base
of :class:`procwatch.Peer`.  pip builds it with the package; where it could
not be built or loaded (no compiler at install time, another interpreter),
procwatch runs the same steps in Python: slower (~50 µs more before the
wake, ~70 ns a Peer read), never different in what it reports.  The service
says which path runs once, in its start-up line, and ``procwatch status``
shows it.

``hot`` is the module, or None; ``WHY_NOT`` says why not (one line).
$PROCWATCH_NO_NATIVE=1 turns the extension off (to rule it out, and for
the tests of the Python path).
"""

import os as _os

DISABLE_ENV = "PROCWATCH_NO_NATIVE"   # =1: run the Python path even where the extension loads

if _os.environ.get(DISABLE_ENV, "") not in ("", "0"):
    hot = None
    WHY_NOT = f"the C extension is turned off (${DISABLE_ENV}={_os.environ[DISABLE_ENV]})"
else:
    try:
        from . import _hotstep as hot
        WHY_NOT = None
    except ImportError as _e:          # built without a compiler, or another ABI
        hot = None
        WHY_NOT = f"the C extension procwatch._hotstep did not load ({_e}); reinstall with gcc and python3-dev"

AVAILABLE = hot is not None
SO_NAME = "_hotstep."              # how the loaded extension shows in /proc/PID/maps


def describe():
    """One phrase for logs and status: which hot step runs, and why not the C one."""
    if AVAILABLE:
        return "native hot step"
    return f"pure-Python hot step: {WHY_NOT}"


def loaded_in(pid, procfs="/proc"):
    """Whether process ``pid`` has the extension mapped (True/False), None if its maps are unreadable.

    ``procwatch status`` asks the running service this way: the table's
    header has no room for it, and the mapping is the fact itself.
    """
    try:
        with open(f"{procfs}/{pid}/maps", "rb") as f:
            return any(b"/procwatch/" + SO_NAME.encode() in line for line in f)
    except OSError:
        return None
