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

journald can stop being reachable while the service runs, and logging must
never stop detection: :class:`JournalFallbackHandler` sends to journald from
a writer thread and puts a record on stderr whenever journald cannot take it.
"""

import enum as _enum
import logging as _logging
import os as _os
import queue as _queue
import re as _re
import sys as _sys
import threading as _threading
import time as _time
import uuid as _uuid

from . import abi as _abi

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


# Per event kind: (MESSAGE_ID, level, kind), read once (an Enum's .value is a property call).
_HEADS = {e: (e.value[0], e.value[1], e.kind) for e in Event}
# The journal field and the plain line's key of each emit() field name, made once per name.
_NAMES = {}


def _names(k):
    names = _NAMES.get(k)
    if names is None:
        names = _NAMES[k] = ("PROCWATCH_" + k, k.lower())
    return names


def emit(event, message, *args, level=None, **fields):
    """Log one event: ``fields`` are journal field names without the PROCWATCH_ prefix.

    ``emit(Event.EXIT, "%s exited", name, NAME=name, PID=pid)`` gives
    PROCWATCH_NAME and PROCWATCH_PID.  A PID field also sets OBJECT_PID, so
    ``journalctl OBJECT_PID=1234`` finds what happened to that process.

    Two of these follow every registered exit (REGISTERED, EXIT), so the
    record carries its plain line's ``(key, value)`` pairs ready made
    (``procwatch_plain``: lower case, so never a journal field), and the
    field names are made once per name, not once per line (issue 16).
    """
    message_id, default_level, kind = _HEADS[event]
    extra = {"MESSAGE_ID": message_id, "PROCWATCH_EVENT": kind}
    plain = [("event", kind)]
    for k, v in fields.items():
        if v is None or (k == "LATENCY_US" and v == _abi.LATENCY_UNKNOWN):
            continue                # absent, not a magic number (the pidfd backend has no timestamp)
        field, key = _names(k)
        extra[field] = v
        plain.append((key, v))
    if fields.get("PID"):
        extra["OBJECT_PID"] = fields["PID"]
    extra["procwatch_plain"] = plain
    level = default_level if level is None else level
    h = _plain_only
    if h is not None and h.stream is not None and log.handlers == [h] and not log.filters and not log.disabled \
            and not h.filters and level >= h.level and log.isEnabledFor(level) \
            and not (len(args) == 1 and isinstance(args[0], dict)):
        # The one handler is our plain stderr line: write it here, the same line the
        # LogRecord -> Formatter -> StreamHandler path makes (tests/test_journal.py),
        # without the ~30-attribute record, the caller's frame walk and three calls
        # deep of logging (issue 16: on this VM, after each sleep, that path ran ~200 µs
        # cold, twice a cycle; this ~90).  A write that fails is left to the logging
        # path, which reports it (handleError).
        now = _time.time()
        line = _plain_line(now, message % args if args else message, plain)
        with h.lock:
            try:
                h.stream.write(line)
                h.flush()
                return
            except RecursionError:
                raise
            except Exception:
                pass
    log.log(level, message, *args, extra=extra)


# The handler setup() installed when it is the plain stderr line (None: journald, or none yet).
_plain_only = None
_second = [None, ""]     # [int(time), its "%Y-%m-%d %H:%M:%S"]: strftime once a second


def _plain_line(now, message, plain):
    """The plain handler's line (with its newline) for a record made at ``now`` (time.time()).

    What ``_PlainFormatter("%(asctime)s procwatch[%(process)d]: %(message)s")``
    makes of the record: logging.Formatter.formatTime's default_time_format and
    default_msec_format, with LogRecord's msecs.
    """
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached[1] = _time.strftime(_logging.Formatter.default_time_format, _time.localtime(now))
        cached[0] = sec
    line = f"{cached[1]},{int((now - sec) * 1000):03d} procwatch[{_os.getpid()}]: {message}"
    if plain:
        line += "  " + " ".join([f"{k}={v}" for k, v in plain])
    return line + "\n"


class _PlainFormatter(_logging.Formatter):
    """``message  event=exit name=dp-1 pid=42 ...`` for terminals and pipes."""

    def format(self, record):
        line = super().format(record)
        fields = record.__dict__.get("procwatch_plain")
        if fields is None:                  # a record emit() did not make
            fields = [(k[10:].lower(), v) for k, v in record.__dict__.items() if k.startswith("PROCWATCH_")]
        if fields:
            line += "  " + " ".join([f"{k}={v}" for k, v in fields])
        return line


def journald_available():
    return _os.path.exists(JOURNAL_SOCKET)


def _sd_journal_sendv():
    """sd_journal_sendv(3) of libsystemd, called through ctypes (which drops the GIL)."""
    import ctypes

    class iovec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_char_p), ("iov_len", ctypes.c_size_t)]

    try:
        lib = ctypes.CDLL("libsystemd.so.0", use_errno=True)
    except OSError as e:
        raise ImportError(f"libsystemd.so.0: {e}") from None
    fn = lib.sd_journal_sendv
    fn.argtypes = (ctypes.POINTER(iovec), ctypes.c_int)

    def sendv(lines):
        raw = [x.encode("utf-8", "surrogateescape") if isinstance(x, str) else x for x in lines]
        r = fn((iovec * len(raw))(*[(b, len(b)) for b in raw]), len(raw))
        if r < 0:
            raise OSError(-r, _os.strerror(-r))
    return sendv


def _is_journal_stream(stream):
    """Whether ``stream`` is systemd's journal stream ($JOURNAL_STREAM = "dev:inode", systemd.exec(5))."""
    try:
        dev, ino = (int(x) for x in _os.environ["JOURNAL_STREAM"].split(":"))
        st = _os.fstat(stream.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _stream_handler(stream=None):
    handler = _logging.StreamHandler(stream or _sys.stderr)
    handler.setFormatter(_PlainFormatter("%(asctime)s procwatch[%(process)d]: %(message)s"))
    return handler


# journald's rule for a field a client may set (journal_field_valid()): upper
# case, digits and '_', not starting with a digit or '_', at most 64 bytes.
_FIELD_NAME = _re.compile(r"[A-Z][A-Z0-9_]{0,63}\Z")


class JournalFallbackHandler(_logging.Handler):
    """journald when it takes the record; one plain stderr line when it cannot.

    journald is unreachable in three ways, and each one is seen here:

    * its socket is gone (journald stopped; a container without it):
      sd_journal_sendv() then returns 0 and drops the record *silently*
      (journal-send.c: "Fail silently if the journal is not available"), so
      the socket's existence is checked before each send;
    * the socket exists but nobody listens: ECONNREFUSED from the send;
    * journald lives but does not read: its datagram queue fills and
      sendmsg() blocks.  The thread that logs an exit is the detector, so
      records reach journald through a bounded queue and a writer thread;
      when the queue is full, the record goes to stderr instead.  And the
      writer calls libsystemd's sd_journal_sendv() through ctypes, which
      lets go of the GIL: python-systemd's ``journal.sendv()`` keeps it
      while sendmsg() blocks, and a stuck journald then froze every thread
      of the service, the detector included (systemd-python 235).

    The switch to stderr and the way back are each said once, on stderr.
    Under systemd, stderr is often journald too ($JOURNAL_STREAM names it):
    writing there would block just the same, so records that journald
    cannot take are then dropped and counted, and the count is sent to the
    journal once it reads again.  Records still queued when the process is
    SIGKILLed are lost.
    """

    QUEUE_SIZE = 1024

    def __init__(self, stream=None, socket_path=JOURNAL_SOCKET, queue_size=QUEUE_SIZE):
        super().__init__()
        from systemd import journal          # ImportError: the caller decides
        self._sendv = _sd_journal_sendv()
        self.journal = journal.JournalHandler(SYSLOG_IDENTIFIER="procwatch",
                                              sender_function=self._send_checked)
        self.journal.handleError = self._journal_failed
        self.fallback = _stream_handler(stream)
        self.stderr_is_journal = _is_journal_stream(self.fallback.stream)
        self.dropped = 0
        self._valid_names = {}               # field name -> whether journald takes it (_FIELD_NAME)
        self.socket_path = socket_path
        self.queue_size = queue_size
        self._queue = _queue.Queue(queue_size)
        self._down = None                    # why journald is unreachable, or None
        self._down_lock = _threading.Lock()   # also guards ``dropped``: emit() and the writer both count
        self._writer = _threading.Thread(target=self._write_loop, name="procwatch-journal", daemon=True)
        self._writer.start()

    def emit(self, record):
        try:
            self._queue.put_nowait(record)
        except _queue.Full:
            self._fall_back(record, f"journald has not taken the last {self.queue_size} records")

    def _write_loop(self):
        while True:
            record = self._queue.get()
            try:
                if record is None:
                    return
                try:
                    lines = self.record_lines(record)
                    self._deliver(lines)
                except Exception:
                    self._journal_failed(record)
            finally:
                self._queue.task_done()

    def record_lines(self, record):
        """The journal fields of ``record``: exactly those of systemd's JournalHandler.emit().

        That emit() copies the record's ~30 attributes into a dict, passes them
        all as keyword arguments, and the sender then sorts out the ~20 that are
        not journal fields; with two records after every exit (issue 16) this
        builds the same lines from the record in one pass, each field name
        checked once per name.  tests/test_journal.py holds the two to the same
        lines.
        """
        j = self.journal
        lines = ["MESSAGE=" + j.format(record)]
        d = record.__dict__
        message_id = d.get("MESSAGE_ID")
        if message_id is not None:
            lines.append("MESSAGE_ID=" + getattr(message_id, "hex", message_id))
        lines += (f"PRIORITY={j.map_priority(record.levelno)}", f"LOGGER={record.name}",
                  f"THREAD_NAME={record.threadName}", f"PROCESS_NAME={record.processName}",
                  f"CODE_FILE={record.pathname}", f"CODE_LINE={record.lineno}", f"CODE_FUNC={record.funcName}")
        extras = dict(j._extra)
        if record.exc_text:
            extras["EXCEPTION_TEXT"] = record.exc_text
        if record.exc_info:
            extras["EXCEPTION_INFO"] = record.exc_info
        if record.args:
            extras["CODE_ARGS"] = str(record.args)
        extras.update(d)
        self._add_fields(lines, extras)
        return lines

    def _add_fields(self, lines, fields):
        valid = self._valid_names
        for k, v in fields.items():
            # JournalHandler passes every attribute of the record (msg, args,
            # levelname...): journald drops those names, so do not fill its queue with them.
            # The answer is kept per name: the same few dozen names, record after record.
            ok = valid.get(k)
            if ok is None:
                ok = valid[k] = _FIELD_NAME.match(k) is not None and k != "MESSAGE_ID"
            if ok and v is not None:
                lines.append(k.encode() + b"=" + v if isinstance(v, bytes) else f"{k}={v}")

    def _send_checked(self, MESSAGE, MESSAGE_ID=None, **fields):   # noqa: N803 - journal field names
        """What systemd.journal.send() does, through sd_journal_sendv() without the GIL."""
        lines = ["MESSAGE=" + MESSAGE]
        if MESSAGE_ID is not None:
            lines.append("MESSAGE_ID=" + getattr(MESSAGE_ID, "hex", MESSAGE_ID))
        self._add_fields(lines, fields)
        self._deliver(lines)

    def _deliver(self, lines):
        if not _os.path.exists(self.socket_path):
            raise FileNotFoundError(f"{self.socket_path} does not exist")
        self._sendv(lines)
        if self._down is not None and self._queue.qsize() < self.queue_size // 2:
            with self._down_lock:
                was, self._down = self._down, None
            if was is not None:
                self._notice(_logging.INFO, "journald is reachable again; events go to the journal")
                with self._down_lock:
                    dropped, self.dropped = self.dropped, 0
                if dropped:
                    self._sendv([f"MESSAGE=journald did not take {dropped} procwatch records "
                                 f"while it was unreachable ({was}); they were dropped",
                                 "PRIORITY=4", "SYSLOG_IDENTIFIER=procwatch"])

    def _journal_failed(self, record):
        err = _sys.exc_info()[1]
        self._fall_back(record, f"{type(err).__name__}: {err}" if err else "send failed")

    def _fall_back(self, record, why):
        if self._down is None:
            with self._down_lock:
                first, self._down = self._down is None, why
            if first:
                self._notice(_logging.WARNING, f"journald is unreachable ({why}); "
                             "events go to stderr until it is back")
        if self.stderr_is_journal:
            with self._down_lock:
                self.dropped += 1
            return
        self.fallback.handle(record)

    def _notice(self, level, message):
        if self.stderr_is_journal:
            return
        self.fallback.handle(_logging.LogRecord("procwatch", level, __file__, 0, message, None, None))

    def flush(self, timeout=2.0):
        """Wait (bounded) until the writer has handed every queued record on."""
        done = _threading.Event()
        waiter = _threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        waiter.start()
        done.wait(timeout)
        self.fallback.flush()

    def close(self):
        try:
            self._queue.put(None, timeout=1.0)
        except _queue.Full:
            pass
        self._writer.join(2.0)
        self.fallback.flush()
        super().close()


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
            handler = JournalFallbackHandler(stream)
        except ImportError:
            if target == "journal":
                from .errors import ProcwatchError
                raise ProcwatchError("--log journal needs systemd-python and libsystemd, which are "
                                     "not installed: pip install 'procwatch[systemd]', or use --log stderr") from None
            chosen = "stderr"
    global _plain_only
    _plain_only = None
    if handler is None:
        handler = _stream_handler(stream)
        _plain_only = handler
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
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


def watchdog_interval():
    """Seconds between WATCHDOG=1 pings systemd expects, or None (no watchdog).

    sd_watchdog_enabled(3): WATCHDOG_USEC is the limit; WATCHDOG_PID, when
    set, must be ours (a child must not ping for us).  Ping at half the limit.
    """
    try:
        usec = int(_os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(_os.environ.get("WATCHDOG_PID", "0"))
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != _os.getpid()):
        return None
    return usec / 2e6
