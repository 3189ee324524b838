"""Publish liveness to etcd, and revoke it the moment a process dies (issue 17).

Peers on other hosts cannot read our slot table, and every distributed
engine they could use learns of a crash by a timeout: an etcd lease's TTL
(about 2 s at least), a Consul or ZooKeeper session, Kubernetes probes.
They wait because they cannot tell a dead process from a slow network.
The service can: it sees the death on the host itself.  So it publishes
each registered process to etcd under a lease, and deletes the key as soon
as the process is gone; the lease's TTL then only covers the service or
the whole host going away.

Keys (``prefix`` and ``host`` from the ``[etcd]`` table)::

    <prefix><host>/<name>         {"pid", "start_time", "state", "heartbeat_ms", "since", "slot"}
                                  on the service's lease (TTL ``ttl``, kept alive)
    <prefix>ended/<host>/<name>   {"pid", "start_time", "event", "cause", "exit_code", "signal",
                                   "core_dumped", "time", "latency_us"}
                                  on a lease of its own (TTL ``ended_ttl``, never kept alive)

A death is one transaction: delete the live key and put the ended record,
so a watcher that sees the delete reads how it ended at that revision.

The hazard is the detection path.  etcd can be slow, partitioned, or down,
and none of that may delay a zeroed word by a microsecond.  So the
detector's side (:meth:`Publisher.on_end`, called after the word is zeroed,
the waiters woken and the exit logged) only does ``put_nowait`` on a
bounded queue.  A full queue drops the update, counts it
(``procwatch_etcd_dropped_total``) and logs once per burst.  One publisher
thread owns the etcd client and does everything else:

* on connect (and on every reconnect) it re-grants or refreshes the lease
  and reconciles ``<prefix><host>/`` with the table *before* anything else:
  the live processes are (re)put, keys of processes the table no longer
  holds are deleted, with their ended record when the slot still says how
  the process ended.  A dropped update is made up the same way by the sync
  that runs every ``sync_interval`` (1 s): a drop delays a delete by up to that and can
  lose an ended record (when the slot was reused meanwhile), never leave a
  stale live key;
* while etcd is unreachable it logs once, keeps nothing but the lease id,
  and retries with a short backoff; detection goes on untouched;
* it keeps the lease alive every ``ttl / 3`` s.

Only a process whose rule says ``publish = false`` stays local.  The etcd
client library (``etcd-sdk-python``, imported as ``pyetcd``; the
``procwatch[etcd]`` extra) is imported only when the ``[etcd]`` table is
present, or by the ``fleet`` and ``wait HOST/NAME`` commands.
"""

import json as _json
import logging as _logging
import os as _os
import queue as _queue
import socket as _socket
import threading as _threading
import time as _time

from . import abi as _abi
from .errors import ProcwatchError
from .journal import Event as _Event
from .signals import decode_status as _decode_status
from .signals import signal_name as _signal_name

__all__ = ("EtcdUnavailable", "EtcdAuthFailed", "EtcdCredentials", "Publisher", "connect",
           "live_key", "ended_key", "host_of", "check_files")

log = _logging.getLogger("procwatch")

RPC_TIMEOUT = 2.0            # s for one etcd call before the endpoint counts as down
RETRY_MIN, RETRY_MAX = 0.1, 2.0     # s between reconnect attempts (doubling)
# gRPC's own reconnect backoff grows to 120 s by default: a restarted etcd
# would then be used again minutes late.  Ours is the retry above.
_GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 1000)]
_LIVE_STATES = (_abi.State.ALIVE, _abi.State.HUNG)


# -- errors --------------------------------------------------------------------

class EtcdUnavailable(ProcwatchError):
    """No etcd endpoint answers (down, wrong address, TLS mismatch), or no client library."""
    __module__ = "procwatch"

    def __init__(self, endpoints, why, fix="check [etcd] endpoints and that etcd runs"):
        self.endpoints, self.why, self.fix = tuple(endpoints), why, fix
        super().__init__(self.endpoints, why, fix)

    def __str__(self):
        return f"etcd at {', '.join(self.endpoints)} is unavailable: {self.why}: {self.fix}"


class EtcdAuthFailed(ProcwatchError):
    """etcd refused our user, password or permissions."""
    __module__ = "procwatch"

    def __init__(self, user, why, fix):
        self.user, self.why, self.fix = user, why, fix
        super().__init__(user, why, fix)

    def __str__(self):
        who = f"user {self.user!r}" if self.user else "no user"
        return f"etcd refused {who}: {self.why}: {self.fix}"


class EtcdCredentials(ProcwatchError):
    """A certificate, key or password file of the [etcd] table cannot be read."""
    __module__ = "procwatch"

    def __init__(self, what, path, why):
        self.what, self.path, self.why = what, path, why
        super().__init__(what, path, why)

    def __str__(self):
        return f"cannot read the etcd {self.what} {self.path}: {self.why}: fix [etcd] {self.what}"


# -- keys and values -------------------------------------------------------------

def host_of(settings):
    return settings.host or _socket.gethostname()


def live_key(settings, name, host=None):
    return f"{settings.prefix}{host or host_of(settings)}/{name}"


def ended_key(settings, name, host=None):
    return f"{settings.prefix}ended/{host or host_of(settings)}/{name}"


def split_key(prefix, key):
    """(ended, host, name) of a key under ``prefix``, or None for anything else."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    ended = rest.startswith("ended/")
    if ended:
        rest = rest[len("ended/"):]
    host, sep, name = rest.partition("/")
    if not sep or not host or not name:
        return None
    return ended, host, name


def _dumps(value):
    return _json.dumps(value, sort_keys=True, separators=(",", ":"))


def live_value(slot):
    """The JSON value of a live key, from a segment.Slot."""
    hung = slot.state == _abi.State.HUNG
    since_ns = (slot.last_beat_ns or slot.registered_ns) if hung else slot.registered_ns
    return {"pid": slot.pid, "start_time": slot.start_time, "slot": slot.index,
            "state": "hung" if hung else "alive", "heartbeat_ms": slot.heartbeat_ms,
            "since": round(since_ns / 1e9, 6)}


def ended_value(pid, start_time, event, cause, status=None, time_ns=None, latency_us=None,
                exit_code=None, signal=None, core_dumped=False):
    """The JSON value of an ended record; ``status`` is a wait(2) status (-1/None: unknown)."""
    if status is not None and status >= 0:
        exit_code, signum, core = _decode_status(status)
        if signum is not None:
            signal, core_dumped = _signal_name(signum, "{}"), core
    if latency_us == _abi.LATENCY_UNKNOWN:
        latency_us = None
    return {"pid": pid, "start_time": start_time, "event": event, "cause": cause,
            "exit_code": exit_code, "signal": signal, "core_dumped": bool(core_dumped),
            "time": round((time_ns or _time.time_ns()) / 1e9, 6), "latency_us": latency_us}


def describe_ended(name, record):
    """One line for an ended record, as the local 'wait' prints it."""
    who = f"{name} (pid {record.get('pid')})"
    cause = record.get("cause")
    if record.get("event") == "unregistered" or cause == "unregistered":
        return f"{who} unregistered"
    if record.get("event") == "found_dead":
        return f"{who} found dead ({(cause or 'found_dead').replace('_', ' ')}); exit status unknown"
    if record.get("signal"):
        text = f"killed by {record['signal']}" + (" (core dumped)" if record.get("core_dumped") else "")
    elif record.get("exit_code") is not None:
        text = f"exited with code {record['exit_code']}"
    else:
        text = "ended (status unknown)"
    if cause == "killed_hung":
        text = f"was hung and procwatch ended it: {text}"
    return f"{who} {text}"


# -- the client ----------------------------------------------------------------------

def _read(what, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise EtcdCredentials(what, path, e.strerror or str(e)) from None


def check_files(settings):
    """Read every file the [etcd] table names (check-config); EtcdCredentials if one fails."""
    for what in ("ca_cert", "cert", "key", "password_file"):
        path = getattr(settings, what)
        if path is not None:
            data = _read(what, path)
            if what == "password_file" and not data.strip():
                raise EtcdCredentials(what, path, "the file is empty")


def _password(settings):
    if settings.password_file is None:
        return None
    # One line; a trailing newline (echo pw > file) is not part of it.
    return _read("password_file", settings.password_file).decode("utf-8", "replace").rstrip("\r\n")


def translate(exc, settings):
    """A ProcwatchError for an exception of the etcd client, or None if it is not one."""
    import grpc
    from pyetcd import exceptions as ex
    eps = settings.endpoints
    if isinstance(exc, (ex.ConnectionFailedError, ex.ConnectionTimeoutError)):
        why = "no answer" if isinstance(exc, ex.ConnectionTimeoutError) else "connection failed"
        cause = exc.__context__         # the library raises its own type inside 'except RpcError'
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "details") and cause.details():
            why = cause.details().splitlines()[0]
        return EtcdUnavailable(eps, why)
    if isinstance(exc, ex.Etcd3Exception):
        return EtcdUnavailable(eps, f"{type(exc).__name__}", "see the etcd server's log")
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else "") or str(code)
        details = details.splitlines()[0] if details else str(code)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EtcdUnavailable(eps, details)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return EtcdAuthFailed(settings.user, details,
                                  f"grant the user read and write on {settings.prefix!r} (etcdctl role grant-permission)")
        if "auth" in details or "user name" in details or "password" in details or \
                code == grpc.StatusCode.UNAUTHENTICATED:
            fix = ("check [etcd] user and password_file" if settings.user else
                   "this etcd has authentication on: set [etcd] user and password_file")
            return EtcdAuthFailed(settings.user, details, fix)
        return EtcdUnavailable(eps, details, "see the etcd server's log")
    return None


_next_endpoint = 0


def connect(settings, timeout=RPC_TIMEOUT):
    """A connected etcd client for ``settings`` (config.EtcdSettings).

    Tries the endpoints one after the other, starting after the one used
    last, and returns a client of the first that answers one read under the
    prefix: a wrong address, TLS setting, user, password or permission is
    one ProcwatchError here, not a surprise later.  A client serves one
    endpoint; when it fails, the publisher drops it and connects again,
    which moves on to the next endpoint (that is our failover).
    """
    global _next_endpoint
    # gRPC's C core logs TLS and connection failures to stderr on its own; we
    # report each failure as one line, so it stays quiet unless asked.
    _os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import grpc
        import pyetcd
        from pyetcd.client import Endpoint, MultiEndpointEtcd3Client
    except ImportError as e:
        raise EtcdUnavailable(settings.endpoints, f"the etcd client library is missing ({e})",
                              "install it: pip install 'procwatch[etcd]'") from None
    creds = None
    if settings.ca_cert or settings.cert or any(u.startswith("https://") for u in settings.endpoints):
        creds = grpc.ssl_channel_credentials(
            _read("ca_cert", settings.ca_cert) if settings.ca_cert else None,
            _read("key", settings.key) if settings.key else None,
            _read("cert", settings.cert) if settings.cert else None)
    password = _password(settings)
    urls = settings.endpoints
    first = _next_endpoint % len(urls)
    error = None
    try:
        for url in urls[first:] + urls[:first]:
            scheme, _, netloc = url.partition("://")
            host, _, port = netloc.rstrip("/").rpartition(":")
            # time_retry=0: the library would otherwise shun a failed endpoint for 300 s;
            # our own loop spaces the retries.
            ep = Endpoint(host.strip("[]"), int(port), secure=scheme == "https",
                          creds=creds if scheme == "https" else None, time_retry=0, opts=_GRPC_OPTIONS)
            try:
                client = MultiEndpointEtcd3Client(endpoints=[ep], timeout=timeout, user=settings.user,
                                                  password=password)
                if scheme != "https":
                    # gRPC sends call credentials over TLS only; the token also goes as the
                    # 'token' metadata, which is what etcd reads (as etcdctl does over http).
                    client.call_credentials = None
                client.get(settings.prefix)
            except (grpc.RpcError, pyetcd.exceptions.Etcd3Exception) as e:
                ep.close()
                error = translate(e, settings)
                if not isinstance(error, EtcdUnavailable):
                    raise error from None      # credentials or permissions: the same everywhere
                continue
            _next_endpoint = urls.index(url)
            return client
    finally:
        del password
    raise error


def close(client):
    try:
        client.close()
    except Exception:       # noqa: BLE001  (closing a channel that is already broken)
        pass


def _record_from_slot(slot, pid, start_time):
    """The ended record of (pid, start_time) from what the table says of its end, or None
    when the slot has moved on (reused) or does not say."""
    if slot.start_time != start_time or slot.state not in _ENDED_EVENTS:
        return None
    status = slot.exit_status if slot.state == _abi.State.EXITED else None
    return ended_value(pid, start_time, _ENDED_EVENTS[slot.state], slot.cause_name, status,
                       slot.exit_time_ns, slot.latency_us)


_ENDED_EVENTS = {_abi.State.EXITED: "exit", _abi.State.FOUND_DEAD: "found_dead",
                 _abi.State.UNREGISTERED: "unregistered"}


# -- the publisher ---------------------------------------------------------------------

class _End:
    """An end as the reporter saw it; its record is built in the publisher thread."""
    __slots__ = ("name", "pid", "start_time", "kind", "fields", "time_ns")

    def __init__(self, name, pid, start_time, kind, fields, time_ns):
        self.name, self.pid, self.start_time = name, pid, start_time
        self.kind, self.fields, self.time_ns = kind, fields, time_ns

    def record(self):
        f = self.fields
        return ended_value(self.pid, self.start_time, self.kind, f.get("CAUSE"), time_ns=self.time_ns,
                           latency_us=f.get("LATENCY_US"), exit_code=f.get("EXIT_CODE"),
                           signal=f.get("SIGNAL"), core_dumped=f.get("CORE_DUMPED"))


_SYNC = "sync"
_STOP = "stop"
_END_KINDS = {_Event.EXIT: "exit", _Event.FOUND_DEAD: "found_dead"}


class Publisher:
    """The publisher thread and its bounded queue.

    ``table()`` returns the service's Table (None until it is open),
    ``publishable(name)`` says whether a name's rule lets it be published.
    """

    def __init__(self, settings, table, stats, publishable=lambda name: True):
        self.settings = settings
        self.host = host_of(settings)
        self.prefix = f"{settings.prefix}{self.host}/"
        self._table = table
        self._publishable = publishable
        self.stats = stats
        self._queue = _queue.Queue(maxsize=settings.queue)
        self._sync_queued = False
        self._dropped_unlogged = 0
        self._drops_logged = False      # this burst of drops has had its log line
        self._drop_lock = _threading.Lock()
        self._client = None
        self._lease = None              # id of the live keys' lease
        self._ended_lease = None        # (id, monotonic time granted)
        self._published = {}            # name -> (pid, start_time, slot, value json)
        self._retry = None              # an _End that failed with etcd, done after the reconnect
        self._up = None                 # None: never tried; False: down (logged); True: up
        self._stop = _threading.Event()
        self._thread = _threading.Thread(target=self._run, name="procwatch-etcd", daemon=True)
        stats.etcd_up = 0

    # -- the service's side: never blocks --------------------------------------------
    @property
    def started(self):
        return self._thread.ident is not None

    def start(self):
        self._thread.start()

    def on_end(self, event, w, fields):
        """Reporter/checker callback, after the word is zeroed: queue the update, never wait."""
        if event == _Event.HUNG:
            self.kick()
            return
        kind = _END_KINDS.get(event)
        if kind is not None:
            self._put(_End(w.name, w.pid, getattr(w, "start_time", None), kind, fields, _time.time_ns()))

    def kick(self):
        """The table changed (a registration, a hang): compare and publish soon."""
        if not self._sync_queued:
            self._sync_queued = True
            if not self._put(_SYNC):
                self._sync_queued = False

    def _put(self, item):
        try:
            self._queue.put_nowait(item)
            if self._drops_logged:          # room again: the next drop starts a new burst
                self._drops_logged = False
            return True
        except _queue.Full:
            self.stats.record_etcd_dropped()
            with self._drop_lock:
                self._dropped_unlogged += 1
            return False

    def stop(self, timeout=2.0):
        """End the thread.  The lease is left to expire: a restart within ``ttl``
        re-adopts the keys (a put, not a delete, for watchers)."""
        self._stop.set()
        try:
            self._queue.put_nowait(_STOP)   # after the ends already queued: they still go out
        except _queue.Full:
            pass                            # the thread sees _stop within a second
        if self.started:
            self._thread.join(timeout)
        if self._client is not None:
            close(self._client)
            self._client = None

    # -- the publisher thread --------------------------------------------------------------
    def _run(self):
        delay = RETRY_MIN
        next_keepalive = next_sync = 0.0
        while not self._stop.is_set():
            if self._client is None:
                try:
                    self._connect()
                except ProcwatchError as e:
                    self._down(e)
                    self._log_drops()
                    self._stop.wait(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_MIN
                now = _time.monotonic()
                next_keepalive, next_sync = now + self.settings.ttl / 3, now + self.settings.sync_interval
            item, self._retry = self._retry, None
            if item is None:
                wait = max(0.0, min(next_keepalive, next_sync) - _time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except _queue.Empty:
                    item = None
            if item is _STOP:
                return
            self._log_drops()
            try:
                if isinstance(item, _End):
                    self._end(item)
                elif item is _SYNC:
                    self._sync_queued = False
                    self._sync()
                now = _time.monotonic()
                if now >= next_keepalive:
                    self._keepalive()
                    next_keepalive = now + self.settings.ttl / 3
                if now >= next_sync:
                    self._sync()
                    self._rotate_ended_lease()
                    next_sync = now + self.settings.sync_interval
            except Exception as e:      # noqa: BLE001  (only the etcd client's errors are handled)
                err = self._etcd_error(e)
                if err is None:         # a bug: keep its traceback, and say publishing stopped
                    self.stats.etcd_up = 0
                    log.error("etcd: the publisher thread failed; nothing is published until a restart",
                              exc_info=True, extra={"PROCWATCH_EVENT": "etcd_failed"})
                    raise
                if isinstance(item, _End):
                    self._retry = item
                self._down(err)

    def _etcd_error(self, exc):
        try:
            return translate(exc, self.settings)
        except ImportError:
            return None

    def _down(self, err):
        if self._client is not None:
            close(self._client)
            self._client = None
        self.stats.etcd_up = 0
        if self._up is not False:
            self._up = False
            log.warning("etcd: %s; publishing paused, exit detection goes on; retrying", err,
                        extra={"PROCWATCH_EVENT": "etcd_down"})

    def _log_drops(self):
        with self._drop_lock:
            n, self._dropped_unlogged = self._dropped_unlogged, 0
        if n and not self._drops_logged:
            self._drops_logged = True
            log.warning("etcd: dropping updates: more than %d waiting for etcd (%d dropped so far); "
                        "the periodic sync makes them up from the table (an ended record is lost "
                        "if its slot was reused meanwhile); raise [etcd] queue", self.settings.queue, self.stats.etcd_dropped,
                        extra={"PROCWATCH_EVENT": "etcd_dropped"})

    # -- etcd operations (publisher thread only) ------------------------------------------
    def _connect(self):
        """Connect, get a lease, then reconcile the host's prefix with the table."""
        if self._table() is None:
            raise EtcdUnavailable(self.settings.endpoints, "the slot table is not open yet", "wait")
        client = connect(self.settings)
        self._client = client
        try:
            lease = None
            if self._lease is not None:     # etcd restarted, or we were cut off: is it still ours?
                ttl = [r.TTL for r in client.refresh_lease(self._lease)]
                lease = self._lease if ttl and ttl[0] > 0 else None
            if lease is None:
                lease = client.lease(self.settings.ttl).id
            self._lease = lease
            self._ended_lease = None
            self._rotate_ended_lease()
            published, deleted = self._reconcile()
        except Exception:
            self._client = None
            close(client)
            raise
        self.stats.etcd_up = 1
        was, self._up = self._up, True
        log.info("etcd: %s %s as host %r: %d published, %d stale deleted",
                 "reconnected to" if was is False else "publishing to",
                 ", ".join(self.settings.endpoints), self.host, published, deleted,
                 extra={"PROCWATCH_EVENT": "etcd_up"})

    def _rotate_ended_lease(self):
        """Ended records hang on a lease granted at most ended_ttl/10 s ago, never kept alive:
        each record lives between 0.9 and 1.0 times ended_ttl, at one grant per period."""
        ttl = self.settings.ended_ttl
        now = _time.monotonic()
        if self._ended_lease is None or now - self._ended_lease[1] >= ttl / 10:
            self._ended_lease = (self._client.lease(ttl).id, now)

    def _desired(self):
        """name -> Slot of every alive or hung, publishable slot of the table."""
        want = {}
        for s in self._table().used_slots():
            if s.pid and s.state in _LIVE_STATES and self._publishable(s.name):
                old = want.get(s.name)
                if old is None or s.registered_ns > old.registered_ns:
                    want[s.name] = s
        return want

    def _reconcile(self):
        """Make ``<prefix><host>/`` hold exactly the table's live processes, on our lease."""
        c = self._client
        there = {}
        for value, meta in c.get_prefix(self.prefix):
            name = meta.key.decode("utf-8", "replace")[len(self.prefix):]
            there[name] = (value, meta.lease_id)
        want = self._desired()
        self._published = {}
        puts = deleted = 0
        table = self._table()
        for name, (value, lease) in there.items():
            if name not in want:
                # Ended while we could not tell etcd (etcd down, service down): the
                # table still says how, if the slot was not reused since.
                record = None
                try:
                    v = _json.loads(value)
                    if 0 <= v["slot"] < table.slot_count:
                        record = _record_from_slot(table.read_slot(v["slot"]), v["pid"], v["start_time"])
                except (ValueError, KeyError, TypeError):
                    pass
                self._delete(name, record)
                deleted += 1
        for name, s in want.items():
            text = _dumps(live_value(s))
            current = there.get(name)
            if current is None or current[0].decode("utf-8", "replace") != text or current[1] != self._lease:
                c.put(self.prefix + name, text, lease=self._lease)
                puts += 1
                self.stats.record_etcd("put")
            self._published[name] = (s.pid, s.start_time, s.index, text)
        return puts, deleted

    def _sync(self):
        """Publish what changed in the table since the last look (registrations, hangs,
        recoveries, ends whose update was dropped, unregistrations)."""
        want = self._desired()
        c = self._client
        table = self._table()
        for name, (pid, start, slot, text) in list(self._published.items()):
            s = want.get(name)
            if s is not None and (s.pid, s.start_time) == (pid, start):
                continue
            now = table.read_slot(slot)
            if now.pid == pid and now.start_time == start and now.state in _LIVE_STATES:
                continue        # still live: unpublishable since a reload; handled below
            if now.state in _LIVE_STATES and now.start_time == start:
                # Word zeroed, end not recorded yet (a hang kill leaves the state HUNG until
                # then): the reporter's update follows with the record.  Deleting here would
                # delete without an ended record, and the update would find nothing to end.
                continue
            self._delete(name, _record_from_slot(now, pid, start))
        for name, s in want.items():
            text = _dumps(live_value(s))
            old = self._published.get(name)
            if old is not None and old[3] == text:
                continue
            c.put(self.prefix + name, text, lease=self._lease)
            self.stats.record_etcd("put")
            self._published[name] = (s.pid, s.start_time, s.index, text)
        for name in list(self._published):
            if name not in want:        # publish = false since a reload, or a slot reused
                s = self._published[name]
                now = table.read_slot(s[2])
                if now.pid == s[0] and now.start_time == s[1] and now.state in _LIVE_STATES:
                    self._delete(name, None)

    def _end(self, item):
        """A death the reporter saw: delete the key and write how it ended, in one transaction."""
        pub = self._published.get(item.name)
        if pub is None or pub[0] != item.pid or (item.start_time is not None and pub[1] != item.start_time):
            return      # never published (publish = false, etcd was down), or a newer process owns the name
        self._delete(item.name, item.record())

    def _delete(self, name, record):
        c = self._client
        ops = [c.transactions.delete(self.prefix + name)]
        if record is not None:
            ops.append(c.transactions.put(ended_key(self.settings, name, self.host), _dumps(record),
                                          lease=self._ended_lease[0]))
        c.transaction(compare=[], success=ops, failure=[])
        self.stats.record_etcd("delete")
        self._published.pop(name, None)

    def _keepalive(self):
        ttl = [r.TTL for r in self._client.refresh_lease(self._lease)]
        if not ttl or ttl[0] <= 0:
            # The lease expired (etcd lost it, or we were cut off for longer than ttl):
            # a new one, and every key put again on it.
            log.warning("etcd: lease %x of host %r expired; publishing again on a new lease",
                        self._lease, self.host, extra={"PROCWATCH_EVENT": "etcd_lease_lost"})
            self._lease = self._client.lease(self.settings.ttl).id
            self._reconcile()
