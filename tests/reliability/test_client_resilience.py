"""register_pid() against tables it cannot use, and slot reuse that must not lose a death."""

import logging
import os
import subprocess

import procwatch
from procwatch import abi
from procwatch.segment import Table


def test_damaged_header_is_an_error_line_and_none(key, caplog):
    t, _ = Table.create_or_adopt(key, 4)
    try:
        t.buf[0:8] = b"GARBAGE!"
        with caplog.at_level(logging.WARNING, logger="procwatch"):
            assert procwatch.register_pid("client", key=key) is None
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and f"ipcrm -M {key:#010x}" in errors[0], errors
        assert "continuing without it" in errors[0]
    finally:
        t.detach()


def test_register_pid_of_a_process_gone_is_a_value_error(key):
    t, _ = Table.create_or_adopt(key, 4)
    p = subprocess.Popen(["true"])
    p.wait()
    try:
        try:
            procwatch.register_pid("gone", pid=p.pid, key=key)
        except ValueError as e:
            assert f"no process with PID {p.pid}" in str(e)
        else:
            raise AssertionError("registered a PID with no process")
    finally:
        t.detach()


def test_full_table_reuses_a_reported_end_before_an_unreported_death(key):
    """With no empty slot left, a new registration must not take the slot of a
    process that died but whose death the service has not reported yet (the
    service is down): taking it would lose that report for good."""
    t, _ = Table.create_or_adopt(key, 2)
    dead = subprocess.Popen(["sleep", "60"])
    try:
        unreported = procwatch.register_pid("died-unreported", pid=dead.pid, key=key)
        ended = procwatch.register_pid("left-cleanly", key=key)
        ended.unregister()
        dead.kill()
        dead.wait()
        new = procwatch.register_pid("newcomer", key=key)
        assert new.slot == ended.slot != unreported.slot
        s = t.read_slot(unreported.slot)
        assert s.pid == dead.pid and s.state == abi.State.ALIVE and s.name == "died-unreported"
        new.unregister()
    finally:
        dead.kill()
        dead.wait()
        t.detach()


def test_owner_uid_is_the_registering_process(key):
    t, _ = Table.create_or_adopt(key, 2)
    try:
        with procwatch.register_pid("me", key=key) as reg:
            assert t.read_slot(reg.slot).owner_uid == os.getuid()
    finally:
        t.detach()
