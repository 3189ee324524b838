"""Chaos: the service SIGKILLed at random moments of an exit storm while clients
register, live and die, some of them while it is down (root).

After every restart: each death reported exactly once (an exit or found_dead
line of the service's log, by name and PID), no live client ever reported,
no slot left holding a dead PID or a half-made claim, the semaphore free.
"Exactly once" counts a line marked possible_repeat=1 (a restarted service
reporting an end the killed one was logging: guard.recover_pending_ends)
only when no unmarked line reported that end; unmarked lines never repeat.

The moments are random (seeded: PROCWATCH_CHAOS_SEED=N repeats a run,
PROCWATCH_CHAOS_ROUNDS=N runs longer); the random pauses are the chaos
itself, never a synchronisation: every check polls for its condition with a
deadline.
"""

import collections
import itertools
import os
import random
import signal
import time

from conftest import ServiceProcess, require_root, wait_until
from procwatch import abi
from pwrel import Storm, forked, semaphore_value, used_slots  # noqa: F401 - forked is a fixture
from pwrel import attached as attached_table

pytestmark = [require_root()]

ROUNDS = int(os.environ.get("PROCWATCH_CHAOS_ROUNDS", "20"))
MAX_LIVE = 12
SEED = int(os.environ.get("PROCWATCH_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 30)


class Reports:
    """The exit/found_dead lines of the log: unmarked ones, and possible repeats."""

    def __init__(self, svc):
        self.firm, self.maybe = collections.Counter(), collections.Counter()
        for e in svc.events():
            if e.get("event") in ("exit", "found_dead") and "pid" in e:
                key = (e.get("name"), int(e["pid"]))
                (self.maybe if e.get("possible_repeat") == "1" else self.firm)[key] += 1

    def __getitem__(self, death):
        """How many times ``death`` was reported, marked repeats deduplicated."""
        name, pid = death
        return self.firm[death] or min(1, self.maybe[death] + self.maybe[(None, pid)])

    def keys(self):
        return set(self.firm) | set(self.maybe)


def reports(svc):
    return Reports(svc)


def test_chaos_service_killed_during_exit_storm(key, tmp_path, compiled, forked):  # noqa: F811
    rng = random.Random(SEED)
    storm_exe = compiled("storm")
    log = tmp_path / "service.log"
    tag = f"seed {SEED} (rerun with PROCWATCH_CHAOS_SEED={SEED})"

    def start():
        # Pinned to the connector: this is about its socket in a storm (auto would
        # fall back to pidfd if the storm drowned the acknowledgement).
        s = ServiceProcess(key, log, "--backend", "connector", "--slots", "64",
                           "--reconcile-interval", "0.2").wait_ready()
        assert s.backend() == "connector", f"{tag}\n{s.log()[-2000:]}"
        return s

    svc = start()
    live = {}                     # name -> Forked
    dead = {}                     # (name, pid) -> "up" or "down": the service's state at the death
    racy = {}                     # name -> pid: killed at a random point of register_pid()
    serial = itertools.count()
    storm_exits = 0
    try:
        for rnd in range(ROUNDS):
            storm = Storm(storm_exe, "-n", "5000", "-r", "6000", "-d", "0.6")
            ops = ["register"] * 3 + ["kill"] * 2 + ["exit", "racy", "service"]
            rng.shuffle(ops)
            ops += ["kill", "register"]          # at least these two happen while it is down
            up = True
            for op in ops:
                if op == "register" and len(live) >= MAX_LIVE:
                    op = "kill"
                if op in ("kill", "exit") and not live:
                    op = "register"
                if op == "register":
                    name = f"c{rnd}-{next(serial)}"
                    live[name] = forked(key, name)
                elif op in ("kill", "exit"):
                    name = rng.choice(sorted(live))
                    c = live.pop(name)
                    c.kill() if op == "kill" else c.exit(rng.randrange(1, 100))
                    dead[(name, c.pid)] = "up" if up else "down"
                elif op == "racy":
                    name = f"c{rnd}-{next(serial)}"
                    c = forked(key, name, wait=False)
                    time.sleep(rng.uniform(0, 0.004))
                    c.kill()
                    racy[name] = c.pid
                elif op == "service":
                    svc.stop(signal.SIGKILL)
                    up = False
                time.sleep(rng.uniform(0, 0.03))
            svc = start()
            storm_exits += storm.finish()

            def settled():
                got = reports(svc)
                if any(got[d] == 0 for d in dead):
                    return False
                return not any((s.pid or s.state == abi.State.CLAIMING) and s.name in racy
                               for s in used_slots(key))
            wait_until(settled, 15, f"round {rnd}: every death reported, {tag}",
                       detail=lambda: "missing: %s\n%s" % (
                           [d for d in dead if reports(svc)[d] == 0], svc.log()[-3000:]))
            got = reports(svc)
            twice = {d: n for d, n in got.firm.items() if n > 1}
            assert not twice, f"round {rnd}: reported more than once: {twice}, {tag}"
            false = {(n, c.pid) for n, c in live.items() if got[(n, c.pid)]}
            assert not false, f"round {rnd}: live clients reported dead: {false}, {tag}"
            known = set(dead) | set(racy.items())
            unknown = {k for k in got.keys() if k not in known and
                       not (k[0] is None and any(k[1] == p for _, p in known))}
            assert not unknown, f"round {rnd}: reports of unknown processes {unknown}, {tag}"
            slots = used_slots(key)
            held = {s.name: s.pid for s in slots if s.pid}
            assert held == {n: c.pid for n, c in live.items()}, \
                f"round {rnd}: slots holding a PID {held} != live clients, {tag}"
            assert not [s for s in slots if s.state == abi.State.CLAIMING], f"round {rnd}: stale claim"
            wait_until(lambda: semaphore_value(key) == 1, 5, f"round {rnd}: the semaphore to be free")
    finally:
        svc.stop()

    got = reports(svc)
    racy_reported = sum(got[(n, p)] for n, p in racy.items())
    repeats = sum(got.maybe.values())
    by = collections.Counter(e["event"] for e in svc.events() if e.get("event") in ("exit", "found_dead"))
    print(f"\nCHAOS rounds={ROUNDS} seed={SEED} deaths={len(dead)} "
          f"(service up {sum(v == 'up' for v in dead.values())}, down {sum(v == 'down' for v in dead.values())}) "
          f"reported={sum(got[d] for d in dead)} "
          f"exit_lines={by['exit']} found_dead_lines={by['found_dead']} possible_repeat_lines={repeats} "
          f"false_deaths=0 "
          f"racy_kills={len(racy)} racy_reported={racy_reported} live_at_end={len(live)} "
          f"storm_exits={storm_exits} semaphore=1")


def test_restart_reports_the_ends_a_killed_service_left_pending(key, service, forked, tmp_path):  # noqa: F811
    """The table as a service SIGKILLed mid-report leaves it (a note in the header's
    pending-ends list, the PID word already zero): the next one reports each end
    once, marking the ones that may have been logged already, and runs its hook once."""
    from procwatch.segment import Table
    svc = service()
    unrecorded, recorded, never, live = (forked(key, n) for n in ("unrecorded", "recorded", "never", "live"))
    svc.stop(signal.SIGKILL)
    for c in (unrecorded, recorded, never):
        c.kill()
    t = Table.attach(key)
    try:
        def pend(k, c):
            t.u64[(abi.H_PENDING_ENDS >> 3) + k] = (c.pid << 32) | (c.slot + 1)
        pend(0, unrecorded)
        t.u32[t.pid_index(unrecorded.slot)] = 0          # zeroed, end not recorded
        pend(1, recorded)
        t.u32[t.pid_index(recorded.slot)] = 0            # zeroed and recorded, maybe logged
        t.record_end(recorded.slot, abi.State.EXITED, abi.Cause.EXITED, exit_status=9)
        pend(2, never)                                   # noted, never zeroed
        t.u64[(abi.H_PENDING_ENDS >> 3) + 3] = (7 << 32) | 0xFFFFFFF0   # garbage
    finally:
        t.detach()
    ran = tmp_path / "hooks-ran"
    cfg = tmp_path / "procwatch.toml"
    hook = '["sh", "-c", "echo $PROCWATCH_EVENT $PROCWATCH_NAME $PROCWATCH_PID >> \\"$0\\"", "%s"]' % ran
    cfg.write_text(f'[[rule]]\nname = "*"\n[rule.hooks]\non_exit = {hook}\non_found_dead = {hook}\n')
    svc2 = service("--config", str(cfg))
    e = svc2.wait_event("found_dead", name="unrecorded", pid=unrecorded.pid)
    assert "possible_repeat" not in e and "stopped before recording how" in e["message"]
    e = svc2.wait_event("exit", name="recorded", pid=recorded.pid, possible_repeat=1)
    assert e["signal"] == "SIGKILL"
    svc2.wait_event("found_dead", name="never", pid=never.pid)     # by the reconcile, as usual
    svc2.wait_event("corrupt", problem="pending")
    got = reports(svc2)
    assert [got[(c.name, c.pid)] for c in (unrecorded, recorded, never)] == [1, 1, 1]
    assert not got[(live.name, live.pid)]
    want = sorted([f"found_dead unrecorded {unrecorded.pid}", f"exit recorded {recorded.pid}",
                   f"found_dead never {never.pid}"])
    wait_until(lambda: ran.exists() and sorted(ran.read_text().split("\n")[:-1]) == want, 15,
               "one hook run for each end", detail=lambda: ran.exists() and ran.read_text())
    with attached_table(key) as t:
        assert not any(t.u64[(abi.H_PENDING_ENDS >> 3) + k] for k in range(abi.PENDING_ENDS))
        assert t.read_slot(unrecorded.slot).state == abi.State.FOUND_DEAD
