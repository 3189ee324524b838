"""procwatch's own measurements: the plug-in point for scripts/bench.

Issue 7 asks for five measurements of procwatch, each next to the
baselines of the same run:

1. kill -> a peer sees the PID word turn 0 (a peer blocked in
   ``procwatch.Peer.wait_exit`` and a C futex waiter on the slot word):
   ``observers()`` returns ``latency.Observer``s that the kill harness runs
   beside the baselines, idle and under storm.
2. kernel event timestamp -> slot zeroed, from the slot's ``latency_us``.
3. capacity: highest exit rate with no registered exit lost, service CPU µs
   per unrelated exit (/proc/PID/stat utime+stime delta / exits), overflows.
4. ns per ``Peer.pid`` / ``Peer.alive`` / ``Registration.beat()``.
5. service RSS and start -> ready ms, 1024 vs 65536 slots.

They need the core modules (``CORE_MODULES``).  Until those exist in the
tree being benchmarked every measurement is reported as not measured, with
the reason, so the report keeps its shape.
"""

import importlib.util as _ilu

CORE_MODULES = ("procwatch.abi", "procwatch.segment", "procwatch.client",
                "procwatch.futex", "procwatch.service", "procwatch.cli")


def missing_modules():
    """Core modules this tree does not have yet."""
    out = []
    for name in CORE_MODULES:
        try:
            if _ilu.find_spec(name) is None:
                out.append(name)
        except ModuleNotFoundError:
            out.append(name)
    return out


def _why_not():
    missing = missing_modules()
    return f"not measured: procwatch core is not in this tree (missing {', '.join(missing)})" if missing else None


def observers(ctx):
    """procwatch observers for the kill -> peer-sees-0 rows (measurement 1)."""
    if _why_not():
        return []
    return []       # phase 2: Peer.wait_exit peer and C futex waiter, with the service running


def notes_for_latency(ctx):
    why = _why_not()
    return [f"procwatch rows {why}"] if why else []


def sections(ctx):
    """Measurements 2-5 as report sections."""
    why = _why_not()
    titles = [
        ("pw_kernel_to_zero", "procwatch: kernel event timestamp -> slot zeroed"),
        ("pw_capacity", "procwatch: capacity under exit storms"),
        ("pw_peer_side", "procwatch: peer-side cost"),
        ("pw_footprint", "procwatch: footprint"),
    ]
    if why:
        return [{"id": sid, "title": title, "columns": [], "rows": [], "notes": [why]} for sid, title in titles]
    return []       # phase 2
