"""What the service does for its operator around each event: rules, hooks, metrics, reload.

service.py knows the table and the detector; this module knows the
configuration.  It sits beside the detection path, never on it:

* :meth:`Operations.on_end` is the Reporter's ``on_end`` callback.  It runs in
  the detector thread *after* the slot word was zeroed, the waiters woken and
  the event logged, and all it does is find the first matching rule and call
  :meth:`HookRunner.submit`, which never blocks (a full queue drops and
  counts).  A slow, hanging or failing hook therefore cannot delay the next
  exit report.
* :meth:`Operations.apply_rules` runs in the registrations thread after the
  watch list changed: a rule's ``heartbeat`` is written into the slot of a
  client that registered without one (0 ms in its ``heartbeat_ms`` field).  A client
  that asked for its own interval keeps it.
* :meth:`Operations.reload` runs in the service's main loop on SIGHUP.  The
  new file is parsed and checked whole before anything changes; a bad file
  is refused with its one-line error and the old settings stay.  Settings
  that belong to the table or the socket (key, slots, backend, rcvbuf,
  group) cannot change under running clients: they are logged as needing a
  restart and the running values stay.
* :meth:`Operations.hang_policy` is the heartbeat checker's ``policy``: the
  action, signal, max_misses and what a starved verdict gets (``starved``)
  for a registered name, from its first
  matching rule over ``[hang]`` (which holds --hang-action, --hang-signal
  and --max-misses when given).  A slot's own ``heartbeat_action`` /
  ``heartbeat_signal`` still win: the client asked.  The checker reports a
  hang through :meth:`on_end` too (``Event.HUNG``), which runs ``on_hung``.
* The metrics endpoint (prometheus_client, imported only when enabled) reads
  :class:`procwatch.stats.Stats` and the table when scraped.
* With an ``[etcd]`` table, :class:`procwatch.fleet.Publisher` (imported only
  then) gets every end from :meth:`on_end` and a kick from
  :meth:`apply_rules` on every registration change; both only queue.  It is
  made by :meth:`start` (so the ends of the first reconcile are queued) and
  its thread started by the first :meth:`apply_rules`, which the service
  calls after that reconcile: a process that died while the service was
  down is never published first and deleted after.
"""

import dataclasses as _dc
import logging as _logging
import threading as _threading

from . import abi as _abi
from . import config as _config
from .errors import ProcwatchError
from .hooks import HookEvent, HookRunner
from .journal import Event

__all__ = ("Operations", "RESTART_ONLY")

log = _logging.getLogger("procwatch")

# Config fields a running service cannot change: they are the table's and the
# socket's, and clients hold the table.
RESTART_ONLY = ("key", "slots", "backend", "rcvbuf", "group", "death_word_priority", "teardown_yield_ms", "etcd")

_HOOK_EVENTS = {Event.EXIT: "exit", Event.FOUND_DEAD: "found_dead", Event.HUNG: "hung"}


def _heartbeat_ms(rule):
    """The slot value a rule asks for: ms, 0 = none."""
    if rule is None or not rule.heartbeat:
        return 0
    return max(1, round(rule.heartbeat * 1000))


class Operations:
    """Rules, hooks and metrics of one service.

    ``config`` is the running :class:`procwatch.config.Config`; ``loader()``
    returns a fresh one (the file merged with the command line) or raises
    ConfigError, for SIGHUP.  ``table()`` returns the service's Table or
    None (metrics read ``used_slots()`` of it when scraped).
    """

    def __init__(self, config, stats, *, key, table, loader=None):
        self.config = config
        self.stats = stats
        self.key = key
        self._table = table
        self._loader = loader
        self._lock = _threading.Lock()     # apply_rules (registrations thread) vs reload (main)
        self.hooks = None
        self.metrics = None
        self.fleet = None       # fleet.Publisher when [etcd] is configured
        self._written = {}      # slot -> (pid, start_time, heartbeat ms we wrote; None: not ours)
        self._generation = None

    # -- start and stop -----------------------------------------------------------
    def start(self):
        """Bind the metrics port (a busy port fails start-up) and start the hook pool."""
        if self.config.metrics is not None:
            self.metrics = self._start_metrics(self.config.metrics)
        self.hooks = self._new_runner(self.config.hooks)
        if self.config.etcd is not None:
            from .fleet import Publisher
            self.fleet = Publisher(self.config.etcd, self._table, self.stats, self.publishable)

    def _new_runner(self, settings):
        return HookRunner(workers=settings.workers, queue=settings.queue,
                          timeout=settings.timeout, stats=self.stats)

    def _start_metrics(self, address):
        from . import metrics
        server = metrics.start(address, self.stats, self._used_slots)
        log.info("metrics on http://%s/metrics", _config.Address(address.host, server.port))
        return server

    def _used_slots(self):
        table = self._table()
        return table.used_slots() if table is not None else ()

    def close(self):
        """Stop serving metrics; drop (and count) queued hooks; wait briefly for running ones."""
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.hooks is not None:
            if not self.hooks.close(discard=True, timeout=2.0):
                log.warning("hooks: some hooks were still running at stop; they end at their timeouts")
            self.hooks = None

    # -- the detector's callback ---------------------------------------------------
    def on_end(self, event, w, fields):
        """Reporter callback: queue the rule's hook for ``event``, if any.  Never blocks."""
        if self.fleet is not None:
            self.fleet.on_end(event, w, fields)
        kind = _HOOK_EVENTS.get(event)
        runner = self.hooks
        if kind is None or runner is None:
            return
        cfg = self.config                   # one read: a reload swaps the whole object
        rule = _config.rule_for(cfg, w.name)
        argv = getattr(rule.hooks, "on_" + kind) if rule is not None else None
        if argv is None:
            return
        ev = HookEvent.from_fields(kind, w.name, w.pid, w.slot, fields, key=self.key)
        runner.submit(argv, ev, rule.hooks.timeout or cfg.hooks.timeout)

    def publishable(self, name):
        """False when the first rule matching ``name`` says ``publish = false``."""
        rule = _config.rule_for(self.config, name)
        return rule is None or rule.publish

    def hang_policy(self, name):
        """The heartbeat checker's :data:`~procwatch.heartbeat.HangPolicy` for ``name``."""
        from .heartbeat import HangPolicy
        p = _config.policy_for(self.config, name)
        return HangPolicy(_abi.HangAction[p.action.upper()], int(p.signal), p.max_misses,
                          _abi.HangAction[p.starved.upper()])

    # -- rules on registration ---------------------------------------------------------
    def apply_rules(self, watch, force=False):
        """Give each newly watched slot its rule's heartbeat if it registered without one.

        ``watch`` is the Reporter's Watchlist.  Only the entries adopted since the last call
        are looked at (Watchlist.take_adopted), not every watched one: with thousands live,
        a walk of them all per registration cost milliseconds (issue 16).  With ``force`` (a
        reload), every watched slot is looked at again: a slot still at 0, or at the value
        we wrote, takes the new rule's value.
        """
        if self.fleet is not None and not self.fleet.started:
            self.fleet.start()
        with self._lock:
            fresh = watch.take_adopted()
            if force:
                fresh = watch.entries()
            if watch.generation != self._generation:
                self._generation = watch.generation
                if self.fleet is not None:
                    self.fleet.kick()
            if not fresh:
                return
            table = self._table()
            if table is None:
                return
            cfg = self.config
            written = self._written         # slot -> (pid, start_time, ms we wrote or None): bounded by slots
            for w in fresh:
                ident = (w.pid, w.start_time)
                seen = written.get(w.slot)
                if seen is not None and seen[:2] == ident and not force:
                    continue
                ours = seen[2] if seen is not None and seen[:2] == ident else None
                current = table.heartbeat_ms(w.slot)
                if current and current != ours:
                    written[w.slot] = (*ident, None)        # the client's own interval
                    continue
                rule = _config.rule_for(cfg, w.name)
                want = _heartbeat_ms(rule)
                if want != current:
                    if not table.set_rule_heartbeat(w.slot, w.pid, want):
                        continue                    # ended meanwhile
                    if want:
                        log.info("%s (pid %d): heartbeat %g s from rule %r (it registered without one)",
                                 w.name, w.pid, want / 1000, rule.name)
                    else:
                        log.info("%s (pid %d): heartbeat off (no rule gives one any more)", w.name, w.pid)
                written[w.slot] = (*ident, want or None)

    # -- SIGHUP ---------------------------------------------------------------------------
    def reload(self, watch=None):
        """Re-read the configuration; returns the new Config, or None if refused.

        Everything that can fail is tried before anything changes, so a
        refused reload leaves the service exactly as it was.
        """
        if self._loader is None:
            log.warning("SIGHUP: this service was started without a configuration loader; nothing reloaded")
            return None
        old = self.config
        try:
            new = self._loader()
        except _config.ConfigError as err:
            log.error("configuration reload refused, the old settings stay: %s", err)
            return None
        source = new.path or "built-in defaults"
        for name in RESTART_ONLY:
            wanted, running = getattr(new, name), getattr(old, name)
            if wanted != running:
                log.warning("configuration: %s = %s in %s needs a restart; still running with %s",
                            name, _show(name, wanted), source, _show(name, running))
        new = _dc.replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})

        metrics = self.metrics
        if new.metrics != old.metrics:
            try:
                metrics = self._start_metrics(new.metrics) if new.metrics is not None else None
            except ProcwatchError as err:   # MetricsUnavailable: port busy, prometheus_client missing
                log.error("configuration reload refused, the old settings stay: %s", err)
                return None
            if self.metrics is not None:
                self.metrics.close()
            if metrics is None:
                log.info("metrics off")
        self.metrics = metrics

        if new.hooks.workers != old.hooks.workers or new.hooks.queue != old.hooks.queue:
            previous, self.hooks = self.hooks, self._new_runner(new.hooks)
            if previous is not None:        # its queued hooks still run, then its workers end
                _threading.Thread(target=previous.close, name="procwatch-hooks-retire",
                                  daemon=True).start()
        elif self.hooks is not None:
            self.hooks.timeout = new.hooks.timeout
        _logging.getLogger("procwatch").setLevel(new.log_level.upper())
        with self._lock:
            self.config = new
        if watch is not None:
            self.apply_rules(watch, force=True)
        changed = [f.name for f in _dc.fields(new) if f.name != "path"
                   and getattr(new, f.name) != getattr(old, f.name)]
        log.info("configuration reloaded from %s: %s", source,
                 "changed " + ", ".join(changed) if changed else "no changes")
        return new


def _show(name, value):
    if name == "key" and isinstance(value, int):
        return f"{value:#010x}"
    return "default" if value is None else str(value)
