"""``procwatch events``: argument parsing and output shapes.

Reading a real journal needs a running journald, which this host does not
have: tests/system/test_systemd.py reads real entries back in a container.
Here the shapes: --since, the --json object of an entry as
systemd.journal.Reader returns it, and the refusals.
"""

import datetime
import json
import subprocess
import uuid

import pytest

from conftest import PY, ROOT
from procwatch.events import format_line, parse_since, to_json
from procwatch.journal import Event

NOW = datetime.datetime(2026, 11, 26, 14, 30, 0)


@pytest.mark.parametrize("text, want", [
    ("now", NOW),
    ("today", datetime.datetime(2026, 11, 26)),
    ("yesterday", datetime.datetime(2026, 11, 25)),
    ("-10min", NOW - datetime.timedelta(minutes=10)),
    ("- 2 h", NOW - datetime.timedelta(hours=2)),
    ("90s ago", NOW - datetime.timedelta(seconds=90)),
    ("1.5 days ago", NOW - datetime.timedelta(hours=36)),
    ("2026-11-26 14:00", datetime.datetime(2026, 11, 26, 14, 0)),
    ("2026-11-26T14:00:05", datetime.datetime(2026, 11, 26, 14, 0, 5)),
    ("2026-11-26", datetime.datetime(2026, 11, 26)),
])
def test_since_formats(text, want):
    assert parse_since(text, now=NOW) == want


def test_since_with_a_zone_and_epoch_seconds_are_local_wall_time():
    when = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
    assert parse_since("2026-11-26T12:00:00+00:00") == when.astimezone().replace(tzinfo=None)
    assert parse_since(f"@{when.timestamp():.0f}") == when.astimezone().replace(tzinfo=None)


@pytest.mark.parametrize("bad", ["soon", "-10 parsecs", "2026-13-01", "@x", ""])
def test_bad_since_is_one_line_saying_what_works(bad):
    with pytest.raises(ValueError) as e:
        parse_since(bad, now=NOW)
    assert "is not a time: use" in str(e.value) and "10min ago" in str(e.value)


def entry(**fields):
    """An entry as systemd.journal.Reader gives it (with procwatch's converters)."""
    base = {"__REALTIME_TIMESTAMP": 1795701797554321, "MESSAGE_ID": uuid.UUID(Event.EXIT.value[0]),
            "PRIORITY": 4, "_PID": 311, "OBJECT_PID": "4242", "MESSAGE": "dp-2 (pid 4242) killed by SIGKILL",
            "PROCWATCH_EVENT": "exit", "PROCWATCH_NAME": "dp-2", "PROCWATCH_PID": "4242",
            "PROCWATCH_SLOT": "0", "PROCWATCH_SIGNAL": "SIGKILL", "PROCWATCH_SIGNAL_NUMBER": "9",
            "PROCWATCH_CORE_DUMPED": "0", "PROCWATCH_CAUSE": "exited", "_SYSTEMD_UNIT": "procwatch.service"}
    base.update(fields)
    return base


def test_json_object_of_an_exit():
    got = to_json(entry())
    assert got == {"time": 1795701797.554321, "event": "exit", "message": "dp-2 (pid 4242) killed by SIGKILL",
                   "priority": 4, "message_id": Event.EXIT.message_id.hex, "service_pid": 311,
                   "object_pid": 4242, "name": "dp-2", "pid": 4242, "slot": 0, "signal": "SIGKILL",
                   "signal_number": 9, "core_dumped": False, "cause": "exited"}
    json.dumps(got)                                          # serialisable as it is


def test_json_keeps_names_that_look_like_numbers_as_strings():
    got = to_json(entry(PROCWATCH_NAME="123", PROCWATCH_CORE_DUMPED="1", PROCWATCH_EXIT_CODE="3"))
    assert got["name"] == "123" and got["core_dumped"] is True and got["exit_code"] == 3


def test_json_survives_odd_values():
    """Names come from the segment: bytes that are not UTF-8, odd numbers."""
    got = to_json(entry(PROCWATCH_NAME=b"\xff\xfe", PROCWATCH_PID="not-a-pid", OBJECT_PID=None))
    assert got["name"] == "\ufffd\ufffd" and got["pid"] == "not-a-pid"
    json.dumps(got)


def test_human_line():
    line = format_line(entry())
    stamp = datetime.datetime.fromtimestamp(1795701797.554321).isoformat(" ", "milliseconds")
    assert line == f"{stamp}  exit         dp-2 (pid 4242) killed by SIGKILL"


def test_cli_refuses_a_bad_since_and_a_bad_kind_as_usage_errors():
    for args in (["--since", "soon"], ["--event", "died"]):
        r = subprocess.run([PY, "-m", "procwatch", "events", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=30)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.splitlines()[-1].startswith("procwatch events: error: argument"), r.stderr


def test_cli_reads_a_directory_without_journal_files(tmp_path):
    r = subprocess.run([PY, "-m", "procwatch", "events", "-D", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
