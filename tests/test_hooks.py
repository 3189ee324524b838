"""procwatch.hooks: real subprocesses, real process groups, real FIFOs for synchronisation;
and, at the end, what a real service hands its hooks for a real armed and a real unarmed death."""

import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys

import pytest

from conftest import PROGS, PY, ROOT, end_process, proc_state, require_root, wait_until
from procwatch import abi, deathword
from procwatch.hooks import HookEvent, HookRunner
from procwatch.signals import describe_status
from procwatch.stats import Stats

WAIT = 30       # generous upper bound for a result to arrive; never a sleep


def children():
    """PIDs of this process's children (all threads), from /proc."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


def is_dead(pid):
    """Gone, or a zombie nobody reaped yet (killed either way)."""
    return proc_state(pid) in (None, "Z")


def event(**fields):
    base = dict(event="exit", name="demo", pid=1234, slot=0)
    base.update(fields)
    return HookEvent(**base)


@pytest.fixture
def results():
    return queue.Queue()


@pytest.fixture
def runner_factory(results):
    made = []

    def make(**kw):
        kw.setdefault("on_done", results.put)
        runner = HookRunner(**kw)
        made.append(runner)
        return runner
    yield make
    for runner in made:
        assert runner.close(discard=True, timeout=WAIT)


def test_environment_carries_the_event(runner_factory, results, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    # A real wait status: a process killed by SIGKILL.
    victim = subprocess.Popen(["sleep", "1000"])
    victim.kill()
    _, status = os.waitpid(victim.pid, 0)
    victim.returncode = -9      # already reaped above; keep Popen from waiting again
    fields = dict(describe_status(status)[1], CAUSE=abi.Cause.EXITED, LATENCY_US=85)
    ev = HookEvent.from_fields("exit", "dp-1", victim.pid, 7, fields, key=0x70770001,
                               time_ns=1_700_000_000_123_456_000)
    dump = "import os, json; print(json.dumps(dict(os.environ)))"
    runner = runner_factory()
    assert runner.submit([sys.executable, "-c", dump], ev)
    result = results.get(timeout=WAIT)
    assert result.ok, result.describe()
    env = json.loads(result.output)
    assert {k: v for k, v in env.items() if k.startswith("PROCWATCH_")} == {
        "PROCWATCH_EVENT": "exit",
        "PROCWATCH_NAME": "dp-1",
        "PROCWATCH_PID": str(victim.pid),
        "PROCWATCH_SLOT": "7",
        "PROCWATCH_EXIT_CODE": "",
        "PROCWATCH_SIGNAL": "SIGKILL",
        "PROCWATCH_CORE_DUMPED": "0",
        "PROCWATCH_CAUSE": "exited",
        "PROCWATCH_LATENCY_US": "85",
        "PROCWATCH_DETECTED_BY": "",
        "PROCWATCH_TEARDOWN_US": "",
        "PROCWATCH_VERDICT": "",
        "PROCWATCH_TIME": "2023-11-14T22:13:20.123456Z",
        "PROCWATCH_KEY": "0x70770001",
    }
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert env["PATH"] == os.environ["PATH"]


def test_exit_code_and_unknown_status():
    proc = subprocess.Popen(["sh", "-c", "exit 3"])
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = 3         # reaped above
    env = HookEvent.from_fields("exit", "a", 1, 0, describe_status(status)[1]).env()
    assert (env["PROCWATCH_EXIT_CODE"], env["PROCWATCH_SIGNAL"]) == ("3", "")
    fields = dict(describe_status(abi.EXIT_STATUS_UNKNOWN)[1], CAUSE="found_dead",
                  LATENCY_US=abi.LATENCY_UNKNOWN)
    env = HookEvent.from_fields("found_dead", "a", 1, 0, fields).env()
    assert (env["PROCWATCH_EXIT_CODE"], env["PROCWATCH_SIGNAL"], env["PROCWATCH_LATENCY_US"]) == ("", "", "")
    assert env["PROCWATCH_CAUSE"] == "found_dead"
    assert (env["PROCWATCH_DETECTED_BY"], env["PROCWATCH_TEARDOWN_US"]) == ("", "")


def test_hanging_hook_is_killed_at_timeout_and_does_not_delay_others(runner_factory, results):
    stats = Stats()
    runner = runner_factory(workers=2, stats=stats)
    # The hook and its background child share the hook's process group.
    hang = ["sh", "-c", "sleep 1000 & echo $!; wait"]
    assert runner.submit(hang, event(name="hangs"), timeout=3)
    assert runner.submit(["echo", "quick"], event(name="quick"))
    first = results.get(timeout=WAIT)
    assert first.event.name == "quick" and first.ok and first.output == "quick\n"
    second = results.get(timeout=WAIT)
    grandchild = int(second.output)
    try:
        assert second.event.name == "hangs"
        assert second.timed_out and not second.ok
        assert second.returncode == -signal.SIGKILL
        # SIGKILL is sent by then; the grandchild dies when it next gets a CPU (load).
        wait_until(lambda: is_dead(grandchild), 10, "the hook's process group to be killed")
    finally:
        if not is_dead(grandchild):
            os.kill(grandchild, signal.SIGKILL)
    snap = stats.snapshot()
    assert (snap.hook_runs, snap.hook_failures, snap.hook_timeouts) == (2, 1, 1)
    assert not children(), "a hook was left unreaped"


def test_burst_beyond_the_bound_is_dropped_and_counted(runner_factory, results, tmp_path, caplog):
    started, go = tmp_path / "started", tmp_path / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    stats = Stats()
    runner = runner_factory(workers=1, queue=3, stats=stats)
    blocker = ["sh", "-c", 'echo started > "$1"; read x < "$2"', "sh", str(started), str(go)]
    assert runner.submit(blocker, event(name="blocker"))
    # Wait until the one worker is inside the blocker: it writes to the FIFO.
    fd = os.open(started, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(WAIT * 1000), "blocker hook never started"
        assert os.read(fd, 100) == b"started\n"
    finally:
        os.close(fd)
    accepted = [runner.submit(["true"], event(name=f"burst-{i}")) for i in range(8)]
    assert accepted == [True] * 3 + [False] * 5
    assert runner.pending() == 3
    assert stats.snapshot().hook_dropped == 5
    with open(go, "w") as f:
        f.write("go\n")
    names = [results.get(timeout=WAIT).event.name for _ in range(4)]
    assert names == ["blocker", "burst-0", "burst-1", "burst-2"]
    assert runner.close(timeout=WAIT)
    snap = stats.snapshot()
    assert (snap.hook_runs, snap.hook_failures, snap.hook_dropped) == (4, 0, 5)
    assert any("dropped 5 hook runs" in r.getMessage() for r in caplog.records)


def test_submit_after_close_is_dropped(runner_factory):
    runner = runner_factory()
    assert runner.close(timeout=WAIT)
    assert not runner.submit(["true"], event())
    assert runner.stats.snapshot().hook_dropped == 1


def test_close_discard_counts_queued_runs(runner_factory, tmp_path):
    go = tmp_path / "go"
    os.mkfifo(go)
    runner = runner_factory(workers=1, queue=5)
    runner.submit(["sh", "-c", 'read x < "$1"', "sh", str(go)], event())
    for _ in range(5):
        runner.submit(["true"], event())
    # Release the blocker from another opener once close() has discarded the queue.
    fd = os.open(go, os.O_RDWR)          # O_RDWR never blocks on a FIFO (fifo(7))
    try:
        os.write(fd, b"go\n")
        assert runner.close(discard=True, timeout=WAIT)
    finally:
        os.close(fd)
    snap = runner.stats.snapshot()
    # The blocker may or may not have been dequeued before close(): either way
    # every submitted job is accounted for exactly once.
    assert snap.hook_runs + snap.hook_dropped == 6


@pytest.mark.parametrize("argv,returncode,fragment", [
    (["sh", "-c", "echo failing >&2; exit 3"], 3, "exit status 3"),
    (["sh", "-c", "kill -TERM $$"], -signal.SIGTERM, "killed by SIGTERM"),
    (["/nonexistent/hook"], None, "cannot run '/nonexistent/hook'"),
])
def test_failures_are_counted_and_described(runner_factory, results, argv, returncode, fragment):
    runner = runner_factory()
    runner.submit(argv, event())
    result = results.get(timeout=WAIT)
    assert not result.ok and result.returncode == returncode
    assert fragment in result.describe()
    snap = runner.stats.snapshot()
    assert (snap.hook_runs, snap.hook_failures, snap.hook_timeouts) == (1, 1, 0)


def test_output_is_logged_and_bounded(runner_factory, results):
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test_hooks.output")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    runner = runner_factory(logger=logger, output_limit=100)
    script = "import sys; print('first line'); print('x' * 100000); print('err', file=sys.stderr)"
    runner.submit([sys.executable, "-c", script], event(name="chatty"))
    result = results.get(timeout=WAIT)
    assert result.ok and result.truncated and len(result.output) == 100
    assert result.output.startswith("first line\n")
    messages = [r.getMessage() for r in records]
    assert "exit status 0" in messages[0] and "'chatty'" in messages[0]
    assert messages[1] == "exit hook " + sys.executable + ": first line"
    assert "discarded" in messages[-1]
    assert records[0].PROCWATCH_NAME == "chatty"


def test_stderr_is_captured_with_stdout(runner_factory, results):
    runner = runner_factory()
    runner.submit(["sh", "-c", "echo out; echo err >&2"], event())
    assert results.get(timeout=WAIT).output == "out\nerr\n"


def test_a_broken_callback_does_not_kill_the_worker(runner_factory, results, caplog):
    calls = []

    def on_done(result):
        calls.append(result)
        if len(calls) == 1:
            raise RuntimeError("bug in callback")
        results.put(result)

    runner = runner_factory(workers=1, on_done=on_done)
    runner.submit(["true"], event(name="one"))
    runner.submit(["true"], event(name="two"))
    assert results.get(timeout=WAIT).event.name == "two"
    assert any(r.exc_info and "bug in callback" in str(r.exc_info[1]) for r in caplog.records)


# -- with a real service ---------------------------------------------------------------

# A hook that writes its PROCWATCH_* environment to DIR/<name>.json (renamed into place: whole or absent).
DUMP_ENV = ("import json, os, sys; env = {k: v for k, v in os.environ.items() if k.startswith('PROCWATCH_')}; "
            "path = os.path.join(sys.argv[1], env['PROCWATCH_NAME'] + '.json'); "
            "open(path + '.tmp', 'w').write(json.dumps(env)); os.rename(path + '.tmp', path)")


@require_root()
@pytest.mark.skipif(deathword.availability()[0] != abi.DeathWatch.WATCHING,
                    reason="no futex_waitv (Linux < 5.16) or no atomics here: nothing ends by the death word")
def test_hooks_are_told_what_detected_the_end(key, service, clients, tmp_path):
    """An armed client's end zeroed by its death word gives the hook DETECTED_BY=death_word and the
    teardown it saved; an unarmed (connector-only) client's gives DETECTED_BY=exit_event and no teardown.

    The armed target touches 256 MiB, so that its teardown (tens of ms) puts its exit event well after
    the death word: an end seen as death_word is one the death word zeroed, not a race it happened to win.
    """
    out = tmp_path / "env"
    out.mkdir()
    cfg = tmp_path / "procwatch.toml"
    cfg.write_text(f'[[rule]]\nname = "hk-*"\n'
                   f'hooks = {{ on_exit = [{json.dumps(PY)}, "-c", {json.dumps(DUMP_ENV)}, {json.dumps(str(out))}] }}\n')
    svc = service("--config", str(cfg))

    armed = subprocess.Popen([PY, str(PROGS / "armed.py"), "--key", hex(key), "--name", "hk-armed", "--mib", "256"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert select.select([armed.stdout], [], [], WAIT)[0], "the armed target never registered"
        line = armed.stdout.readline().decode().split()
        assert line[0] == "READY", line
        slot = int(line[1])
        from procwatch.segment import Table
        t = Table.attach(key)
        try:
            assert t.death_arm(slot) == abi.Arm.ARMED
            wait_until(lambda: t.death_word(slot) & abi.FUTEX_WAITERS, 10, "the service to wait on the death word",
                       detail=lambda: svc.log()[-2000:])
        finally:
            t.detach()
        armed.kill()
        wait_until(lambda: (out / "hk-armed.json").exists(), WAIT, "the armed client's exit hook",
                   detail=lambda: svc.log()[-3000:])
    finally:
        end_process(armed)
    env = json.loads((out / "hk-armed.json").read_text())
    assert (env["PROCWATCH_EVENT"], env["PROCWATCH_SIGNAL"], env["PROCWATCH_PID"]) == ("exit", "SIGKILL", str(armed.pid))
    assert env["PROCWATCH_DETECTED_BY"] == "death_word", env
    assert env["PROCWATCH_TEARDOWN_US"].isdigit() and int(env["PROCWATCH_TEARDOWN_US"]) > 0, env
    assert env["PROCWATCH_LATENCY_US"].isdigit(), env
    # The same figures as the service's own line for that end.
    e = svc.wait_event("exit", name="hk-armed")
    assert (e["detected_by"], e["teardown_us"], e["latency_us"]) == \
        ("death_word", env["PROCWATCH_TEARDOWN_US"], env["PROCWATCH_LATENCY_US"])

    unarmed = clients(key, "hk-unarmed", "--no-arm")
    unarmed.kill()
    wait_until(lambda: (out / "hk-unarmed.json").exists(), WAIT, "the unarmed client's exit hook",
               detail=lambda: svc.log()[-3000:])
    env = json.loads((out / "hk-unarmed.json").read_text())
    assert (env["PROCWATCH_SIGNAL"], env["PROCWATCH_PID"]) == ("SIGKILL", str(unarmed.pid))
    assert (env["PROCWATCH_DETECTED_BY"], env["PROCWATCH_TEARDOWN_US"]) == ("exit_event", ""), env
