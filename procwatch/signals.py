"""Signals and wait statuses: one answer each to "which signal ends a process" and "how did it end".

A hang signal must end the hung process by its default action.  signal(7)
gives every signal one of five default actions: Term, Core, Ign, Stop, Cont.
Those of the last three (SIGCHLD, SIGURG, SIGWINCH are ignored; SIGSTOP,
SIGTSTP, SIGTTIN, SIGTTOU stop; SIGCONT continues) would be logged as sent
and recorded as a kill while the process stays hung, so every entry point
refuses them: ``register_pid(hang_signal=)``, ``serve --hang-signal``, the
configuration file, the service itself, and ``procwatch.h``
(``procwatch_hang_signal_ok()``, held to :data:`NOT_ENDING` by
tests/test_cheader.py).

The wait(2) status the kernel's exit event carries (``exit_code`` in
cn_proc.h) is read by :func:`decode_status` and worded by
:func:`describe_status`, for the log, ``procwatch status``, ``procwatch
wait`` and the hooks alike.
"""

import os as _os
import signal as _signal

# signal(7): default action Ign, Stop or Cont.  Everything else (Term, Core,
# and the real-time signals, whose default is Term) ends the process.
NOT_ENDING = frozenset((_signal.SIGCHLD, _signal.SIGURG, _signal.SIGWINCH,
                        _signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU,
                        _signal.SIGCONT))

HANG_SIGNAL_HINT = "use one that ends it, like SIGKILL, SIGTERM or SIGABRT (core dump)"


def signal_name(num, unknown="signal {}"):
    """'SIGKILL' for 9; ``unknown`` formatted with the number for one Python has no name for."""
    try:
        return _signal.Signals(num).name
    except ValueError:
        return unknown.format(num)


def ends_process(num):
    """Whether signal number ``num`` exists and its default action ends the process."""
    return isinstance(num, int) and num in _signal.valid_signals() and num not in NOT_ENDING


def hang_signal_value(sig):
    """Signal number for a hang signal: None (0: the service's default), a number, or a name.

    'SIGTERM', 'TERM', 'sigterm' and '15' are the same.  ValueError, in one
    line, for anything that is not a signal or whose default action does not
    end a process.
    """
    if sig is None:
        return 0
    num = None
    if isinstance(sig, str):
        text = sig.strip().upper()
        if text.isdigit():
            num = int(text)
        else:
            num = _signal.Signals.__members__.get(text if text.startswith("SIG") else "SIG" + text)
    elif isinstance(sig, int) and not isinstance(sig, bool):
        num = int(sig)
    if num is None or num not in _signal.valid_signals():
        raise ValueError(f"hang signal {sig!r} is not a signal: use a name like SIGKILL, SIGTERM or "
                         f"SIGABRT (core dump)")
    if not ends_process(num):
        raise ValueError(f"hang signal {sig!r} does not end a process by default (signal(7)): "
                         f"{HANG_SIGNAL_HINT}")
    return int(num)


def decode_status(status):
    """(exit_code, signal number, core dumped) of a wait(2) status; all None when unknown (< 0)."""
    if status is None or status < 0:
        return None, None, None
    if _os.WIFSIGNALED(status):
        return None, _os.WTERMSIG(status), bool(_os.WCOREDUMP(status))
    return _os.WEXITSTATUS(status), None, None


def describe_status(status):
    """(text, journal fields) for a wait(2) status: 'exited with code 3' / 'killed by SIGKILL'."""
    code, sig, core = decode_status(status)
    if sig is not None:
        name = signal_name(sig)
        return (f"killed by {name}" + (" (core dumped)" if core else ""),
                {"SIGNAL": name, "SIGNAL_NUMBER": sig, "CORE_DUMPED": int(core)})
    if code is not None:
        return f"exited with code {code}", {"EXIT_CODE": code}
    return "ended (status unknown)", {}
