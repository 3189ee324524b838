"""The C client against a real service: found with --include-dir, and seen exactly like
a Python client in ``status`` and in the log, under both backends (root).

The header's layout and its protocol against a hand-made table are in
test_abi.py; here the service is the real one.
"""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PY, ROOT, require_root
from procwatch import abi, cheader
from procwatch.segment import Table

pytestmark = [require_root()]
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror"]


def cli(*args):
    return subprocess.run([PY, "-m", "procwatch", *args], capture_output=True, text=True, cwd=ROOT)


def test_include_dir_option_prints_the_header_directory():
    out = cli("--include-dir")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout == cheader.include_dir() + "\n"
    assert (Path(out.stdout.strip()) / "procwatch.h").is_file()


def readme_c_example():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```c\n(.*?)```", text, re.S)
    assert m, "README.md has no ```c example"
    return m.group(1)


def test_readme_c_client_compiles_strictly_and_is_watched(key, service, tmp_path):
    """The README's C client, built as the README says, registers; its kill is reported."""
    src = readme_c_example()
    assert len([ln for ln in src.splitlines() if ln.strip()]) <= 7
    (tmp_path / "demo.c").write_text(src)
    include = cli("--include-dir").stdout.strip()
    subprocess.run(["gcc", *STRICT, "-I", include, str(tmp_path / "demo.c"), "-o", str(tmp_path / "demo")],
                   check=True)
    svc = service()
    p = subprocess.Popen([str(tmp_path / "demo")], env=dict(os.environ, PROCWATCH_KEY=hex(key)))
    try:
        svc.wait_event("registered", name="c-demo", pid=p.pid)
        p.kill()
        assert p.wait(10) == -signal.SIGKILL
        svc.wait_event("exit", name="c-demo", signal="SIGKILL")
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def _start(kind, exe, key, name):
    if kind == "c":
        argv = [str(exe), name, hex(key)]
    else:
        argv = [PY, str(ROOT / "tests/progs/client.py"), "--key", hex(key), "--name", name,
                *(["--then", "exit", "--code", "3"] if name.endswith("exit3") else [])]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = p.stdout.readline().split()
    assert line[:1] == ["READY"], line
    return p


def _comparable_row(row):
    return {k: v for k, v in row.items()
            if k not in ("slot", "name", "pid", "since", "latency_us", "detected_by", "teardown_us")}


def _latency_known_as_it_should(row, backend):
    """The connector always knows its latency; the pidfd backend only from a death word."""
    return (row["latency_us"] is not None) == (backend == "connector" or row["detected_by"] == "death_word")


def _comparable_event(e, name, pid):
    """The event's fields and its message, with what must differ (name, PID, slot, µs) masked.

    Which path zeroes a small armed process's word, its death word or the exit
    event, is a race (the death word waits until every thread is exiting), so
    the detection part of an exit line is masked too.
    """
    fields = {k: v for k, v in e.items()
              if k not in ("name", "pid", "slot", "latency_us", "message", "detected_by", "teardown_us",
                           "status_source")}
    text = e["message"].split("]: ", 1)[1].rsplit("  event=", 1)[0]
    text = text.replace(name, "NAME").replace(f"pid {pid}", "pid PID")
    text = re.sub(r"slot \d+", "slot N", text)
    if fields.get("event") == "exit":
        text = text.split("; ", 1)[0] + "; DETECTION"
    return fields, text


@pytest.mark.parametrize("backend", ["connector", "pidfd"])
def test_c_client_is_seen_exactly_like_a_python_client(key, service, compiled, backend):
    exe = compiled("cclient", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    svc = service("--backend", backend)
    procs = {}
    try:
        for kind in ("py", "c"):
            for end in ("killed", "exit3"):
                procs[kind, end] = _start(kind, exe, key, f"{kind}-{end}")
        for kind in ("py", "c"):
            procs[kind, "killed"].kill()
            procs[kind, "exit3"].stdin.write("exit 3\n" if kind == "c" else "go\n")
            procs[kind, "exit3"].stdin.flush()
        for kind in ("py", "c"):
            svc.wait_event("exit", name=f"{kind}-killed", signal="SIGKILL")
            svc.wait_event("exit", name=f"{kind}-exit3", exit_code=3)
        out = cli("status", "--key", hex(key), "--json")
        rows = {r["name"]: r for r in json.loads(out.stdout)["slots"]}
        for end in ("killed", "exit3"):
            assert _comparable_row(rows[f"c-{end}"]) == _comparable_row(rows[f"py-{end}"]), rows
            assert _latency_known_as_it_should(rows[f"c-{end}"], backend), rows
            assert _latency_known_as_it_should(rows[f"py-{end}"], backend), rows
            for kind_event in ("registered", "exit"):
                seen = {}
                for kind in ("py", "c"):
                    name = f"{kind}-{end}"
                    e = svc.wait_event(kind_event, name=name)
                    seen[kind] = _comparable_event(e, name, procs[kind, end].pid)
                assert seen["c"] == seen["py"]
        assert rows["c-killed"]["signal"] == "SIGKILL" and rows["c-exit3"]["exit_code"] == 3
        text = cli("status", "--key", hex(key)).stdout
        for end, last in (("killed", "killed by SIGKILL"), ("exit3", "exit code 3")):
            c_line = next(ln for ln in text.splitlines() if f" c-{end} " in ln)
            py_line = next(ln for ln in text.splitlines() if f" py-{end} " in ln)
            assert last in c_line and last in py_line
            # Which of the death word and the exit event zeroed a small process is a race.
            def masked(line, name):
                return re.sub(r"\d+ s ago| \(death word, \d+ ms before its pidfd\)", "",
                              line.split(name)[1]).split()
            assert masked(c_line, f"c-{end}") == masked(py_line, f"py-{end}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    t = Table.attach(key)
    try:
        assert all(s.pid == 0 and s.state == abi.State.EXITED for s in t.used_slots())
    finally:
        t.detach()
