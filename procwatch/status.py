"""The service and the table as ``procwatch status`` shows them: data for machines, text for people.

:func:`status_snapshot` reads the table once into plain data (the ``--json``
schema: :func:`slot_json` per used slot); :func:`format_status` renders
that for a terminal, and the live view (liveview.py) redraws it in place.
Reading never writes the table.  The command itself is statuscmd.py.
"""

import time as _time

from . import abi as _abi
from .errors import SegmentMissing
from .signals import decode_status, ends_process, signal_name


def slot_json(s, now_ns):
    """One row of ``status --json``'s "slots" for Slot ``s``."""
    status = s.exit_status if s.exit_status != _abi.EXIT_STATUS_UNKNOWN and s.state in (
        _abi.State.EXITED,) else None
    code, signum, core = decode_status(status)
    sig = signal_name(signum, "{}") if signum is not None else None
    ended = s.state in (_abi.State.EXITED, _abi.State.FOUND_DEAD, _abi.State.UNREGISTERED)
    return {
        "slot": s.index, "name": s.name, "pid": s.pid, "state": s.state_name,
        "since": (s.exit_time_ns if ended else s.registered_ns) / 1e9 or None,
        "cause": s.cause_name if ended else None,
        "exit_status": status, "exit_code": code, "signal": sig, "core_dumped": core,
        "latency_us": None if s.latency_us == _abi.LATENCY_UNKNOWN else s.latency_us,
        "detected_by": _enum_name(_abi.Detection, s.detected_by) if s.state == _abi.State.EXITED else None,
        "teardown_us": None if s.teardown_us == _abi.LATENCY_UNKNOWN or s.state != _abi.State.EXITED
        else s.teardown_us,
        "death_word": _enum_name(_abi.Arm, s.death_arm),
        "heartbeat_ms": s.heartbeat_ms,
        "misses": s.misses,
        "last_beat_age_s": round((now_ns - s.last_beat_ns) / 1e9, 3) if s.heartbeat_ms and s.last_beat_ns else None,
        "hang_action": _hang_action_name(s.heartbeat_action),
        # What the service really sends: a number no hang signal can be (junk
        # written into the slot) is ignored for the service's default, null.
        "hang_signal": signal_name(s.heartbeat_signal) if ends_process(s.heartbeat_signal) else None,
        "kill_sent": s.state == _abi.State.HUNG and s.cause == _abi.Cause.KILLED_HUNG,
        "verdict": s.verdict_name if s.state == _abi.State.HUNG or (
            ended and s.cause == _abi.Cause.KILLED_HUNG) else None,
    }


def _enum_name(enum, value):
    """An ABI value's name, lowercase: 'armed', 'death_word', 'watching' (or 'invalid(N)')."""
    try:
        return enum(value).name.lower()
    except ValueError:
        return f"invalid({value})"


# The head line's word on the death words, and the DEATH WORD column: armed, or why not.
_DEATH_WATCH_TEXT = {
    "watching": "death words watched",
    "no_waitv": "death words NOT watched (no futex_waitv: Linux < 5.16, or a seccomp filter): "
                "every slot connector-only",
    "no_atomics": "death words NOT watched (no procwatch._deathword, no libatomic): every slot connector-only",
    "off": "death words not watched yet",
}
_DEATH_WORD_TEXT = {
    "armed": "armed", "none": "connector-only (client did not arm)",
    "disarmed": "disarmed", "other_pid": "connector-only (registered for another pid)",
    "unavailable": "connector-only (client could not arm)", "preload": "arming (preload)",
    "not_preloadable": "connector-only (static or setuid program)",
    "lost": "connector-only (fired at execve)",
}


def _hang_action_name(value):
    """The slot's own hang action, or None for the service's default (which a value
    the service does not know also gets: abi.HangAction)."""
    try:
        action = _abi.HangAction(value)
    except ValueError:
        return None
    return None if action == _abi.HangAction.DEFAULT else action.name.lower()


def age_text(seconds):
    """'12 s ago', '5 min ago', '3 h ago', '2 d ago'; '-' for None."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def status_snapshot(key=None):
    """The data of ``procwatch status --json`` (None when no table exists)."""
    from . import client
    from .segment import Table
    try:
        table = Table.attach(key, readonly=True)
    except SegmentMissing:
        return None
    try:
        h = table.header()
        now_ns = _time.time_ns()
        alive = client.monitor_alive(table.key)
        try:
            backend = _abi.Backend(h["backend"]).name.lower()
        except ValueError:
            backend = f"invalid({h['backend']})"
        hot_step = None
        if alive:
            from . import native
            loaded = native.loaded_in(h["service_pid"])
            hot_step = None if loaded is None else "c" if loaded else "python"
        return {
            "key": f"{table.key:#010x}",
            "service": {"pid": h["service_pid"] or None, "alive": alive,
                        "backend": backend if alive else None, "heartbeat": h["service_heartbeat"],
                        "hot_step": hot_step,
                        "death_words": _enum_name(_abi.DeathWatch, h["death_watch"]) if alive else None},
            "slot_count": table.slot_count,
            "exits": h["exits"],
            "slots": [slot_json(s, now_ns) for s in table.used_slots()],
        }
    finally:
        table.detach()


def format_status(snap):
    svc = snap["service"]
    if svc["alive"]:
        head = f"procwatch: running, PID {svc['pid']}, {svc['backend']} backend"
        if svc.get("hot_step") == "c":
            head += ", native hot step"
        elif svc.get("hot_step") == "python":
            head += ", pure-Python hot step (the C extension is not loaded)"
        head += ", " + _DEATH_WATCH_TEXT.get(svc.get("death_words"), f"death words: {svc.get('death_words')}")
    else:
        head = "procwatch: NOT running" + (f" (last PID {svc['pid']})" if svc["pid"] else "")
    used = snap["slots"]
    live = sum(1 for s in used if s["state"] in ("alive", "hung"))
    lines = [head, f"table {snap['key']}: {live} live, {len(used)} used of {snap['slot_count']} slots, "
                   f"{snap['exits']} exits", ""]
    now = _time.time()
    # A service that cannot wait on death words (no futex_waitv) leaves armed slots connector-only too.
    unwatched = svc["alive"] and svc.get("death_words") not in ("watching", None)
    rows = [("SLOT", "NAME", "PID", "STATE", "SINCE", "LAST EXIT", "DEATH WORD", "BEAT")]
    for s in used:
        if s["signal"]:
            last = f"killed by {s['signal']}" + (" (core)" if s["core_dumped"] else "")
        elif s["exit_code"] is not None:
            last = f"exit code {s['exit_code']}"
        elif s["cause"]:
            last = s["cause"].replace("_", " ")
        else:
            last = "-"
        if s["cause"] == "killed_hung":
            last += ", hung" + (f" ({s['verdict']})" if s.get("verdict") else "")
        beat = "-"
        if s["heartbeat_ms"]:
            age = s["last_beat_age_s"]
            age = f"{age:.1f} s ago" if age is not None and age < 10 else age_text(age)
            beat = f"{s['heartbeat_ms'] / 1000:g}s/{age}/{s['misses']} missed"
            if s["hang_action"] or s["hang_signal"]:
                beat += f" ({s['hang_action'] or 'kill'}" + (f" {s['hang_signal']})" if s["hang_signal"] else ")")
            if s["kill_sent"]:
                beat += ", kill sent"
        if s.get("detected_by") == "death_word" and s.get("teardown_us") is not None:
            last += f" (death word, {s['teardown_us'] / 1000:.0f} ms before its pidfd)"
        state = s["state"] + (f" ({s['verdict']})" if s["state"] == "hung" and s.get("verdict") else "")
        word = _DEATH_WORD_TEXT.get(s.get("death_word"), s.get("death_word") or "-")
        if unwatched and s.get("death_word") == "armed":
            word = "connector-only (armed, not watched)"
        rows.append((str(s["slot"]), s["name"], str(s["pid"] or "-"), state,
                     age_text(now - s["since"]) if s["since"] else "-", last, word, beat))
    if len(rows) == 1:
        lines.append("no registered processes")
    else:
        widths = [max(display_width(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c + " " * (w - display_width(c)) for c, w in zip(r, widths)).rstrip()
                  for r in rows]
    return "\n".join(lines)


def display_width(text):
    """Terminal columns of ``text``: wide (CJK) characters take 2, combining marks 0.

    ``str.ljust`` counts characters, so a name in CJK pushed every later
    column of its row out of line (issue 13).
    """
    import unicodedata
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def cut_to_width(text, width):
    """``text`` cut to at most ``width`` terminal columns (see display_width)."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = display_width(c)
        if used + w > width:
            break
        out.append(c)
        used += w
    return "".join(out)
