"""Which signals may be a hang signal, and how a wait status reads: the one policy, in every entry point.

signal(7) is the reference: a signal whose default action is Ign, Stop or
Cont leaves a hung process hung, so no entry point may accept it (issue 12:
register_pid(hang_signal="SIGCHLD") was accepted and the "kill" did nothing).
"""

import os
import signal
import subprocess

import pytest

import procwatch
from conftest import PY, ROOT
from procwatch import abi, cheader, config, signals
from procwatch.heartbeat import HeartbeatChecker
from procwatch.segment import Slot, Table

# signal(7)'s table, default action Ign / Stop / Cont, as the man page lists it.
NOT_ENDING = {"SIGCHLD": "Ign", "SIGURG": "Ign", "SIGWINCH": "Ign", "SIGSTOP": "Stop",
              "SIGTSTP": "Stop", "SIGTTIN": "Stop", "SIGTTOU": "Stop", "SIGCONT": "Cont"}


def test_policy_is_signal7():
    assert {signal.Signals(n).name for n in signals.NOT_ENDING} == set(NOT_ENDING)
    for name in ("SIGKILL", "SIGTERM", "SIGABRT", "SIGQUIT", "SIGSEGV", "SIGUSR1", "SIGRTMIN"):
        assert signals.ends_process(signal.Signals[name]), name
    for bad in (0, 32, 65, -9, "9", None):
        assert not signals.ends_process(bad), bad


@pytest.mark.parametrize("name", sorted(NOT_ENDING))
def test_register_pid_refuses_a_signal_that_does_not_end_the_process(name):
    with pytest.raises(ValueError, match="does not end a process"):
        procwatch.register_pid("x", hang_signal=name)
    with pytest.raises(ValueError, match="does not end a process"):
        procwatch.register_pid("x", hang_signal=int(signal.Signals[name]))


def test_serve_hang_signal_sigchld_is_a_usage_error(tmp_path):
    """Exit 2 with argparse's one line, before anything starts (it was exit 1 from the config merge)."""
    out = subprocess.run([PY, "-m", "procwatch", "serve", "--hang-signal", "SIGCHLD", "--config",
                          str(tmp_path / "absent.toml")], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    assert "--hang-signal" in out.stderr and "does not end a process" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("procwatch serve: error:")


@pytest.mark.parametrize("name", ["SIGCHLD", "SIGWINCH", "SIGSTOP"])
def test_config_refuses_it(tmp_path, name):
    path = tmp_path / "c.toml"
    path.write_text(f'[hang]\nsignal = "{name}"\n')
    with pytest.raises(config.ConfigError, match="default action ends the process"):
        config.load(str(path))


def test_the_checker_never_sends_what_a_slot_asks_for_if_it_does_not_end(key):
    """A slot written by a foreign client may hold any number: the service's default replaces it."""
    t, _ = Table.create_or_adopt(key, 2)
    try:
        with pytest.raises(ValueError, match="does not end a process"):
            HeartbeatChecker(t, signal=signal.SIGCHLD)
        checker = HeartbeatChecker(t, signal=signal.SIGTERM)
        fields = dict.fromkeys(Slot._fields, 0) | {"name": "x", "heartbeat_action": abi.HangAction.KILL}
        for sig, sent in ((signal.SIGCHLD, signal.SIGTERM), (signal.SIGCONT, signal.SIGTERM),
                          (signal.SIGABRT, signal.SIGABRT)):
            assert checker._resolve(Slot(**fields | {"heartbeat_signal": int(sig)})) == \
                (abi.HangAction.KILL, sent)
    finally:
        t.detach()


def test_the_c_header_holds_the_same_list(key, compiled):
    exe = compiled("hangsig", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    first = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert first[0] == "ok"
    assert [int(n) for n in first[1:]] == [n for n in range(1, 65) if signals.ends_process(n)]
    t, _ = Table.create_or_adopt(key, 2)
    try:
        out = dict(line.split(" ", 1) for line in subprocess.run(
            [str(exe), hex(key)], capture_output=True, text=True, check=True).stdout.splitlines())
        assert out["register"].startswith("0 ")
        assert int(out["sigchld"]) == -22 and int(out["sigabrt"]) == 0        # -EINVAL, then set
        s = t.read_slot(int(out["register"].split()[-1]))
        assert (s.heartbeat_action, s.heartbeat_signal) == (abi.HangAction.KILL, signal.SIGABRT)
    finally:
        t.detach()


def test_one_wait_status_decoder():
    for argv, want in ((["sh", "-c", "exit 3"], ((3, None, None), "exited with code 3")),
                       (["sh", "-c", "kill -KILL $$"], ((None, 9, False), "killed by SIGKILL"))):
        p = subprocess.Popen(argv)
        _, status = os.waitpid(p.pid, 0)
        p.returncode = 0                # reaped above
        assert (signals.decode_status(status), signals.describe_status(status)[0]) == want
    assert signals.decode_status(abi.EXIT_STATUS_UNKNOWN) == (None, None, None)
    assert signals.describe_status(-1)[0] == "ended (status unknown)"
