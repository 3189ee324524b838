"""Service counters: written by the service's threads, read by metrics.

The detector, the heartbeat checker and the hook workers each record what
they did here; :mod:`procwatch.metrics` turns a :meth:`Stats.snapshot` into
Prometheus families when scraped.  Keeping the counters in a plain module
means the service never imports prometheus_client unless metrics are on,
and counting costs the same whether anyone scrapes or not.

Cost on the hot path: one uncontended ``threading.Lock`` (about 0.1 µs) per
record.  ``x += 1`` on an attribute is not atomic between threads in CPython
(load, add, store can interleave), so a lock it is.  The detector records
*after* it has zeroed the PID word and woken the waiters, never before.

Nothing here knows about PIDs: labels of unbounded cardinality do not
belong in metrics.

Three fields are plain attributes, not locked counters: ``events`` (every
exit event the detector decoded, written only by the one detector thread
alive at a time, on the hottest path), ``reconciles`` (passes of the main
loop's reconcile, written only there) and ``last_end`` (the status line's
"last: ..." text, replaced whole).  ``exits``, ``found_dead``,
``overflows``, ``respawns`` and ``corrupt`` read the locked counters, for
the status line and log messages.
"""

import bisect as _bisect
import dataclasses as _dc
import threading as _threading
import time as _time

from procwatch import abi as _abi

__all__ = ("Stats", "Snapshot", "HistogramSnapshot", "LATENCY_BUCKETS", "CHECKER_BUCKETS",
           "cause_label", "VERDICTS")

# Upper bounds in seconds.  Detection latency is kernel exit event -> slot
# zeroed: about 100 µs on an idle box, milliseconds only under a storm.  It
# does not include the address-space teardown that comes before the event.
LATENCY_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 200e-6, 500e-6,
                   1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)
# Death word (issue 14): death word seen -> slot zeroed (the same buckets),
# and death word -> pidfd readable, the teardown (about 50 ms per GiB touched).
TEARDOWN_BUCKETS = (1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 0.5, 1.0, 2.5, 5.0)
# One heartbeat check of the whole table: well under 1 ms for 1024 slots.
CHECKER_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25)

# Causes counted as "found dead": reconcile noticed the end, not the kernel.
_FOUND_DEAD = frozenset({_abi.Cause.FOUND_DEAD, _abi.Cause.FOUND_DEAD_OVERFLOW,
                         _abi.Cause.PID_REUSED})


# The verdict label of hangs and kills (verdict.py): a fixed set, so the series stay few.
VERDICTS = tuple(v.name.lower() for v in _abi.Verdict if v != _abi.Verdict.NONE)


def cause_label(cause):
    """The metric label (and hook PROCWATCH_CAUSE) of an :class:`abi.Cause`: 'killed_hung'."""
    return _abi.Cause(cause).name.lower()


@_dc.dataclass(frozen=True)
class HistogramSnapshot:
    """Prometheus-shaped: cumulative ``(upper_bound, count)`` pairs, the last
    bound ``inf``; ``total`` is the sum of observed values, in seconds."""
    buckets: tuple
    total: float
    count: int


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)    # last: above every bound
        self.total = 0.0

    def observe(self, value):
        # bisect_left: a value equal to a bound falls in that bucket (le).
        self.counts[_bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self):
        cumulative, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            cumulative.append((bound, running))
        return HistogramSnapshot(tuple(cumulative), self.total, running)


@_dc.dataclass(frozen=True)
class Snapshot:
    """A consistent copy of every counter at one moment."""
    exits: dict                # cause label -> count; every cause present
    found_dead: int
    overflows: int
    detector_respawns: int
    hung: dict                 # verdict label -> hangs declared; every verdict present
    killed: dict               # verdict label -> hung processes signalled
    latency: HistogramSnapshot
    checker: HistogramSnapshot
    hook_runs: int
    hook_failures: int
    hook_timeouts: int
    hook_dropped: int
    corrupt: int = 0
    etcd_up: int | None = None      # None: no [etcd] table; else 1 connected, 0 not
    etcd_dropped: int = 0
    etcd_puts: int = 0
    etcd_deletes: int = 0
    death_latency: HistogramSnapshot = None
    teardown: HistogramSnapshot = None


class Stats:
    """Thread-safe counters and two histograms; see the module docstring.

    The service calls:

    * ``record_exit(cause, latency_us=None)`` once per slot that ended, with
      its :class:`abi.Cause`; ``latency_us`` when the kernel timestamp gave
      one (not for found-dead).  Found-dead causes also count in
      ``found_dead``.
    * ``record_overflow()`` on ENOBUFS from the connector socket.
    * ``record_corrupt()`` when a slot no client could have written is cleared.
    * ``record_detector_respawn()`` each time a new detector thread starts
      after the first.
    * ``record_hung(verdict)`` when a slot is declared hung, with its verdict
      label (``busy``...; None counts as ``unknown``); ``record_killed(verdict)``
      when the hang action signalled it.
    * ``record_check(seconds)`` after each pass of the heartbeat checker.
    * ``record_hook(ok, timed_out)`` / ``record_hook_dropped()``: called
      by :class:`procwatch.hooks.HookRunner`.
    * ``record_etcd("put"|"delete")``, ``record_etcd_dropped()`` and the
      ``etcd_up`` attribute: the etcd publisher (procwatch/fleet.py), which
      sets ``etcd_up`` to 0 or 1 once it exists (None: not configured).
    """

    def __init__(self):
        self._lock = _threading.Lock()
        self._exits = {cause_label(c): 0 for c in _abi.Cause if c != _abi.Cause.NONE}
        self._found_dead = self._overflows = self._respawns = 0
        self._hung = dict.fromkeys(VERDICTS, 0)
        self._killed = dict.fromkeys(VERDICTS, 0)
        self._hook_runs = self._hook_failures = self._hook_timeouts = self._hook_dropped = 0
        self._corrupt = 0
        self._etcd = {"put": 0, "delete": 0, "dropped": 0}
        self.etcd_up = None
        self._latency = _Histogram(LATENCY_BUCKETS)
        self._death_latency = _Histogram(LATENCY_BUCKETS)
        self._teardown = _Histogram(TEARDOWN_BUCKETS)
        self._checker = _Histogram(CHECKER_BUCKETS)
        self.events = 0             # exit events decoded (detector thread only)
        self.reconciles = 0         # reconcile passes (main loop only): the long-run test's count
        self.last_end = None        # (name, text, monotonic time) of the last end

    # -- read by the status line and log messages ------------------------------

    @property
    def exits(self):
        """Ends the kernel reported (causes exited and killed_hung)."""
        with self._lock:
            return self._exits["exited"] + self._exits["killed_hung"]

    @property
    def found_dead(self):
        return self._found_dead

    @property
    def overflows(self):
        return self._overflows

    @property
    def respawns(self):
        return self._respawns

    @property
    def corrupt(self):
        return self._corrupt

    def record_end(self, name, text):
        """Remember the last end for the status line: ``dp-1 killed by SIGKILL``."""
        self.last_end = (name, text, _time.monotonic())

    # -- counting ---------------------------------------------------------------

    def record_exit(self, cause, latency_us=None, teardown_us=None):
        """One end.  ``teardown_us`` given (even unknown): the death word zeroed it, and
        ``latency_us`` is death word -> zeroed; otherwise exit event -> zeroed."""
        label = cause_label(cause)
        found_dead = cause in _FOUND_DEAD
        known = latency_us is not None and latency_us != _abi.LATENCY_UNKNOWN
        with self._lock:
            self._exits[label] += 1
            if found_dead:
                self._found_dead += 1
            if teardown_us is not None:
                if known:
                    self._death_latency.observe(latency_us / 1e6)
                if teardown_us != _abi.LATENCY_UNKNOWN:
                    self._teardown.observe(teardown_us / 1e6)
            elif known:
                self._latency.observe(latency_us / 1e6)

    def record_overflow(self):
        with self._lock:
            self._overflows += 1

    def record_corrupt(self):
        with self._lock:
            self._corrupt += 1

    def record_detector_respawn(self):
        with self._lock:
            self._respawns += 1

    def record_hung(self, verdict=None):
        label = verdict if verdict in self._hung else "unknown"
        with self._lock:
            self._hung[label] += 1

    def record_killed(self, verdict=None):
        label = verdict if verdict in self._killed else "unknown"
        with self._lock:
            self._killed[label] += 1

    def record_check(self, seconds):
        with self._lock:
            self._checker.observe(seconds)

    def record_hook(self, ok, timed_out=False):
        with self._lock:
            self._hook_runs += 1
            if not ok:
                self._hook_failures += 1
            if timed_out:
                self._hook_timeouts += 1

    def record_hook_dropped(self, n=1):
        with self._lock:
            self._hook_dropped += n

    def record_etcd(self, kind):
        with self._lock:
            self._etcd[kind] += 1

    def record_etcd_dropped(self):
        with self._lock:
            self._etcd["dropped"] += 1

    @property
    def etcd_dropped(self):
        return self._etcd["dropped"]

    def snapshot(self):
        with self._lock:
            return Snapshot(
                exits=dict(self._exits),
                found_dead=self._found_dead,
                overflows=self._overflows,
                detector_respawns=self._respawns,
                hung=dict(self._hung),
                killed=dict(self._killed),
                latency=self._latency.snapshot(),
                death_latency=self._death_latency.snapshot(),
                teardown=self._teardown.snapshot(),
                checker=self._checker.snapshot(),
                hook_runs=self._hook_runs,
                hook_failures=self._hook_failures,
                hook_timeouts=self._hook_timeouts,
                hook_dropped=self._hook_dropped,
                corrupt=self._corrupt,
                etcd_up=self.etcd_up,
                etcd_dropped=self._etcd["dropped"],
                etcd_puts=self._etcd["put"],
                etcd_deletes=self._etcd["delete"],
            )
