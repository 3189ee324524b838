"""watch.py's rules for ending a slot, on a real table and real processes.

The end-to-end cases (a real service, its detector and its reconcile) are in
test_detector.py; here the two clocks the rules compare are set by the test:
the moment a slot without a pidfd was found gone, and the moment the
detector last found its event socket empty.
"""

import os
import select
import subprocess

import pytest

from conftest import read_slot, require_root, start_time, wait_until
from procwatch import abi, watch
from procwatch.segment import Table
from procwatch.stats import Stats

pytestmark = [require_root()]


def test_without_a_pidfd_only_an_exit_stamped_before_it_was_found_gone_is_its_own():
    """The rule both steps apply (the C step's is tested end to end in test_detector)."""
    w = watch.Watched(0, os.getpid(), 1, "gone", None)
    assert w.accepts_exit(w.gone_ns - 1000) and w.accepts_exit(w.gone_ns)
    assert not w.accepts_exit(w.gone_ns + 1)


def test_found_dead_waits_until_the_detector_has_read_its_backlog(key, monkeypatch):
    """A slot seen gone is not found dead while its exit event may still sit unread in the
    connector's socket (a burst of exits on a loaded machine), however long the grace was."""
    monkeypatch.setattr(watch, "FOUND_DEAD_GRACE", 0.0)
    table, _ = Table.create_or_adopt(key, 4)
    child = subprocess.Popen(["sleep", "60"])
    reporter = None
    try:
        with table.lock():
            table.claim(0)
            table.publish(0, child.pid, start_time(child.pid), b"late")
        reporter = watch.Reporter(table, Stats())
        reporter.watch.sync(force=True)
        pidfd = os.pidfd_open(child.pid)
        try:
            child.kill()                                    # a zombie: gone, not reaped
            wait_until(lambda: select.select([pidfd], [], [], 0)[0], 10, "the child to exit")
        finally:
            os.close(pidfd)
        socket_empty_at = [0.0]                             # the detector has not caught up
        reporter.events_drained = lambda: socket_empty_at[0]
        assert reporter.reconcile() == 0                    # seen gone from now on
        assert reporter.reconcile() == 0
        assert read_slot(key, 0).pid == child.pid
        socket_empty_at[0] = float("inf")                   # it read everything since
        assert reporter.reconcile() == 1
        s = read_slot(key, 0)
        assert s.pid == 0 and s.state == abi.State.FOUND_DEAD
    finally:
        child.kill()
        child.wait()
        if reporter is not None:
            reporter.watch.close()
        table.remove()


def test_a_detector_that_never_catches_up_does_not_hold_a_death_forever(key, monkeypatch):
    monkeypatch.setattr(watch, "FOUND_DEAD_GRACE", 0.0)
    monkeypatch.setattr(watch, "FOUND_DEAD_LATEST", 0.0)
    table, _ = Table.create_or_adopt(key, 4)
    child = subprocess.Popen(["true"])
    start = start_time(child.pid)
    reporter = None
    try:
        with table.lock():
            table.claim(0)
            table.publish(0, child.pid, start, b"stuck")
        child.wait()                                        # reaped: adopted without a pidfd
        reporter = watch.Reporter(table, Stats())
        reporter.events_drained = lambda: 0.0
        reporter.watch.sync(force=True)
        assert reporter.reconcile() == 1
        assert read_slot(key, 0).state == abi.State.FOUND_DEAD
    finally:
        if reporter is not None:
            reporter.watch.close()
        table.remove()


def test_a_name_held_twice_is_told_once_and_again_after_it_was_single(key, monkeypatch):
    """Two live slots with one name (one written by hand) are told once, not at every later
    registration; once one of them ended, the name written twice again is told again.  A
    registration looks up its own name only, never every watched entry (issue 16)."""
    table, _ = Table.create_or_adopt(key, 8)
    kids = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    reporter = watch.Reporter(table, Stats())
    stats = reporter.stats

    def plant(i, kid, name):
        with table.lock():
            table.claim(i)
            table.publish(i, kid.pid, start_time(kid.pid), name)
        reporter.watch.sync()
    try:
        plant(0, kids[0], b"twin")
        plant(1, kids[1], b"twin")
        assert stats.corrupt == 1
        with monkeypatch.context() as m:
            m.setattr(reporter.watch, "entries", lambda: pytest.fail("a sync walked every watched entry"))
            plant(2, kids[2], b"other")
        assert stats.corrupt == 1                   # told once
        w = reporter.watch.lookup(1, kids[1].pid)
        assert table.clear_pid(1, w.pid)            # one twin ends
        reporter.watch.forget(w)
        plant(3, kids[3], b"other-2")
        assert stats.corrupt == 1
        plant(1, kids[1], b"twin")                  # written twice again
        assert stats.corrupt == 2
    finally:
        reporter.watch.close()
        table.remove()
        for k in kids:
            k.kill()
            k.wait()
