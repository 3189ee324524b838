"""Beyond one machine (issue 17): kill -> an etcd watcher sees the key deleted.

Two rows on the same etcd server (loopback, started here, removed after):

* **procwatch + etcd**: a procwatch service with an ``[etcd]`` table; each
  target (csrc/target.c) is registered by PID, the harness waits until its
  key is in etcd, then kills it.  t0 right before kill(SIGKILL), t1 when
  the harness's etcd watch (a gRPC stream, the same client library) gets
  the DELETE of that key.  ``--etcd-kills`` samples (200 or more).
* **own lease at etcd's minimum TTL**: what users do without procwatch: each
  process grants a lease (asking for 1 s; etcd raises it to its minimum),
  puts its key on it and keeps it alive every TTL/3; a watcher learns of a
  death only when etcd expires the lease.  Each sample takes about the
  TTL, so this row has fewer samples (``--etcd-lease-samples``): the holders
  run at once and are killed one by one at random gaps, so that the kills
  do not line up with etcd's expiry sweep (every 500 ms).

Both t1s are taken by the same watcher in the harness process.
"""

import json as _json
import os as _os
import queue as _queue
import random as _random
import shutil as _shutil
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time

from . import procs as _procs
from . import pwsuite as _pwsuite
from . import report as _report

ROOT = _pwsuite.ROOT
HOST = "bench"

_HOLDER = r"""
import sys, threading, time, pyetcd
port, key = int(sys.argv[1]), sys.argv[2]
c = pyetcd.client(host="127.0.0.1", port=port, timeout=5)
lease = c.lease(1)                  # etcd raises it to its minimum TTL
c.put(key, "alive", lease=lease)
print("ready", lease.ttl, flush=True)
while True:                         # keep-alive every TTL/3, as etcd's own clients do
    time.sleep(lease.ttl / 3)
    list(c.refresh_lease(lease.id))
"""


def _etcdserver():
    """tests/etcdserver.py, the one place that starts a test etcd and finds its binaries."""
    sys_path = _os.path.join(ROOT, "tests")
    if sys_path not in _sys.path:
        _sys.path.insert(0, sys_path)
    import etcdserver
    return etcdserver


def why_not():
    """None if the rows can run, else why not (one line)."""
    tool = _etcdserver().etcd_tool
    if tool("etcd") is None or tool("etcdctl") is None:
        return "etcd is not unpacked (scripts/setup unpacks Debian's etcd-server and etcd-client into .venv/etcd)"
    try:
        import pyetcd  # noqa: F401
    except ImportError:
        return "the etcd client is not installed (pip install '.[etcd]'; scripts/setup does)"
    return None


class _Watch:
    """One prefix watch; DELETE and PUT events with their CLOCK_MONOTONIC arrival."""

    def __init__(self, client, prefix):
        self.events = _queue.Queue()
        client.add_watch_prefix_callback(prefix, self._on)

    def _on(self, resp):
        now = _time.monotonic_ns()
        for e in getattr(resp, "events", ()):
            self.events.put((type(e).__name__, e.key.decode(), now))

    def collect(self, kind, keys, timeout):
        """{key: arrival} of ``kind`` events on ``keys``, in whatever order they come."""
        seen, end = {}, _time.monotonic() + timeout
        while len(seen) < len(keys) and _time.monotonic() < end:
            try:
                k, got, t = self.events.get(timeout=max(0.0, end - _time.monotonic()))
            except _queue.Empty:
                break
            if k == kind and got in keys:
                seen.setdefault(got, t)
        return seen

    def wait_for(self, kind, key, timeout):
        end = _time.monotonic() + timeout
        while True:
            left = end - _time.monotonic()
            if left <= 0:
                return None
            try:
                k, got, t = self.events.get(timeout=left)
            except _queue.Empty:
                return None
            if k == kind and got == key:
                return t


def _target(bin_path):
    p = _subprocess.Popen([bin_path], stdout=_subprocess.PIPE, stdin=_subprocess.DEVNULL)
    _procs._track(p.pid, "target")
    if p.stdout.read(1) != b"r":
        raise _procs.HelperDied("target did not start")
    return p


def procwatch_row(ctx, etcd, kills):
    import procwatch
    import pyetcd
    prefix = "/pwbench/"
    cfg = _os.path.join(ctx.args.out, "etcd-bench.toml")
    with open(cfg, "w") as f:
        f.write(f'[etcd]\nendpoints = ["{etcd.url}"]\nprefix = "{prefix}"\nhost = "{HOST}"\nttl = 5\n')
    svc = _pwsuite.PwService(ctx.args.out, extra=("--config", cfg)).start()
    client = pyetcd.client(host="127.0.0.1", port=etcd.client_port, timeout=5)
    watch = _Watch(client, f"{prefix}{HOST}/")
    samples, lost = [], 0
    try:
        for i in range(kills):
            name = f"t{i}"
            key = f"{prefix}{HOST}/{name}"
            p = _target(ctx.bins["target"])
            reg = procwatch.register_pid(name, pid=p.pid, key=svc.key)
            if watch.wait_for("PutEvent", key, 5.0) is None:
                raise _procs.HelperDied(f"{name} was not published within 5 s")
            _pwsuite._service_asleep(svc.proc.pid, _pwsuite.SETTLE_S)
            t0 = _time.monotonic_ns()
            _os.kill(p.pid, _signal.SIGKILL)
            t1 = watch.wait_for("DeleteEvent", key, 5.0)
            p.wait()
            _procs._CHILDREN.pop(p.pid, None)
            reg.unregister()            # the word is 0 by now: this only detaches
            if t1 is None:
                lost += 1
            else:
                samples.append(t1 - t0)
        stats = svc.stop()
    finally:
        client.close()
        if svc.proc.poll() is None:
            svc.stop()
    return {"observer": "procwatch: the service deletes the key on the death", "kills": kills,
            "lost": lost, "ttl_s": 5, **_report.summarize_ns(samples),
            "note": f"service events={stats.get('events', '?')}"}


def lease_row(ctx, etcd, n):
    import pyetcd
    prefix = "/pwbench-lease/"
    client = pyetcd.client(host="127.0.0.1", port=etcd.client_port, timeout=5)
    watch = _Watch(client, prefix)
    holders = []
    samples, lost, ttl = [], 0, None
    try:
        for i in range(n):
            p = _subprocess.Popen([_sys.executable, "-c", _HOLDER, str(etcd.client_port), f"{prefix}{i}"],
                                  stdout=_subprocess.PIPE, stdin=_subprocess.DEVNULL, text=True)
            _procs._track(p.pid, "lease holder")
            holders.append(p)
        for p in holders:
            line = p.stdout.readline().split()
            if not line or line[0] != "ready":
                raise _procs.HelperDied(f"lease holder {p.pid} did not start")
            ttl = int(line[1])
        _time.sleep(ttl)                    # every holder past its first keep-alive
        kills = []
        for i in _random.sample(range(n), n):
            _time.sleep(_random.uniform(0, 0.25))
            t0 = _time.monotonic_ns()
            _os.kill(holders[i].pid, _signal.SIGKILL)
            kills.append((i, t0))
        seen = watch.collect("DeleteEvent", {f"{prefix}{i}" for i in range(n)}, ttl * 3 + 5)
        for i, t0 in kills:
            t1 = seen.get(f"{prefix}{i}")
            if t1 is None:
                lost += 1
            else:
                samples.append(t1 - t0)
    finally:
        for p in holders:
            if p.poll() is None:
                p.kill()
            p.wait()
            _procs._CHILDREN.pop(p.pid, None)
        client.close()
    return {"observer": f"own lease, TTL {ttl} s (etcd's minimum), kept alive every TTL/3", "kills": n,
            "lost": lost, "ttl_s": ttl, **_report.summarize_ns(samples)}


def section(ctx):
    """The report section; its rows, or a note saying why there are none."""
    title = "kill -> a watcher on another host's etcd key sees it deleted (µs, loopback etcd)"
    columns = [["observer", "observer"], ["kills", "kills"], ["lost", "lost"], ["p50_us", "p50"],
               ["p99_us", "p99"], ["max_us", "max"], ["ttl_s", "lease TTL s"]]
    why = why_not()
    if why or ctx.args.etcd_kills == 0:
        return {"id": "fleet_etcd", "title": title, "columns": columns, "rows": [],
                "notes": [why or "--etcd-kills 0: not measured"]}
    etcd = _etcdserver().EtcdServer(_os.path.join(ctx.args.out, "etcd"))
    _shutil.rmtree(etcd.data, ignore_errors=True)
    etcd.start()
    _procs._track(etcd.proc.pid, "etcd")
    try:
        print(f"bench: etcd: {ctx.args.etcd_kills} kills with procwatch publishing", file=_sys.stderr)
        rows = [procwatch_row(ctx, etcd, ctx.args.etcd_kills)]
        print(f"bench: etcd: {ctx.args.etcd_lease_samples} processes holding their own lease",
              file=_sys.stderr)
        rows.append(lease_row(ctx, etcd, ctx.args.etcd_lease_samples))
    finally:
        if etcd.proc is not None:
            _procs._CHILDREN.pop(etcd.proc.pid, None)
        etcd.remove()
    for r in rows:
        print(f"bench: {r['observer']}: n {r['n']}, p50 {r['p50_us']} µs, p99 {r['p99_us']} µs",
              file=_sys.stderr)
    a, b = rows
    ratio = round(b["p50_us"] / a["p50_us"]) if a["p50_us"] and b["p50_us"] else None
    return {"id": "fleet_etcd", "title": title, "columns": columns, "rows": rows,
            "notes": ["t0 right before kill(SIGKILL); t1 when the harness's etcd watch (gRPC stream, "
                      "etcd-sdk-python) receives the DELETE; etcd " + _etcd_version() + " on 127.0.0.1",
                      "the lease row has fewer samples: each takes about the TTL; its holders run at once "
                      "and are killed one by one at random gaps of 0-250 ms",
                      f"issue 17's target: procwatch p50 <= 5 ms on loopback, against >= 2 s for the lease "
                      f"pattern; lease p50 / procwatch p50 = {ratio}"]}


def _etcd_version():
    try:
        out = _subprocess.run([_etcdserver().etcd_tool("etcd"), "--version"], capture_output=True, text=True).stdout
        return out.split()[2]
    except (OSError, IndexError):
        return "?"
