"""``procwatch status --watch`` in a real terminal (tmux) and through a pipe (root: a real service).

The tmux server runs on a socket of this test's own (-L), so ``kill-server``
at teardown ends only what the test started.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import PY, ROOT, require_root, wait_until
from procwatch import liveview

pytestmark = [require_root(), pytest.mark.skipif(shutil.which("tmux") is None,
                                                 reason="tmux is not installed (scripts/setup installs it)")]

ESC = "\x1b"


class Tmux:
    """One detached tmux session on a private server, running ``cmd``."""

    def __init__(self, name, cmd, tmpdir, width=110, height=24):
        self.socket = name
        # The server's socket goes in the test's own directory, not /tmp/tmux-UID.
        self.env = dict(os.environ, TMUX_TMPDIR=str(tmpdir))
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "pw", "-x", str(width), "-y", str(height),
                  "-c", str(ROOT), cmd)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=30, env=self.env).stdout

    def screen(self, escapes=False):
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "pw")

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30,
                       env=self.env)


@pytest.fixture
def tmux(key, tmp_path):
    started = []

    def start(cmd, **kw):
        t = Tmux(f"pwtest-{key:x}-{len(started)}", cmd, tmp_path, **kw)
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


def row(screen, name):
    return next((ln for ln in screen.splitlines() if re.match(rf"\d+\s+{re.escape(name)}\s", ln)), None)


def test_watch_refreshes_in_place_in_a_terminal(key, service, clients, tmux):
    svc = service()
    a = clients(key, "live-a")
    b = clients(key, "live-b")
    # The shell prints the view's exit status and stays: tmux 3.3 may drop a dead
    # pane's last output, and sometimes never fills in #{pane_dead_status}.
    term = tmux(f"env -u NO_COLOR {PY} -m procwatch status --watch --key {key:#x} --interval 0.2; "
                f"echo view-exit-status=$?; exec sleep 100000")

    def both_alive():
        s = term.screen()
        return s if all(row(s, n) and " alive " in row(s, n) for n in ("live-a", "live-b")) else None
    first = wait_until(both_alive, 15, "both clients alive on the live view", detail=term.screen)
    lines = first.splitlines()
    assert lines[0].startswith(f"procwatch status  key {key:#010x}  every 0.2 s")
    assert lines[2] == f"procwatch: running, PID {svc.pid}, connector backend, native hot step, death words watched"
    assert str(a.pid) in row(first, "live-a")

    # States are coloured on a terminal (SGR sequences around the state word).
    coloured = term.screen(escapes=True)
    assert re.search(rf"{ESC}\[32malive{ESC}\[39m", coloured), coloured      # green
    assert re.search(rf"{ESC}\[32mprocwatch: running", coloured), coloured

    # A few refreshes later the ages have moved and the frame is still drawn in place.
    def aged():
        s = term.screen()
        r = row(s, "live-a")
        return s if r and r != row(first, "live-a") else None
    later = wait_until(aged, 15, "the live view to refresh", detail=term.screen)
    for screen in (first, later):
        assert screen.count("SLOT  NAME") == 1 and screen.splitlines()[0].startswith("procwatch status")

    b.kill()
    svc.wait_event("exit", name="live-b")
    ended = wait_until(lambda: (r := row(term.screen(), "live-b")) and " exited " in r and r, 15,
                       "live-b's row to show its end", detail=term.screen)
    assert "killed by SIGKILL" in ended and f" {b.pid} " not in ended
    assert " alive " in row(term.screen(), "live-a")
    assert re.search(rf"{ESC}\[31mexited{ESC}\[39m", term.screen(escapes=True))      # red

    term.tmux("send-keys", "-t", "pw", "q")
    after = wait_until(lambda: "view-exit-status=" in (s := term.screen()) and s, 10, "q to quit the view",
                       detail=term.screen)
    assert "view-exit-status=0" in after
    assert "SLOT  NAME" not in after, "the alternate screen was not left"


def test_watch_through_a_pipe_is_plain(key, service, clients):
    service()
    c = clients(key, "piped")
    out = subprocess.run([PY, "-m", "procwatch", "status", "--watch", "--key", hex(key),
                          "--interval", "0.05", "--count", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ESC not in out.stdout
    frames = out.stdout.split("\n\n\n")
    assert out.stdout.count("procwatch status  key") == 3
    assert all("(q quits)" not in f for f in frames)
    assert out.stdout.count(f"piped   {c.pid}") == 3 or out.stdout.count(f"piped  {c.pid}") == 3


def test_rows_that_do_not_fit_are_cut_with_a_note():
    snap = {"key": "0x7e000001", "service": {"pid": 1, "alive": True, "backend": "connector", "heartbeat": 0},
            "slot_count": 64, "exits": 0,
            "slots": [{"slot": i, "name": f"n{i}", "pid": 100 + i, "state": "alive", "since": time.time(),
                       "cause": None, "exit_status": None, "exit_code": None, "signal": None,
                       "core_dumped": None, "latency_us": None, "heartbeat_ms": 0, "misses": 0,
                       "last_beat_age_s": None} for i in range(40)]}
    lines = liveview.render(snap, 0x7E000001, 1.0, 30, 10)
    assert len(lines) == 10
    assert all(len(text) <= 30 for text, _ in lines)
    assert lines[-1][0].startswith("... 37 more rows")
    assert [style for _, style in lines[5:9]] == ["header", "alive", "alive", "alive"]
