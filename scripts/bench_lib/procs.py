"""Child processes of a bench run: started here, ended here, by PID.

Every process the bench starts is recorded in ``_CHILDREN`` and ended by
PID when the run ends, however it ends (``atexit``, and SIGTERM/SIGINT/SIGHUP
turned into ``SystemExit`` so that ``atexit`` runs).  The C helpers also
die with the bench (PR_SET_PDEATHSIG) and carry an ``alarm()``, so even a
SIGKILLed bench leaves nothing behind for long.

Also here: ``LineProc`` (a helper speaking a line protocol on its stdout,
read with deadlines), ``spawn_target`` and ``Storm`` (the fork storm).
"""

import atexit as _atexit
import errno as _errno
import os as _os
import selectors as _selectors
import signal as _signal
import subprocess as _subprocess
import time as _time

_CHILDREN = {}          # pid -> what, for the cleanup


def _track(pid, what):
    _CHILDREN[pid] = what


def reap(pid, timeout=2.0):
    """Wait for child ``pid`` (already signalled) for at most ``timeout`` s.

    Returns the wait status, or None if it did not end in time (it stays
    tracked and is SIGKILLed at exit).
    """
    end = _time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            got, status = _os.waitpid(pid, _os.WNOHANG)
        except ChildProcessError:
            _CHILDREN.pop(pid, None)
            return None
        if got == pid:
            _CHILDREN.pop(pid, None)
            return status
        if _time.monotonic() >= end:
            return None
        _time.sleep(delay)
        delay = min(delay * 2, 0.05)


def end_all():
    """SIGKILL and reap every child still tracked (bounded: 2 s each at most)."""
    for pid in list(_CHILDREN):
        try:
            _os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap(pid, timeout=2.0)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def install_cleanup():
    _atexit.register(end_all)
    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(sig, _on_signal)


def cpu_us(pid, procfs="/proc"):
    """utime + stime of ``pid`` in µs (/proc/PID/stat fields 14, 15), or None if gone."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1_000_000 // _os.sysconf("SC_CLK_TCK")


class HelperDied(Exception):
    """A helper process ended or said something unexpected."""


class LineProc:
    """A helper process read line by line, each read with a deadline."""

    def __init__(self, argv, name=None, stdin=True):
        self.name = name or _os.path.basename(argv[0])
        self.proc = _subprocess.Popen(argv, stdin=_subprocess.PIPE if stdin else _subprocess.DEVNULL,
                                      stdout=_subprocess.PIPE, bufsize=0)
        _track(self.proc.pid, self.name)
        self.pid = self.proc.pid
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._sel = _selectors.DefaultSelector()
        self._sel.register(self._fd, _selectors.EVENT_READ)
        self._eof = False

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")

    def readline(self, timeout):
        """Next line (str, without newline), or None after ``timeout`` s or at EOF."""
        end = _time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                return None
            left = end - _time.monotonic()
            if left <= 0 or not self._sel.select(left):
                return None
            chunk = _os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix, timeout):
        """Read lines until one starts with ``prefix``; HelperDied if none in time."""
        end = _time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, end - _time.monotonic()))
            if line is None:
                raise HelperDied(f"{self.name} (pid {self.pid}) did not say '{prefix}' within {timeout} s")
            if line.startswith(prefix):
                return line

    def stop(self, how="eof", timeout=5.0):
        """End the helper (close stdin, or SIGTERM) and return its last line
        starting with 'stats' or 'storm' as a dict of key=value, or {}."""
        try:
            if how == "eof" and self.proc.stdin:
                self.proc.stdin.close()
            else:
                self.proc.send_signal(_signal.SIGTERM)
        except (BrokenPipeError, ProcessLookupError):
            pass
        result = {}
        end = _time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, end - _time.monotonic()))
            if line is None:
                break
            if line.startswith(("stats ", "storm ")):
                result = parse_kv(line)
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        reap(self.pid, timeout=2.0)
        self.proc.stdout.close()
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self._sel.close()
        return result


def parse_kv(line):
    """'stats a=1 b=2.5 c=x' -> {'a': 1, 'b': 2.5, 'c': 'x'}."""
    out = {}
    for word in line.split()[1:]:
        if "=" not in word:
            continue
        key, val = word.split("=", 1)
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                pass
        out[key] = val
    return out


def spawn_target(exe, timeout=5.0):
    """Start the target helper and return its PID once it runs (it wrote 'r')."""
    r, w = _os.pipe()
    try:
        pid = _os.posix_spawn(exe, [exe], _os.environ,
                              file_actions=[(_os.POSIX_SPAWN_DUP2, w, 1)])
    finally:
        _os.close(w)
    _track(pid, "target")
    try:
        sel = _selectors.DefaultSelector()
        sel.register(r, _selectors.EVENT_READ)
        ok = sel.select(timeout) and _os.read(r, 1) == b"r"
        sel.close()
    finally:
        _os.close(r)
    if not ok:
        _os.kill(pid, _signal.SIGKILL)
        reap(pid)
        raise HelperDied(f"target pid {pid} did not start within {timeout} s")
    return pid


def kill_quiet(pid, sig=_signal.SIGKILL):
    try:
        _os.kill(pid, sig)
    except OSError as err:
        if err.errno != _errno.ESRCH:
            raise


class Storm:
    """The fork storm as a context manager: ``with Storm(exe, ...) as s:``.

    ``rate`` 0 means as fast as ``workers`` processes can fork and reap.
    ``s.result`` holds the forker's own count after the block:
    {'exits', 'seconds', 'rate', 'workers'}.  ``seconds`` bounds it even if
    the block overruns; the block's end stops it early.
    """

    def __init__(self, exe, rate=0, workers=2, seconds=30.0, use_vfork=True, warmup=0.2):
        self.argv = [exe, "-r", str(rate), "-j", str(workers), "-d", f"{seconds:.3f}"]
        if use_vfork:
            self.argv.append("-v")
        self.warmup = warmup
        self.result = {}
        self.proc = None

    def __enter__(self):
        self.proc = LineProc(self.argv, name="forker", stdin=False)
        self.proc.expect("started", timeout=5.0)
        _time.sleep(self.warmup)    # let the storm reach its steady rate
        return self

    def __exit__(self, *exc):
        self.result = self.proc.stop(how="term", timeout=5.0)
        return False


def null_storm():
    """A stand-in for Storm when the condition is idle."""
    class _Idle:
        result = {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    return _Idle()
