"""procwatch.service's CapabilityBoundingSet= against the kernel (host, root).

Each capability in the unit is there because an operation fails without it;
each operation that needs none works with none.  tests/system/cap_probe.py
does the measuring (setpriv(1) runs it as root with only the given bounding
set); this test keeps the unit and the kernel in agreement.  It runs on the
host because the proc connector only answers in the initial namespaces.
"""

import os

import pytest

from .conftest import REPO
from .cap_probe import OPS, Victims, run_with_caps


def unit_caps():
    text = (REPO / "systemd" / "procwatch.service").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("CapabilityBoundingSet="))
    return line.split("=", 1)[1].split()


@pytest.fixture(scope="module")
def victims():
    with Victims() as v:
        yield v


def probe(victims, caps):
    return run_with_caps(caps, victims.other.pid, victims.nondumpable.pid, victims.zombie.pid)


def test_the_unit_set_allows_every_operation(victims):
    assert sorted(unit_caps()) == ["CAP_KILL", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"]
    r = probe(victims, unit_caps())
    # all but the teardown yield, which is off by default and needs CAP_SYS_NICE added
    assert r == {op: "ok" if not op.startswith("idle_") else "EPERM to idle" for op in OPS}, r


def test_no_capability_is_enough_for_stat_pidfd_open_and_sysv(victims):
    r = probe(victims, [])
    assert (r["stat"], r["pidfd_open"], r["sysv"]) == ("ok", "ok", "ok"), r


def test_cap_kill_is_needed_to_signal_another_user(victims):
    r = probe(victims, [c for c in unit_caps() if c != "CAP_KILL"])
    assert r["pidfd_signal"] == "EPERM", r


def test_cap_sys_ptrace_is_needed_for_maps_and_exit_codes_of_others(victims):
    r = probe(victims, [c for c in unit_caps() if c != "CAP_SYS_PTRACE"] + ["CAP_DAC_READ_SEARCH"])
    assert (r["maps_other"], r["maps_nondumpable"]) == ("EACCES", "EACCES"), r
    assert r["exit_code_other"] == "hidden", r          # a 0 that would read as "exit 0"


def test_cap_sys_nice_is_what_the_teardown_yield_needs(victims):
    r = probe(victims, unit_caps() + ["CAP_SYS_NICE"])
    assert (r["idle_back_other"], r["idle_back_own"]) == ("ok", "ok"), r


def test_connector_needs_cap_net_admin_only_before_linux_6_6(victims):
    r = probe(victims, [c for c in unit_caps() if c != "CAP_NET_ADMIN"])
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release >= (6, 6):
        assert r["connector"] == "ok", r       # bfdfdc2f3b70 "connector/cn_proc: Allow non-root users access"
    else:
        assert r["connector"] != "ok", r
