"""guard.TableGuard's keeping of the header's used_end (issue 16), on real SysV segments.

Every pass over the slots stops at used_end (segment.Table.scan_end), so the
guard must move it over a slot written past it, and lower it when it says
more than the used slots; it reads the EMPTY tail a piece at a time.
"""

import logging
import os

import pytest

import procwatch
from procwatch import abi, guard
from procwatch.segment import Table


@pytest.fixture
def big(key):
    """A table with more EMPTY tail than one look reads, and one registration in slot 0."""
    t, _ = Table.create_or_adopt(key, 2 * guard.TAIL_CHUNK + 1000)
    reg = procwatch.register_pid("first", key=key)
    yield t
    reg.unregister()
    t.remove()


def _plant(t, i):
    t.set64(i, abi.S_START_TIME, procwatch.procfs.start_time(os.getppid()))
    t.write_name(i, b"by-hand")
    t.set32(i, abi.S_STATE, abi.State.ALIVE)
    t.u32[t.pid_index(i)] = os.getppid()


def test_a_slot_far_past_used_end_is_found_a_piece_of_tail_at_a_time(big, caplog):
    t, g = big, guard.TableGuard(big)
    far = t.slot_count - 10
    _plant(t, far)
    assert t.used_end() == 1 and t.scan_end() == 1
    with caplog.at_level(logging.INFO, logger="procwatch"):
        g.check_used_end()                  # slots 1 .. TAIL_CHUNK
        g.check_used_end()                  # the next TAIL_CHUNK
        assert t.used_end() == 1
        g.check_used_end()                  # the rest: found
    assert t.used_end() == far + 1 and t.scan_end() == far + 1
    assert f"used_end said 1, the slots in use end at {far + 1}" in caplog.text
    g.check_used_end()                      # round again: nothing to fix
    assert t.used_end() == far + 1


@pytest.mark.parametrize("written", [5000, 0xFFFFFFFF, 0])
def test_a_wrong_used_end_near_the_slots_is_put_right_at_the_first_look(big, written):
    t, g = big, guard.TableGuard(big)
    t.hset32(abi.H_USED_END, written)
    g.check_used_end()
    assert t.used_end() == 1


def test_a_busy_lock_leaves_used_end_for_the_next_look(big):
    t, g = big, guard.TableGuard(big)
    t.hset32(abi.H_USED_END, 5000)
    assert t.try_lock()
    try:
        g.check_used_end()                  # a client registers: never changed under it
        assert t.used_end() == 5000
    finally:
        t.unlock()
    g.check_used_end()
    assert t.used_end() == 1
