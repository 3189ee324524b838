"""``procwatch events``: the service's events, read back from journald.

Entries are selected the way journald indexes them, never by parsing text:
one ``MESSAGE_ID=`` match per event kind (the ids of
:class:`procwatch.journal.Event`; matches on one field are ORed), and
``PROCWATCH_NAME=`` / ``OBJECT_PID=`` matches ANDed to those
(sd_journal_add_match(3)).  Reading goes through ``systemd.journal.Reader``,
so it sees what ``journalctl`` sees: the system journal needs root or the
group ``systemd-journal`` (or ``adm``).

``--json`` prints one object per line (JSON Lines, also with ``--follow``):
``time`` (Unix seconds), ``event``, ``message``, ``priority``,
``message_id``, ``service_pid``, ``object_pid``, then the entry's
PROCWATCH_* fields in lower case without the prefix (``name``, ``pid``,
``slot``, ``exit_code`` or ``signal`` and ``core_dumped``, ``latency_us``,
``cause``...).  Numbers are numbers, ``core_dumped`` is a boolean; a field
the entry does not carry is absent.
"""

import datetime as _datetime
import json as _json
import os as _os
import re as _re
import sys as _sys

from .errors import ProcwatchError
from .journal import Event, journald_available

# PROCWATCH_* fields that hold integers; every other field stays a string
# (a NAME may well look like a number).
INT_FIELDS = frozenset((
    "PID", "SLOT", "EXIT_CODE", "SIGNAL_NUMBER", "LATENCY_US", "HEARTBEAT_MS", "MISSES",
    "SINCE_BEAT_MS", "OVERFLOWS", "RESPAWNS", "EVENTS", "EXITS", "FOUND_DEAD",
    "JOURNAL_DROPPED"))
BOOL_FIELDS = frozenset(("CORE_DUMPED",))
JOURNAL_DIRS = ("/run/log/journal", "/var/log/journal")
_BY_ID = {e.message_id.hex: e for e in Event}

_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}
_RELATIVE = _re.compile(r"^(?:-\s*(\d+(?:\.\d+)?)\s*([a-z]+)|(\d+(?:\.\d+)?)\s*([a-z]+)\s+ago)$")
SINCE_FORMATS = ("'2026-11-26 14:00[:05]', '2026-11-26', 'today', 'yesterday', 'now', "
                 "'10min ago' (or --since=-10min), '@UNIX-SECONDS'")


def parse_since(text, now=None):
    """A --since argument as a local, naive datetime; ValueError if it is none.

    The formats are a subset of journalctl's (systemd.time(7)).
    """
    now = now or _datetime.datetime.now()
    t = text.strip().lower()
    if t == "now":
        return now
    if t in ("today", "yesterday"):
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return day if t == "today" else day - _datetime.timedelta(days=1)
    if t.startswith("@"):
        try:
            return _datetime.datetime.fromtimestamp(float(t[1:]))
        except (ValueError, OverflowError, OSError):
            pass
    m = _RELATIVE.match(t)
    if m:
        amount, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if unit in _UNITS:
            return now - _datetime.timedelta(seconds=float(amount) * _UNITS[unit])
    try:
        when = _datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use {SINCE_FORMATS}") from None
    if when.tzinfo is not None:                 # Reader seeks by local wall time
        when = when.astimezone().replace(tzinfo=None)
    return when




def add_parser(sub):
    """The ``events`` subcommand (cli.build_parser calls this)."""
    from . import argtypes as _argtypes
    kinds = [e.kind for e in Event]
    p = sub.add_parser(
        "events", formatter_class=_argtypes.FORMATTER, help="show the service's events from journald",
        description="Show procwatch's events (registered, exit, found_dead, hung, killed, ...)\n"
                    "from journald, selected by MESSAGE_ID and PROCWATCH_* fields.\n"
                    "The system journal needs root or the group systemd-journal.",
        epilog="examples:\n"
               "  procwatch events --name dp-2 --since today\n"
               "  procwatch events --follow --json --event exit --event found_dead\n"
               "  journalctl -x OBJECT_PID=1234      (the same entries, with the catalog text)\n\n"
               "--json prints one object per line: time (Unix seconds), event, message,\n"
               "priority, message_id, service_pid, object_pid, then the PROCWATCH_* fields in\n"
               "lower case (name, pid, slot, exit_code | signal + core_dumped, latency_us, ...).\n\n"
               "exit status:\n  0 success (also when nothing matched), 1 the journal cannot be read")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new events as they arrive (Ctrl-C ends); without --since, "
                        "only new ones")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="only events of this registered name (repeatable)")
    p.add_argument("--pid", action="append", type=int, metavar="PID",
                   help="only events about this process (OBJECT_PID; repeatable)")
    p.add_argument("--event", action="append", choices=kinds, metavar="KIND",
                   help=f"only this kind (repeatable): {', '.join(kinds)}")
    p.add_argument("--since", type=_argtypes.checked(parse_since), metavar="TIME",
                   help=f"only events at or after TIME: {SINCE_FORMATS}")
    p.add_argument("--json", action="store_true", help="one JSON object per line (stable schema)")
    p.add_argument("-D", "--directory", metavar="DIR",
                   help="read the journal files in DIR (e.g. a container's /run/log/journal)")
    p.set_defaults(run=run)
    return p


def open_reader(kinds=None, names=None, pids=None, since=None, directory=None, follow=False):
    """A positioned ``systemd.journal.Reader`` over procwatch's events."""
    try:
        from systemd import journal
    except ImportError:
        raise ProcwatchError("reading events needs systemd-python, which is not installed: "
                             "pip install 'procwatch[systemd]' (it builds against libsystemd-dev "
                             "with pkg-config and a C compiler)") from None
    converters = {"__REALTIME_TIMESTAMP": int}          # keep µs, no naive datetime
    try:
        reader = journal.Reader(path=directory, converters=converters) if directory \
            else journal.Reader(converters=converters)
    except OSError as e:
        raise ProcwatchError(f"cannot open the journal{' in ' + directory if directory else ''}: "
                             f"{e.strerror}") from None
    for event in kinds or Event:
        reader.add_match(MESSAGE_ID=event.message_id.hex)
    for name in names or ():
        reader.add_match(PROCWATCH_NAME=name)
    for pid in pids or ():
        reader.add_match(OBJECT_PID=str(pid))
    if since is not None:
        reader.seek_realtime(since)
    elif follow:
        reader.seek_tail()
        reader.get_previous()               # park on the last entry: print only newer ones
    return reader


def to_json(entry):
    """The --json object of one Reader entry (see the module docstring)."""
    mid = entry.get("MESSAGE_ID")
    mid = getattr(mid, "hex", mid)
    kind = _BY_ID.get(mid)
    out = {
        "time": entry["__REALTIME_TIMESTAMP"] / 1e6 if "__REALTIME_TIMESTAMP" in entry else None,
        "event": entry.get("PROCWATCH_EVENT") or (kind.kind if kind else None),
        "message": entry.get("MESSAGE"),
        "priority": entry.get("PRIORITY"),
        "message_id": mid,
        "service_pid": entry.get("_PID"),
        "object_pid": _int(entry.get("OBJECT_PID")),
    }
    for key, value in entry.items():
        if not key.startswith("PROCWATCH_") or key == "PROCWATCH_EVENT":
            continue
        field = key[10:]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if field in INT_FIELDS:
            value = _int(value)
        elif field in BOOL_FIELDS:
            value = value not in ("0", "", "false")
        out[field.lower()] = value
    return out


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def format_line(entry):
    """``2026-11-26 14:00:05.123  exit        dp-2 (pid 42) killed by SIGKILL; ...``"""
    ts = entry.get("__REALTIME_TIMESTAMP")
    when = _datetime.datetime.fromtimestamp(ts / 1e6).isoformat(" ", "milliseconds") if ts else "-"
    kind = entry.get("PROCWATCH_EVENT") or "?"
    message = entry.get("MESSAGE", "")
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{when}  {kind:<12} {message}"


def _can_read_system_journal():
    if _os.geteuid() == 0:
        return True
    import grp
    mine = set(_os.getgroups())
    for group in ("systemd-journal", "adm", "wheel"):     # journalctl's hint names these
        try:
            if grp.getgrnam(group).gr_gid in mine:
                return True
        except KeyError:
            pass
    return False


def run(args, out=None):
    out = out or _sys.stdout
    if args.directory is None and not any(_os.path.isdir(d) for d in JOURNAL_DIRS):
        raise ProcwatchError("no journal on this machine (neither /run/log/journal nor "
                             "/var/log/journal): without journald the service writes its events "
                             "to stderr; see 'procwatch status' for the table")
    kinds = [Event[k.upper()] for k in args.event] if args.event else None
    reader = open_reader(kinds, args.name, args.pid, args.since, args.directory, args.follow)
    shown = 0
    try:
        with reader:
            while True:
                for entry in reader:
                    out.write((_json.dumps(to_json(entry)) if args.json else format_line(entry)) + "\n")
                    shown += 1
                out.flush()
                if not args.follow:
                    break
                reader.wait(1.0)            # a bounded wait: Ctrl-C is seen within a second
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:                 # `procwatch events | head -1`
        _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), out.fileno())
    if not shown and not args.json and not args.follow:
        hint = ""
        if args.directory is None and not journald_available():
            hint = ": journald is not running here (the service then logs to stderr)"
        elif args.directory is None and not _can_read_system_journal():
            hint = ": the system journal needs root or the group systemd-journal"
        print(f"-- no procwatch events{hint} --", file=_sys.stderr)
    return 0
