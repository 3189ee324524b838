"""Events and where they go: journald when it is there, stderr lines when not.

Every event procwatch reports is one structured record: a human MESSAGE, a
fixed MESSAGE_ID per event kind (so ``journalctl MESSAGE_ID=...`` and the
catalog in ``systemd/procwatch.catalog`` find it), and PROCWATCH_* fields.
Records go through :mod:`logging`; systemd's ``JournalHandler`` turns the
upper-case keys of ``extra`` into journal fields.  Without journald (a
terminal, a container without it) the same records become one plain line on
stderr, fields appended as ``key=value`` so that scripts can read them.

systemd-python is imported only when journald's socket exists, so the
service runs without it.
"""

import enum as _enum
import logging as _logging
import os as _os
import sys as _sys
import uuid as _uuid

JOURNAL_SOCKET = "/run/systemd/journal/socket"
log = _logging.getLogger("procwatch")


class Event(_enum.Enum):
    """Event kinds: (MESSAGE_ID, logging level).  The ids are ABI for catalogs."""
    STARTED = ("456f4cb65fe14636966c20b216907784", _logging.INFO)
    STOPPING = ("b313fab2d71c4bd2b45e56908170cde3", _logging.INFO)
    REGISTERED = ("dd7056d91812408baba03905cf4715a1", _logging.INFO)
    UNREGISTERED = ("379a197a837347ba81ba66e46b42d1c9", _logging.INFO)
    EXIT = ("970dfe7284c54dd6bc45770e3119a811", _logging.WARNING)
    FOUND_DEAD = ("4aecf31613464d3795aa0b7c3b3380c5", _logging.WARNING)
    HUNG = ("27882e4b0fb34f9f8136dd0bdc16a2e6", _logging.WARNING)
    RECOVERED = ("5ba27575995c4ed287163094f4942e97", _logging.INFO)
    KILLED = ("36c61b1ea6c743148f32315f412235d3", _logging.WARNING)
    OVERFLOW = ("040d298cab92469d93d2340a4101a552", _logging.WARNING)
    RESPAWN = ("e272930ad57c499186540e1d697cf9e3", _logging.DEBUG)
    CORRUPT = ("5e771893c7174500805250005e17cac1", _logging.ERROR)

    @property
    def message_id(self):
        return _uuid.UUID(self.value[0])

    @property
    def level(self):
        return self.value[1]

    @property
    def kind(self):
        return self.name.lower()


def emit(event, message, *args, level=None, **fields):
    """Log one event: ``fields`` are journal field names without the PROCWATCH_ prefix.

    ``emit(Event.EXIT, "%s exited", name, NAME=name, PID=pid)`` gives
    PROCWATCH_NAME and PROCWATCH_PID.  A PID field also sets OBJECT_PID, so
    ``journalctl OBJECT_PID=1234`` finds what happened to that process.
    """
    extra = {"MESSAGE_ID": event.value[0], "PROCWATCH_EVENT": event.kind}
    for k, v in fields.items():
        if v is not None:
            extra["PROCWATCH_" + k] = v
    if fields.get("PID"):
        extra["OBJECT_PID"] = fields["PID"]
    log.log(event.level if level is None else level, message, *args, extra=extra)


class _PlainFormatter(_logging.Formatter):
    """``message  event=exit name=dp-1 pid=42 ...`` for terminals and pipes."""

    def format(self, record):
        line = super().format(record)
        fields = [f"{k[10:].lower()}={v}" for k, v in record.__dict__.items()
                  if k.startswith("PROCWATCH_")]
        if fields:
            line += "  " + " ".join(fields)
        return line


def journald_available():
    return _os.path.exists(JOURNAL_SOCKET)


def setup(target="auto", level=_logging.INFO, stream=None):
    """Route procwatch's records to journald or stderr; returns the target used.

    ``auto`` picks journald when it is reachable and systemd-python is
    installed, else stderr.  Safe to call again (SIGHUP): handlers are replaced.
    """
    chosen = target
    if target == "auto":
        chosen = "journal" if journald_available() else "stderr"
    handler = None
    if chosen == "journal":
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="procwatch")
        except ImportError:
            if target == "journal":
                raise
            chosen = "stderr"
    if handler is None:
        handler = _logging.StreamHandler(stream or _sys.stderr)
        handler.setFormatter(_PlainFormatter("%(asctime)s procwatch[%(process)d]: %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return chosen


def notify(*assignments):
    """sd_notify(3) through systemd-python: ``notify("READY=1", "STATUS=...")``.

    Returns False when not under systemd (NOTIFY_SOCKET unset), so callers
    need no "am I a unit?" branch.
    """
    if not _os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        from systemd import daemon
    except ImportError:
        log.error("NOTIFY_SOCKET is set but systemd-python is not installed: "
                  "systemd will not see READY=1; install procwatch[systemd]")
        return False
    return daemon.notify("\n".join(assignments))
