"""journal.py: the catalog, and the fields of each entry as journald receives them.

The entries are read off a real AF_UNIX datagram socket that stands in for
journald's: a child process, in a mount namespace of its own (the host's
mounts are untouched), sees it at /run/systemd/journal/socket, sets up
procwatch's journal logging and emits events.  So these tests see the exact
datagrams libsystemd sends, in journald's native protocol.  That journald
*stores* them is proved in a container (tests/system/test_systemd.py);
journald missing or stuck is tests/reliability/test_faults.py's.
"""

import os
import re
import select
import socket
import struct
import subprocess

import pytest

from conftest import PY, ROOT, require_root
from procwatch import abi, journal
from procwatch.journal import Event

CATALOG = ROOT / "systemd" / "procwatch.catalog"


def parse_native(data):
    """journald's native protocol -> {field: str} (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            v = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
        fields[k.decode()] = v.decode()
    return fields


# The child: procwatch's journal logging, then the events of the tests below.
CHILD = r"""
import logging, signal, sys
from procwatch import abi, journal
from procwatch.signals import describe_status
from procwatch.journal import Event, emit
assert journal.setup("journal", logging.DEBUG) == "journal"
text, fields = describe_status(signal.SIGKILL)
emit(Event.EXIT, "%s (pid %d) %s", "dp-2", 4242, text, NAME="dp-2", PID=4242, SLOT=3,
     LATENCY_US=85, CAUSE="exited", **fields)
text, fields = describe_status(3 << 8)
emit(Event.EXIT, "x %s", text, NAME="a", PID=7, SLOT=0, LATENCY_US=abi.LATENCY_UNKNOWN, **fields)
emit(Event.RESPAWN, "detector failed:\n%s", "Traceback...\n  line 2", RESPAWNS=1, level=logging.ERROR)
# A hang verdict of a real sleeping process, with the fields the checker sends.
import subprocess, time
from procwatch import verdict
p = subprocess.Popen(["sleep", "30"])
while open(f"/proc/{p.pid}/stat").read().split(") ")[1][0] != "S" or open(f"/proc/{p.pid}/comm").read() != "sleep\n":
    time.sleep(0.01)
before = verdict.sample(p.pid)
time.sleep(0.1)
j = verdict.judge(p.pid, before)
p.kill()
p.wait()
emit(Event.HUNG, "dp-3 (pid %d) is hung: %s", p.pid, j.text, NAME="dp-3", PID=p.pid, SLOT=4, ACTION="kill",
     **j.fields)
journal.log.handlers[0].flush()
"""
MOUNT = ('mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && '
         'mount --bind "$1" /run/systemd/journal && shift && exec "$@"')


@pytest.fixture(scope="module")
def received(tmp_path_factory):
    """The datagrams the child sent, parsed, in order."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace)")
    jdir = tmp_path_factory.mktemp("journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(jdir / "socket"))
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT, "sh",
                            str(jdir), PY, "-c", CHILD], capture_output=True, text=True, timeout=60,
                           cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", r.stderr                 # journald took everything: no fallback
        out = []
        while select.select([sock], [], [], 0)[0]:
            out.append(parse_native(sock.recv(1 << 16)))
        return out
    finally:
        sock.close()


# -- the catalog ---------------------------------------------------------------

def test_every_event_has_a_catalog_entry_with_its_id():
    text = CATALOG.read_text()
    entries = re.findall(r"^-- ([0-9a-f]{32})$", text, re.M)
    table = dict(re.findall(r"^#\s+([a-z_]+)\s+([0-9a-f]{32})$", text, re.M))
    assert entries == [e.message_id.hex for e in Event]            # one each, in enum order
    assert table == {e.kind: e.message_id.hex for e in Event}
    assert len(set(entries)) == len(Event)
    for block in text.split("\n-- ")[1:]:
        head = block.splitlines()
        assert head[1].startswith("Subject: ") and head[2] == "Defined-By: procwatch", head[:3]


# -- fields --------------------------------------------------------------------

@require_root()
def test_an_exit_by_signal_carries_every_field_the_issue_names(received):
    e = received[0]
    assert e["MESSAGE"] == "dp-2 (pid 4242) killed by SIGKILL"
    assert e["MESSAGE_ID"] == Event.EXIT.message_id.hex
    assert e["PRIORITY"] == "4"                                   # warning
    assert e["SYSLOG_IDENTIFIER"] == "procwatch"
    mine = {k: v for k, v in e.items() if k.startswith(("PROCWATCH_", "OBJECT_"))}
    assert mine == {"PROCWATCH_EVENT": "exit", "PROCWATCH_NAME": "dp-2", "PROCWATCH_PID": "4242",
                    "PROCWATCH_SLOT": "3", "PROCWATCH_LATENCY_US": "85", "PROCWATCH_CAUSE": "exited",
                    "PROCWATCH_SIGNAL": "SIGKILL", "PROCWATCH_SIGNAL_NUMBER": "9",
                    "PROCWATCH_CORE_DUMPED": "0", "OBJECT_PID": "4242"}
    # JournalHandler passes every attribute of the record (msg, args, ...):
    # journald would drop those names; they are not even sent.
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in e), sorted(e)


@require_root()
def test_an_exit_code_and_an_unknown_latency(received):
    e = received[1]
    assert e["PROCWATCH_EXIT_CODE"] == "3" and e["OBJECT_PID"] == "7"
    assert "PROCWATCH_SIGNAL" not in e and "PROCWATCH_CORE_DUMPED" not in e
    assert "PROCWATCH_LATENCY_US" not in e            # absent, not 4294967295


@require_root()
def test_multi_line_messages_survive(received):
    e = received[2]
    assert e["MESSAGE"] == "detector failed:\nTraceback...\n  line 2"
    assert e["PRIORITY"] == "3" and e["PROCWATCH_RESPAWNS"] == "1"
    assert "OBJECT_PID" not in e
    assert len(received) == 4


@require_root()
def test_a_hang_carries_its_verdict(received):
    e = received[3]
    assert e["MESSAGE_ID"] == Event.HUNG.message_id.hex and e["PROCWATCH_EVENT"] == "hung"
    assert e["PROCWATCH_VERDICT"] == "blocked" and e["PROCWATCH_STATE"] == "S"
    assert e["PROCWATCH_WCHAN"] and e["PROCWATCH_WCHAN"] in e["MESSAGE"]
    assert int(e["PROCWATCH_WINDOW_MS"]) >= 100 and e["PROCWATCH_CPU_MS"] == "0"


# -- the record's fields, built cheaply (issue 16) -----------------------------------

def _records():
    """Records as the service makes them: emit() with fields, multi-line, plain, an exception, bytes."""
    import logging
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record)
    log = journal.log
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [Keep()]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        journal.emit(Event.EXIT, "%s (pid %d) %s", "dp", 42, "exited with code 0", NAME="dp", PID=42,
                     SLOT=1, LATENCY_US=3, CAUSE="exited", STATUS_SOURCE=None, EXIT_CODE=0)
        journal.emit(Event.REGISTERED, "dp (pid 42) registered", NAME="dp", PID=42, SLOT=1, HEARTBEAT_MS=None)
        journal.emit(Event.RESPAWN, "failed:\n%s", "tb\n  line", RESPAWNS=1, level=logging.ERROR)
        log.info("plain %d", 5)
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("boom")
        log.warning("raw", extra={"PROCWATCH_RAW": b"\xff\x00", "MESSAGE_ID": "abc"})
    finally:
        log.handlers[:], level, log.propagate = saved[0], saved[1], saved[2]
        log.setLevel(level)
    return got


def test_journal_lines_are_journalhandlers_own():
    """record_lines() builds, field for field, what systemd's JournalHandler.emit() sends."""
    pytest.importorskip("systemd.journal")
    h = journal.JournalFallbackHandler(stream=open(os.devnull, "w"), socket_path="/")
    sent = []
    h._sendv = sent.append
    try:
        for record in _records():
            sent.clear()
            h.journal.handle(record)        # python-systemd's own emit() through _send_checked
            assert h.record_lines(record) == sent[0], record.getMessage()
    finally:
        h.close()


def test_a_plain_line_carries_every_field_emit_was_given():
    """The plain line's ready-made key=value part is what a scan of the record's fields gives."""
    f = journal._stream_handler(open(os.devnull, "w")).formatter
    records = _records()
    assert "procwatch_plain" in records[0].__dict__
    for record in records:
        line = f.format(record)
        record.__dict__.pop("procwatch_plain", None)
        assert f.format(record) == line
    assert records[0].getMessage() + "  event=exit name=dp pid=42 slot=1 latency_us=3 cause=exited exit_code=0" \
        in f.format(records[0])


def test_emit_writes_the_plain_formatters_own_line(monkeypatch):
    """With setup()'s stderr line the one handler, emit() writes the line itself (no LogRecord):
    character for character what LogRecord -> _PlainFormatter -> StreamHandler writes."""
    import io
    import logging
    import time as time_mod
    saved = journal.log.handlers[:], journal.log.level

    def run(stream):
        for now in (1764662645.0423, 1764662645.9996, 1764662646.5):
            monkeypatch.setattr(time_mod, "time", lambda now=now: now)
            journal.emit(Event.EXIT, "%s (pid %d) %s; %s", "dp", 42, "killed by SIGKILL", "zeroed 7 µs after",
                         NAME="dp", PID=42, SLOT=1, LATENCY_US=7, CAUSE="exited", STATUS_SOURCE=None, SIGNAL=9)
            journal.emit(Event.REGISTERED, "dp (pid 42) registered, 100% sure", NAME="dp", PID=42, SLOT=1,
                         HEARTBEAT_MS=None)
            journal.emit(Event.RESPAWN, "failed:\n%s", "tb\n  line", RESPAWNS=1, level=logging.ERROR)
            journal.emit(Event.RESPAWN, "not shown at INFO", RESPAWNS=2, level=logging.DEBUG)
            journal.emit(Event.EXIT, "%s gone", "x", NAME="x", LATENCY_US=abi.LATENCY_UNKNOWN)
        monkeypatch.undo()
        return stream.getvalue()
    try:
        own = io.StringIO()
        journal.setup("stderr", logging.INFO, own)

        def no_record(*a, **k):
            raise AssertionError("emit() made a LogRecord although its plain line is the one handler")
        monkeypatch.setattr(journal.log, "makeRecord", no_record)
        fast = run(own)
        via_logging = io.StringIO()
        journal.setup("stderr", logging.INFO, via_logging)
        journal.log.handlers[0].addFilter(lambda record: True)      # any filter: the logging path
        slow = run(via_logging)
    finally:
        journal.log.handlers[:] = saved[0]
        journal.log.setLevel(saved[1])
    assert fast == slow
    assert fast.count(" procwatch[") == 4 * 3 and "not shown" not in fast and "100% sure" in fast
    assert ",042 procwatch[" in fast and ",999 procwatch[" in fast and ",500 procwatch[" in fast


# -- sd_notify helpers -------------------------------------------------------------

def test_watchdog_interval_follows_sd_watchdog_enabled(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert journal.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    assert journal.watchdog_interval() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))      # meant for another process
    assert journal.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert journal.watchdog_interval() == 2.5
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert journal.watchdog_interval() is None


def test_notify_without_notify_socket_is_false(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert journal.notify("READY=1") is False


def test_drops_are_counted_exactly_from_both_threads(tmp_path, monkeypatch):
    """With stderr = journald's stream and journald away, every record is dropped and counted:
    by emit() when the queue is full, by the writer when the send fails; no path loses one.

    (The lock around the counter guards the writer's read-and-reset when journald comes back,
    which spans a send that releases the GIL; CPython's ``+=`` alone did not lose counts here.)"""
    import logging
    import sys
    import threading
    stream = open(tmp_path / "stderr", "w")
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    h = journal.JournalFallbackHandler(stream=stream, socket_path=str(tmp_path / "no-journald"),
                                       queue_size=1)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # switch threads as often as CPython can
    try:
        assert h.stderr_is_journal
        record = logging.LogRecord("procwatch", logging.INFO, __file__, 0, "x", None, None)
        per_thread, threads = 5000, 4

        def spam():
            for _ in range(per_thread):
                h.emit(record)
        ts = [threading.Thread(target=spam) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        h.flush(timeout=30)
        assert h.dropped == per_thread * threads
    finally:
        sys.setswitchinterval(old)
        h.close()
        stream.close()
