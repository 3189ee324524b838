"""Soak: 10,000 register-and-die cycles while an exit storm runs (root).

Clients come from tests/progs/churn.py, which forks a child per cycle that
registers and exits at once (starting 10,000 interpreters would take
minutes).  The service's RSS, open fds and threads are read from /proc after
a warm-up and again at the end, printed, and bounded:

* RSS may grow by at most RSS_GROWTH_KIB (its only growing structure, the
  latency window, is bounded at 4096 samples);
* open fds and threads may not grow at all once it is idle again.
"""

import collections
import os
import re
import subprocess

from conftest import PY, ROOT, ServiceProcess, require_root, wait_until
from pwrel import Storm, figures, semaphore_value, used_slots

pytestmark = [require_root()]

CYCLES = 10_000
WARMUP = 500
RSS_GROWTH_KIB = 4096


def churn(key, count, prefix):
    out = subprocess.run([PY, str(ROOT / "tests/progs/churn.py"), "--key", hex(key), "--count", str(count),
                          "--parallel", "6", "--prefix", prefix],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert f"registered={count} none=0 errors=0" in out.stdout, out.stdout + out.stderr[-2000:]
    return float(re.search(r"seconds=([\d.]+)", out.stdout).group(1))


def settle(svc, key, before=None):
    """Wait until every slot is ended and the service is idle (fds/threads back down)."""
    wait_until(lambda: not any(s.pid for s in used_slots(key)), 60, "every slot to be ended",
               detail=lambda: svc.log()[-2000:])
    if before:
        wait_until(lambda: (lambda f: f["fds"] <= before["fds"] and f["threads"] <= before["threads"])(
            figures(svc.pid)), 10, "the service to be idle again")
    return figures(svc.pid)


def test_soak_ten_thousand_register_and_die_cycles(key, tmp_path, compiled):
    svc = ServiceProcess(key, tmp_path / "service.log", "--slots", "64").wait_ready()
    storm = Storm(compiled("storm"), "-n", "1000000", "-r", "1000", "-d", "600")
    try:
        churn(key, WARMUP, "warm")
        start = settle(svc, key)
        seconds = churn(key, CYCLES, "soak")
        wait_until(lambda: not any(s.pid for s in used_slots(key)), 60, "every slot to be ended")
        storm_exits = storm.stop()
        end = settle(svc, key, start)
        assert svc.proc.poll() is None
        assert semaphore_value(key) == 1
    finally:
        storm.stop() if storm.exits is None else None
        svc.stop()
    per_name = collections.Counter()
    kinds = collections.Counter()
    for line in open(tmp_path / "service.log", errors="replace"):
        m = re.search(r"  event=(exit|found_dead) name=(soak-\d+) ", line)
        if m:
            per_name[m.group(2)] += 1
            kinds[m.group(1)] += 1
    twice = sum(1 for n in per_name.values() if n > 1)
    print(f"\nSOAK cycles={CYCLES} seconds={seconds:.1f} storm_exits={storm_exits} "
          f"reported={sum(per_name.values())} exit={kinds['exit']} found_dead={kinds['found_dead']} "
          f"twice={twice} false_deaths=0 "
          f"rss_kib={start['rss_kib']}->{end['rss_kib']} fds={start['fds']}->{end['fds']} "
          f"threads={start['threads']}->{end['threads']}")
    assert len(per_name) == CYCLES and twice == 0, (len(per_name), twice)
    assert end["rss_kib"] - start["rss_kib"] <= RSS_GROWTH_KIB, (start, end)
    assert end["fds"] <= start["fds"] and end["threads"] <= start["threads"], (start, end)
