"""``procwatch status --watch``: the status table, refreshed in place like top(1).

On a terminal the view takes the alternate screen (so the shell's screen
comes back on exit), hides the cursor, and redraws from the top-left corner
each refresh: every line is followed by "clear to end of line" and the
frame by "clear to end of screen", so nothing flickers and a shrinking
table leaves no stale rows.  The control sequences come from terminfo
(curses.setupterm / tigetstr), not hard-coded, so any $TERM with the
capabilities works.  States are coloured (alive green, hung yellow, ended
red, unregistered dim) unless $NO_COLOR is set (no-color.org).  Rows that do
not fit the terminal are cut, with a line saying how many.  ``q`` quits
(stdin in cbreak mode, restored on exit), and so does Ctrl-C.

When stdout is not a terminal (a pipe, a file, a CI log) there is no
terminfo and no colour: each refresh prints the plain ``procwatch status``
table followed by a blank line, flushed, so ``--count`` makes it a bounded
sampler.

The data is the same snapshot as ``procwatch status --json``, read from the
table each refresh; the view never writes to the table.
"""

import contextlib as _contextlib
import os as _os
import select as _select
import sys as _sys
import time as _time

from .status import cut_to_width, format_status, status_snapshot

__all__ = ("run", "render")

# State -> terminfo colour number (setaf): curses.COLOR_* values.
_GREEN, _YELLOW, _RED, _CYAN = 2, 3, 1, 6
_STATE_COLOURS = {"alive": _GREEN, "hung": _YELLOW, "exited": _RED, "found_dead": _RED,
                  "claiming": _CYAN, "unregistered": None}


def render(snap, key, interval, width, height, now=None, keys=True):
    """The frame as a list of (text, style) lines.

    ``style`` is a slot state name for a table row, ``header`` for the column
    titles, ``service-up``/``service-down`` for the service line, else None.

    ``snap`` is :func:`procwatch.status.status_snapshot` or None (no table).
    Lines are cut to ``width``; rows beyond ``height`` are cut with a note.
    ``keys``: say that q quits (not when nobody can type).
    """
    now = _time.time() if now is None else now
    title = (f"procwatch status  key {key:#010x}  every {interval:g} s  "
             f"{_time.strftime('%H:%M:%S', _time.localtime(now))}" + ("  (q quits)" if keys else ""))
    if snap is None:
        body = [f"no slot table at key {key:#010x}: the service is not running (waiting for it)"]
        lines = [(title, None), ("", None)] + [(b, None) for b in body]
    else:
        text = format_status(snap).splitlines()
        lines = [(title, None), ("", None)]
        # Rows follow snap["slots"] in order: their states come from there, not
        # from a column offset, which a wide (CJK) name shifts.
        states = None
        for line in text:
            if states is None and line.startswith("SLOT"):
                states = iter(s["state"] for s in snap["slots"])
                lines.append((line, "header"))
            elif states is not None and line:
                lines.append((line, next(states, None)))
            elif line.startswith("procwatch: "):
                lines.append((line, "service-up" if line.startswith("procwatch: running") else "service-down"))
            else:
                lines.append((line, None))
    if len(lines) > height:
        cut = len(lines) - (height - 1)
        lines = lines[:height - 1] + [(f"... {cut} more rows: enlarge the terminal", None)]
    return [(cut_to_width(text, width), state) for text, state in lines]


class _Screen:
    """Terminfo output for a terminal; None from :meth:`open` when unusable."""

    @classmethod
    def open(cls, out):
        try:
            import curses
            curses.setupterm(fd=out.fileno())
        except Exception:           # no terminfo entry for $TERM, no curses: plain output
            return None
        caps = {name: curses.tigetstr(name) or b"" for name in
                ("smcup", "rmcup", "civis", "cnorm", "home", "el", "ed", "sgr0", "bold", "dim")}
        if not caps["home"] or not caps["el"] or not caps["ed"]:
            return None
        self = cls()
        self.out, self.caps, self.curses = out, caps, curses
        self.setaf = curses.tigetstr("setaf")
        self.colour = bool(self.setaf) and curses.tigetnum("colors") >= 8 and not _os.environ.get("NO_COLOR")
        return self

    def _write(self, data):
        self.out.buffer.write(data)

    def enter(self):
        self._write(self.caps["smcup"] + self.caps["civis"])
        self.out.buffer.flush()

    def leave(self):
        self._write(self.caps["sgr0"] + self.caps["cnorm"] + self.caps["rmcup"])
        self.out.buffer.flush()

    def _styled(self, text, state, state_at):
        raw = text.encode("utf-8", "replace")
        if not self.colour or state is None:
            return raw
        if state == "header":
            return self.caps["bold"] + raw + self.caps["sgr0"]
        if state in ("service-up", "service-down"):
            colour = _GREEN if state == "service-up" else _RED
            return self.curses.tparm(self.setaf, colour) + raw + self.caps["sgr0"]
        if state_at is None or not text[state_at:].startswith(state):
            return raw
        colour = _STATE_COLOURS.get(state)
        start = self.caps["dim"] if colour is None else self.curses.tparm(self.setaf, colour)
        if state == "hung":
            start += self.caps["bold"]
        head, word, tail = text[:state_at], text[state_at:state_at + len(state)], text[state_at + len(state):]
        return (head.encode("utf-8", "replace") + start + word.encode() + self.caps["sgr0"]
                + tail.encode("utf-8", "replace"))

    def draw(self, lines):
        state_at = next((t.index("STATE") for t, s in lines if s == "header"), None)
        frame = self.caps["home"]
        for text, state in lines:
            frame += self._styled(text, state, state_at) + self.caps["el"] + b"\r\n"
        frame += self.caps["ed"]
        self._write(frame)
        self.out.buffer.flush()


@_contextlib.contextmanager
def _cbreak(stream):
    """stdin in cbreak mode (keys without Enter, Ctrl-C still a signal), if a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        yield None
        return
    if not _os.isatty(fd):
        yield None
        return
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(fd, seconds):
    """Sleep ``seconds``, or less if 'q' is pressed; True means quit."""
    deadline = _time.monotonic() + seconds
    while True:
        left = deadline - _time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            _time.sleep(left)
            return False
        if _select.select([fd], [], [], left)[0]:
            key = _os.read(fd, 32)
            if not key or b"q" in key.lower():
                return True


def _size(out):
    """(columns, lines) of the terminal now (it may have been resized)."""
    try:
        size = _os.get_terminal_size(out.fileno())
        return max(size.columns, 20), max(size.lines, 4)
    except OSError:
        return 80, 24


def run(key, interval=1.0, count=None, out=None, inp=None):
    """The live view; returns the exit status (0) when quit or after ``count`` refreshes."""
    out = out or _sys.stdout
    inp = inp or _sys.stdin
    screen = _Screen.open(out) if out.isatty() else None
    shown = 0
    try:
        with _cbreak(inp if screen is not None else None) as fd:
            if screen is not None:
                screen.enter()
            try:
                while True:
                    snap = status_snapshot(key)
                    if screen is not None:
                        columns, rows = _size(out)
                        # rows - 1: a newline after the last row would scroll the screen
                        screen.draw(render(snap, key, interval, columns, rows - 1, keys=fd is not None))
                    else:
                        lines = render(snap, key, interval, 1 << 16, 1 << 30, keys=False)
                        out.write("\n".join(t for t, _ in lines) + "\n\n")
                        out.flush()
                    shown += 1
                    if count is not None and shown >= count:
                        break
                    if _wait(fd, interval):
                        break
            finally:
                if screen is not None:
                    screen.leave()
    except KeyboardInterrupt:
        pass
    return 0
