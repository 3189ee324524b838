"""Operator hooks: run a command when a watched process exits, is found dead or hangs.

The hazard is the detection path.  A hook is someone else's program
(``systemctl restart dp@2``, a failover script): it can be slow, hang, fork
daemons or print megabytes.  None of that may delay the next exit report.
So the detector only calls :meth:`HookRunner.submit`, which puts a job on a
bounded queue with ``put_nowait`` and returns: no fork, no I/O, no logging,
no waiting.  A full queue means the job is dropped and counted
(``Stats.record_hook_dropped``); a worker logs the drops later.

Worker threads (a fixed pool) run each job:

* ``argv`` is executed directly, never through a shell, in a new session
  (so the hook and everything it starts form one process group), with
  stdin from /dev/null, stdout and stderr captured together.
* The event is in the environment as ``PROCWATCH_*`` variables (see
  :meth:`HookEvent.env`); every variable is always set, empty when unknown,
  so ``set -u`` scripts work.  The service's own systemd variables
  (``NOTIFY_SOCKET``, ``WATCHDOG_*``, ``LISTEN_*``) are removed: a hook must
  not be able to send READY or WATCHDOG in the service's name (sd_notify(3)).
* At the timeout the whole process group gets SIGKILL, by the hook's PID,
  which is also the group's ID.  The hook is not yet reaped at that moment,
  so that PID (and group ID) cannot have been reused.  A descendant that
  called setsid() itself has left the group and is not killed.
* Output is kept up to ``output_limit`` bytes (the rest is read and
  discarded, so a chatty hook cannot block on a full pipe) and logged,
  one record per line, after the run.
"""

import dataclasses as _dc
import datetime as _datetime
import logging as _logging
import os as _os
import queue as _queue
import select as _select
import signal as _signal
import subprocess as _subprocess
import threading as _threading
import time as _time

from procwatch import abi as _abi
from procwatch.signals import signal_name as _signal_name
from procwatch.stats import Stats, cause_label

__all__ = ("HookEvent", "HookResult", "HookRunner")

log = _logging.getLogger("procwatch.hooks")

# Inherited variables a hook must not see (sd_notify(3), sd_listen_fds(3)).
_STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC",
                 "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@_dc.dataclass(frozen=True)
class HookEvent:
    """What happened, as handed to a hook.

    ``event`` is ``exit``, ``found_dead`` or ``hung`` (config.EVENTS).
    ``exit_code`` is set for a normal exit, ``signal`` (a name like
    ``SIGKILL``) for a death by signal, or for ``hung`` the signal the hang
    action is about to send; ``cause`` is an :class:`abi.Cause` or its label.
    ``detected_by`` says what zeroed the slot for an ``exit`` (``death_word``
    or ``exit_event``), so that ``latency_us`` can be read for what it is;
    ``teardown_us`` is, for a death-word end, death word -> pidfd readable
    (the address-space teardown the death word saved the peers), the same
    figures journald gets (issue 14).
    """
    event: str
    name: str
    pid: int
    slot: int
    exit_code: int | None = None
    signal: str | None = None
    core_dumped: bool = False
    cause: object = None
    latency_us: int | None = None
    verdict: str | None = None
    detected_by: str | None = None
    teardown_us: int | None = None
    time_ns: int = _dc.field(default_factory=_time.time_ns)
    key: int | None = None

    @classmethod
    def from_fields(cls, event, name, pid, slot, fields, **more):
        """Build from the journal fields the Reporter logged the end with
        (signals.describe_status's, plus CAUSE, LATENCY_US, DETECTED_BY and TEARDOWN_US)."""
        return cls(event, name, pid, slot, exit_code=fields.get("EXIT_CODE"), signal=fields.get("SIGNAL"),
                   core_dumped=bool(fields.get("CORE_DUMPED")), cause=fields.get("CAUSE"),
                   latency_us=fields.get("LATENCY_US"), verdict=fields.get("VERDICT"),
                   detected_by=fields.get("DETECTED_BY"), teardown_us=fields.get("TEARDOWN_US"), **more)

    def env(self):
        """The ``PROCWATCH_*`` variables of this event, all strings."""
        def text(v):
            return "" if v is None else str(v)
        cause = self.cause
        if isinstance(cause, int):
            cause = cause_label(cause)
        latency = None if self.latency_us == _abi.LATENCY_UNKNOWN else self.latency_us
        teardown = None if self.teardown_us == _abi.LATENCY_UNKNOWN else self.teardown_us
        when = _datetime.datetime.fromtimestamp(self.time_ns / 1e9, _datetime.timezone.utc)
        return {
            "PROCWATCH_EVENT": self.event,
            "PROCWATCH_NAME": self.name,
            "PROCWATCH_PID": text(self.pid),
            "PROCWATCH_SLOT": text(self.slot),
            "PROCWATCH_EXIT_CODE": text(self.exit_code),
            "PROCWATCH_SIGNAL": text(self.signal),
            "PROCWATCH_CORE_DUMPED": "1" if self.core_dumped else "0",
            "PROCWATCH_CAUSE": text(cause),
            "PROCWATCH_LATENCY_US": text(latency),
            "PROCWATCH_DETECTED_BY": text(self.detected_by),
            "PROCWATCH_TEARDOWN_US": text(teardown),
            "PROCWATCH_VERDICT": text(self.verdict),
            "PROCWATCH_TIME": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "PROCWATCH_KEY": "" if self.key is None else f"{self.key:#010x}",
        }


@_dc.dataclass(frozen=True)
class HookResult:
    """How one hook run ended.  ``ok`` means it ran and exited 0 in time."""
    argv: tuple
    event: HookEvent
    returncode: int | None        # None: never started; negative: killed by that signal
    timed_out: bool
    error: str | None             # why it could not start
    output: str
    truncated: bool
    duration: float

    @property
    def ok(self):
        return self.error is None and not self.timed_out and self.returncode == 0

    def describe(self):
        if self.error:
            return self.error
        if self.timed_out:
            return f"killed after its {self.duration:.1f} s timeout"
        if self.returncode < 0:
            return f"killed by {_signal_name(-self.returncode, '{}')} after {self.duration:.3f} s"
        return f"exit status {self.returncode} after {self.duration:.3f} s"


@_dc.dataclass(frozen=True)
class _Job:
    argv: tuple
    event: HookEvent
    timeout: float


_STOP = object()


class HookRunner:
    """A fixed pool of ``workers`` threads running hooks from a queue of at
    most ``queue`` waiting jobs.

    ``stats`` receives ``record_hook``/``record_hook_dropped`` (a private
    :class:`Stats` if None).  ``logger`` gets the per-run summary and the
    output.  ``on_done(result)``, if given, is called in the worker after
    each run: the service does not need it, tests synchronise on it.
    """

    def __init__(self, *, workers=2, queue=64, timeout=10.0, stats=None, logger=None,
                 on_done=None, output_limit=8192):
        if workers < 1 or queue < 1 or timeout <= 0:
            raise ValueError("workers, queue and timeout must be positive")
        self.timeout = timeout
        self.stats = stats if stats is not None else Stats()
        self.log = logger or log
        self._on_done = on_done
        self._output_limit = output_limit
        self._queue = _queue.Queue(maxsize=queue)
        self._closed = False
        self._drops_lock = _threading.Lock()
        self._drops_unlogged = 0
        self._threads = [_threading.Thread(target=self._work, name=f"procwatch-hook-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the detection path's side: never blocks -----------------------------

    def submit(self, argv, event, timeout=None):
        """Queue ``argv`` to run for ``event``; False if dropped (queue full
        or runner closed).  Never blocks, never does I/O."""
        if not self._closed:
            try:
                self._queue.put_nowait(_Job(tuple(argv), event, timeout or self.timeout))
                return True
            except _queue.Full:
                pass
        self.stats.record_hook_dropped()
        with self._drops_lock:
            self._drops_unlogged += 1
        return False

    def pending(self):
        """Jobs waiting for a worker (not counting running ones)."""
        return self._queue.qsize()

    def close(self, *, discard=False, timeout=None):
        """Stop accepting jobs; let queued ones run (or, with ``discard``,
        drop and count them); wait up to ``timeout`` seconds for the
        workers.  Running hooks end at their own timeouts at the latest.
        True when every worker has finished."""
        self._closed = True
        deadline = None if timeout is None else _time.monotonic() + timeout
        if discard:
            dropped = 0
            while True:
                try:
                    job = self._queue.get_nowait()
                except _queue.Empty:
                    break
                if job is not _STOP:
                    dropped += 1
            if dropped:
                self.stats.record_hook_dropped(dropped)
                self.log.warning("hooks: discarded %d queued hook runs at shutdown", dropped)
        for _ in self._threads:
            try:
                self._queue.put(_STOP, timeout=_remaining(deadline, floor=0))
            except _queue.Full:
                return False
        for thread in self._threads:
            thread.join(_remaining(deadline))
        return not any(t.is_alive() for t in self._threads)

    # -- workers ---------------------------------------------------------------

    def _work(self):
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            self._log_drops()
            try:
                result = self._run(job)
                self.stats.record_hook(result.ok, result.timed_out)
                self._report(result)
                if self._on_done is not None:
                    self._on_done(result)
            except Exception:
                # A bug in this module or in on_done: keep the traceback and
                # the worker (a dead worker would shrink the pool silently).
                self.log.exception("hooks: unexpected error running %s", list(job.argv))

    def _log_drops(self):
        with self._drops_lock:
            n, self._drops_unlogged = self._drops_unlogged, 0
        if n:
            self.log.warning("hooks: dropped %d hook runs: more than %d waiting; "
                             "raise [hooks] queue or workers, or make the hooks faster",
                             n, self._queue.maxsize)

    def _env(self, event):
        env = {k: v for k, v in _os.environ.items() if k not in _STRIPPED_ENV}
        env.update(event.env())
        return env

    def _run(self, job):
        started = _time.monotonic()
        deadline = started + job.timeout
        try:
            proc = _subprocess.Popen(
                job.argv, stdin=_subprocess.DEVNULL, stdout=_subprocess.PIPE,
                stderr=_subprocess.STDOUT, env=self._env(job.event), cwd="/",
                start_new_session=True, close_fds=True)
        except OSError as exc:
            return HookResult(job.argv, job.event, None, False,
                              f"cannot run {job.argv[0]!r}: {exc.strerror or exc}", "", False,
                              _time.monotonic() - started)
        try:
            output, truncated, eof = self._collect(proc, deadline)
            timed_out = not eof
            if eof:
                try:
                    proc.wait(timeout=_remaining(deadline, floor=0))
                except _subprocess.TimeoutExpired:
                    timed_out = True
            if timed_out:
                self._kill_group(proc)
        except BaseException:
            self._kill_group(proc)
            raise
        finally:
            proc.stdout.close()
            returncode = proc.wait()    # reaps; after a kill, promptly
        return HookResult(job.argv, job.event, returncode, timed_out, None,
                          output.decode("utf-8", "backslashreplace"), truncated,
                          _time.monotonic() - started)

    def _collect(self, proc, deadline):
        """Read the hook's output until EOF or ``deadline``: (kept bytes,
        truncated, reached EOF)."""
        fd = proc.stdout.fileno()
        _os.set_blocking(fd, False)
        poller = _select.poll()
        poller.register(fd, _select.POLLIN)
        kept, truncated = bytearray(), False
        while True:
            left = deadline - _time.monotonic()
            if left <= 0:
                return bytes(kept), truncated, False
            if not poller.poll(left * 1000):
                continue
            try:
                chunk = _os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return bytes(kept), truncated, True
            room = self._output_limit - len(kept)
            if len(chunk) > room:
                truncated = True
            kept += chunk[:max(room, 0)]

    def _kill_group(self, proc):
        # start_new_session=True made the hook a session and group leader:
        # its PID is the group ID.  Not reaped yet, so not reusable.
        try:
            _os.killpg(proc.pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass    # the group is empty: every member already exited and was reaped

    def _report(self, result):
        ev = result.event
        # PROCWATCH_HOOK_EVENT, not PROCWATCH_EVENT: these records are about
        # the hook, and 'journalctl PROCWATCH_EVENT=exit' must list exits only.
        extra = {"PROCWATCH_HOOK_EVENT": ev.event, "PROCWATCH_NAME": ev.name,
                 "PROCWATCH_HOOK": result.argv[0]}
        level = _logging.INFO if result.ok else _logging.WARNING
        self.log.log(level, "%s hook %s for %r (pid %d): %s", ev.event, list(result.argv),
                     ev.name, ev.pid, result.describe(), extra=extra)
        for line in result.output.splitlines():
            self.log.info("%s hook %s: %s", ev.event, result.argv[0], line, extra=extra)
        if result.truncated:
            self.log.info("%s hook %s: (output beyond %d bytes discarded)", ev.event,
                          result.argv[0], self._output_limit, extra=extra)


def _remaining(deadline, floor=None):
    if deadline is None:
        return None
    left = deadline - _time.monotonic()
    return left if floor is None else max(left, floor)
