"""procwatch: know within a millisecond that a watched process died or hung.

Clients import only this: register a process, beat, watch a peer::

    import procwatch
    reg = procwatch.register_pid("dp-1")        # None when no service runs
    peer = procwatch.Peer("dp-2")
    if not peer.alive: ...

Importing procwatch loads neither pyroute2 nor systemd; the service modules
do that for themselves.
"""

from .client import Peer, Registration, monitor_alive, register_pid
from .errors import (AccessDenied, NameAmbiguous, NameInUse, NameNotFound, ProcwatchError, SegmentCorrupt,
                     SegmentMissing, SegmentPermissionError, TableBusy, TableFull)

__all__ = (
    "register_pid", "Registration", "Peer", "monitor_alive",
    "ProcwatchError", "SegmentMissing", "SegmentPermissionError", "SegmentCorrupt",
    "TableFull", "TableBusy", "NameInUse", "NameNotFound", "NameAmbiguous", "AccessDenied",
)
__version__ = "0.1.0"
