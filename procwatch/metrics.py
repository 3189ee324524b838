"""Prometheus metrics: one custom collector, read when scraped.

Imported only when metrics are enabled, so the service and every client
run without prometheus_client installed.  Nothing here sits on the
detection path: the service counts into :class:`procwatch.stats.Stats`
whatever happens, and :class:`Collector` turns a snapshot of it, plus a
count of the slot table taken at scrape time, into metric families (the
``ProcessCollector`` pattern of client_python).  The table is reached
through a callable returning slot-like objects (``.state``), so this module
does not depend on how the segment is mapped.

Everything is served from a private :class:`CollectorRegistry`: the default
registry would add the python_* and process_* collectors of whatever
imported us, and a second service in one process (tests) would collide.

Names follow the Prometheus conventions: ``procwatch_`` prefix, counters
end in ``_total``, durations in seconds.  No label carries a PID or a
registered name: their number is unbounded, and a restart storm would
explode the series count.
"""

import dataclasses as _dc
import math as _math

from procwatch import abi as _abi
from procwatch.errors import ProcwatchError

try:
    from prometheus_client import CollectorRegistry as _CollectorRegistry
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import (CounterMetricFamily as _Counter,
                                        GaugeMetricFamily as _Gauge,
                                        HistogramMetricFamily as _Histogram)
    _IMPORT_ERROR = None
except ImportError as _exc:      # metrics are optional: pip install 'procwatch[metrics]'
    _IMPORT_ERROR = _exc

__all__ = ("MetricsUnavailable", "Collector", "make_registry", "start", "MetricsServer")

_REGISTERED_STATES = (_abi.State.ALIVE, _abi.State.HUNG)


class MetricsUnavailable(ProcwatchError):
    """The metrics endpoint cannot be served."""

    def __init__(self, address, why, fix):
        self.address, self.why, self.fix = address, why, fix
        super().__init__(address, why, fix)

    def __str__(self):
        return f"cannot serve metrics on {self.address}: {self.why}: {self.fix}"


def _bucket_bound(bound):
    return "+Inf" if _math.isinf(bound) else repr(bound)


class Collector:
    """Metric families from ``stats`` (a :class:`Stats`) and, if given,
    ``table()`` (an iterable of slots with ``.state``) at each scrape."""

    def __init__(self, stats, table=None):
        self._stats = stats
        self._table = table

    def collect(self):
        s = self._stats.snapshot()
        if self._table is not None:
            registered = sum(1 for slot in self._table() if slot.state in _REGISTERED_STATES)
            yield _Gauge("procwatch_registered_processes",
                         "Processes registered in the slot table and alive or hung.",
                         value=registered)
        exits = _Counter("procwatch_exits", "Registered processes that ended, by cause.",
                         labels=["cause"])
        for cause, n in s.exits.items():
            exits.add_metric([cause], n)
        yield exits
        for name, doc, counts in (
            ("procwatch_hung", "Processes declared hung after missed heartbeats, by verdict.", s.hung),
            ("procwatch_killed", "Hung processes signalled by the kill action, by verdict.", s.killed),
        ):
            family = _Counter(name, doc, labels=["verdict"])
            for verdict, n in counts.items():
                family.add_metric([verdict], n)
            yield family
        yield self._histogram("procwatch_detection_latency_seconds",
                              "Kernel exit event to slot zeroed (ends zeroed by the exit event; the event "
                              "comes after the address-space teardown, which this leaves out).",
                              s.latency)
        yield self._histogram("procwatch_death_word_latency_seconds",
                              "Death word seen to slot zeroed (ends zeroed by the death word, before "
                              "the teardown).", s.death_latency)
        yield self._histogram("procwatch_teardown_seconds",
                              "Death word seen to pidfd seen readable: the address-space teardown every "
                              "exit-event or pidfd watcher waits for (ends zeroed by the death word).", s.teardown)
        for name, doc, value in (
            ("procwatch_found_dead", "Ends noticed by reconcile rather than by an exit event.",
             s.found_dead),
            ("procwatch_overflows", "Connector socket overflows (ENOBUFS), each followed by a reconcile.",
             s.overflows),
            ("procwatch_detector_respawns", "Detector threads started after the first.",
             s.detector_respawns),
            ("procwatch_hook_runs", "Hook commands run (or attempted).", s.hook_runs),
            ("procwatch_hook_failures",
             "Hook runs that failed: could not start, exited non-zero, killed or timed out.",
             s.hook_failures),
            ("procwatch_hook_timeouts", "Hook runs killed at their timeout.", s.hook_timeouts),
            ("procwatch_hook_dropped", "Hook runs dropped because the queue was full.",
             s.hook_dropped),
            ("procwatch_corrupt_slots", "Slots holding what no client could have written, cleared.",
             s.corrupt),
        ):
            yield _Counter(name, doc, value=value)
        yield self._histogram("procwatch_checker_duration_seconds",
                              "Duration of one heartbeat check of the whole table.", s.checker)
        if s.etcd_up is not None:       # an [etcd] table: the publisher of procwatch/fleet.py
            yield _Gauge("procwatch_etcd_up", "1 while the etcd publisher is connected, else 0.",
                         value=s.etcd_up)
            for name, doc, value in (
                ("procwatch_etcd_puts", "Live keys put to etcd (registrations, state changes, reconciles).",
                 s.etcd_puts),
                ("procwatch_etcd_deletes", "Live keys deleted from etcd (ends, reconciles).", s.etcd_deletes),
                ("procwatch_etcd_dropped", "Updates for etcd dropped because its queue was full.",
                 s.etcd_dropped),
            ):
                yield _Counter(name, doc, value=value)

    @staticmethod
    def _histogram(name, doc, snap):
        return _Histogram(name, doc, sum_value=snap.total,
                          buckets=[(_bucket_bound(b), n) for b, n in snap.buckets])


def _require():
    if _IMPORT_ERROR is not None:
        raise MetricsUnavailable("any address", f"prometheus_client is missing ({_IMPORT_ERROR})",
                                 "install it (pip install 'procwatch[metrics]') or set metrics off")


def make_registry(stats, table=None):
    """A private registry holding one :class:`Collector`."""
    _require()
    registry = _CollectorRegistry(auto_describe=False)
    registry.register(Collector(stats, table))
    return registry


@_dc.dataclass
class MetricsServer:
    """A running HTTP endpoint; :meth:`close` frees its port."""
    host: str
    port: int
    registry: object
    _httpd: object
    _thread: object

    def close(self):
        # shutdown() alone keeps the socket bound: client_python issue #1068.
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def start(address, stats, table=None):
    """Serve ``/metrics`` on ``address`` (host, port; port 0 picks a free
    one) in a daemon thread; MetricsUnavailable if the port cannot be bound."""
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    _require()
    registry = make_registry(stats, table)
    try:
        # Returns (server, thread) since prometheus_client 0.20 (client_python #999).
        httpd, thread = _start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsUnavailable(shown, exc.strerror or str(exc),
                                 "pick another metrics address, or 'off'") from None
    return MetricsServer(host, httpd.server_address[1], registry, httpd, thread)
