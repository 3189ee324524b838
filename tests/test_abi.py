"""The slot-table ABI: docs/ABI.md, procwatch/abi.py and procwatch.h agree.

Three sources describe one binary layout, and other languages will read it,
so this module checks them against each other:

* the offset tables of ``docs/ABI.md`` against the constants of ``abi.py``;
* a C program compiled against ``procwatch.h`` that prints ``offsetof`` and
  ``sizeof`` of every field, against ``abi.py``;
* the header under ``-std=c99 -Wall -Wextra -Werror`` (and C++), and its
  registration protocol against a real table: a segment and semaphore the
  test creates at a key of its own (conftest.fresh_key()), driven by real client
  processes (``tests/c/pwtest.c``).  The test plays the service where one is
  needed: it zeroes a PID word and calls FUTEX_WAKE, as the detector does.

Every process a test starts is ended by its PID at teardown.
"""

import ctypes
import errno
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import sysv_ipc

from conftest import (RACE_MIN_OVERLAP, RACE_ROUNDS, asleep_in_futex, barrier_file, fresh_key, futex_waits,
                      overlapped, run_race, start_time, wait_until)
from procwatch import abi, cheader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ABI.md")
INCLUDE = cheader.include_dir()
PWTEST_C = os.path.join(ROOT, "tests", "c", "pwtest.c")
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror"]

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

# ---------------------------------------------------------------------------
# docs/ABI.md
# ---------------------------------------------------------------------------

# Documented type -> (struct format, size)
_U = {"u32": ("I", 4), "i32": ("i", 4), "u64": ("Q", 8)}


def _doc_type(t):
    t = t.strip("`")
    if t in _U:
        return _U[t]
    m = re.fullmatch(r"(char|u8|u64)\[(\d+)\]", t)
    assert m, f"docs/ABI.md: unknown type {t!r}"
    n = int(m.group(2))
    if m.group(1) == "u64":
        return f"{n}Q", 8 * n
    return (f"{n}s" if m.group(1) == "char" else f"{n}x"), n


def _doc_table(heading):
    """Rows (lists of cells) of the first table after ``heading`` in ABI.md."""
    text = open(DOC, encoding="utf-8").read()
    start = text.index(heading + "\n")
    rows = []
    for line in text[start + len(heading):].splitlines():
        line = line.strip()
        if not line:
            if rows:
                break
            continue
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(cells)
    assert len(rows) > 2, f"no table under {heading!r}"
    return rows[2:]            # drop the heading row and the |---| row


def _doc_fields(heading):
    """[(offset, size, type, name)] of a field table."""
    out = []
    for cells in _doc_table(heading):
        off, size, typ, name = int(cells[0]), int(cells[1]), cells[2], cells[3].strip("`")
        out.append((off, size, typ, name))
    return out


def _abi_offsets(prefix):
    """{field name: offset} of abi.py's H_* or S_* constants."""
    return {k[len(prefix):].lower(): v for k, v in vars(abi).items()
            if k.startswith(prefix) and k.isupper() and isinstance(v, int)}


LAYOUTS = [("### Header fields", "H_", abi.HEADER_SIZE, "procwatch_header"),
           ("### Slot fields", "S_", abi.SLOT_SIZE, "procwatch_slot")]


@pytest.mark.parametrize("heading,prefix,total,_c", LAYOUTS)
def test_doc_offsets_match_abi(heading, prefix, total, _c):
    fields = _doc_fields(heading)
    documented = {name: off for off, _, _, name in fields if name != "reserved"}
    assert documented == _abi_offsets(prefix)

    # The table tiles the structure: no gap, no overlap, ends at its size.
    at = 0
    for off, size, typ, name in fields:
        assert off == at, f"{name} at {off}, previous field ends at {at}"
        assert _doc_type(typ)[1] == size, f"{name}: type {typ} is not {size} bytes"
        if typ.strip("`") in _U:
            assert off % size == 0, f"{name} at {off} is not naturally aligned"
        if typ.startswith("`u64["):
            assert off % 8 == 0, f"{name} at {off} is not naturally aligned"
        at = off + size
    assert at == total


def _doc_format(heading, first, count):
    """struct format of ``count`` consecutive documented fields from ``first``."""
    fields = _doc_fields(heading)
    i = [f[3] for f in fields].index(first)
    return "=" + "".join(_doc_type(f[2])[0] for f in fields[i:i + count])


def test_doc_types_match_abi_structs():
    assert abi.HEADER_STATIC.format == _doc_format("### Header fields", "magic", 5)
    assert abi.SLOT_IDENTITY.format == _doc_format("### Slot fields", "start_time", 2)
    assert abi.SLOT_END.format == _doc_format("### Slot fields", "exit_status", 3)
    # NAME_SIZE is the documented name field; the magic is the documented bytes.
    name = [f for f in _doc_fields("### Slot fields") if f[3] == "name"][0]
    assert name[1] == abi.NAME_SIZE
    magic = [r for r in _doc_table("### Header fields") if r[3] == "`magic`"][0]
    assert bytes.fromhex(re.search(r"\(([0-9A-F ]+)\)", magic[5]).group(1)) == abi.MAGIC


@pytest.mark.parametrize("heading,enum", [("### State", abi.State), ("### Cause", abi.Cause),
                                          ("### Backend", abi.Backend), ("### Verdict", abi.Verdict),
                                          ("### Arm", abi.Arm), ("### Detection", abi.Detection),
                                          ("### DeathWatch", abi.DeathWatch)])
def test_doc_values_match_abi(heading, enum):
    documented = {cells[1].strip("`"): int(cells[0]) for cells in _doc_table(heading)}
    assert documented == {m.name: m.value for m in enum}


def test_doc_constants_match_abi():
    text = open(DOC, encoding="utf-8").read()
    assert f"`{abi.DEFAULT_KEY:#010x}`" in text
    assert f"Layout version: **{abi.VERSION}**" in text
    for name in ("NAME_SIZE", "NAME_MAX", "MAX_SLOTS", "DEFAULT_SLOTS", "PENDING_ENDS", "DEATH_MUTEX_SIZE"):
        assert f"`{name} = {getattr(abi, name)}`" in text, name
    for name in ("FUTEX_WAITERS", "FUTEX_OWNER_DIED", "FUTEX_TID_MASK"):
        assert f"`{name} = {getattr(abi, name):#x}`" in text.lower().replace(name.lower(), name), name
    assert f"`LATENCY_UNKNOWN = 0x{abi.LATENCY_UNKNOWN:X}`" in text
    assert f"`EXIT_STATUS_UNKNOWN = {abi.EXIT_STATUS_UNKNOWN}`" in text


# ---------------------------------------------------------------------------
# procwatch.h: layout and compilation
# ---------------------------------------------------------------------------

def _compile(tmp_path, source, flags=STRICT, name="prog", lang="c"):
    """Compile ``source`` against procwatch.h; return (returncode, stderr, binary)."""
    src = tmp_path / f"{name}.{'c' if lang == 'c' else 'cc'}"
    src.write_text(source)
    out = tmp_path / name
    compiler = "gcc" if lang == "c" else "g++"
    proc = subprocess.run([compiler, *flags, "-I", INCLUDE, str(src), "-o", str(out)],
                          capture_output=True, text=True)
    return proc.returncode, proc.stderr, str(out)


C_CONSTS = ["VERSION", "HEADER_SIZE", "SLOT_SIZE", "NAME_SIZE", "NAME_MAX", "DEFAULT_KEY",
            "MAX_SLOTS", "PENDING_ENDS", "LATENCY_UNKNOWN", "EXIT_STATUS_UNKNOWN", "DEATH_MUTEX_SIZE",
            "FUTEX_WAITERS", "FUTEX_OWNER_DIED", "FUTEX_TID_MASK"]
C_ENUMS = (abi.State, abi.Cause, abi.Backend, abi.HangAction, abi.Verdict, abi.Arm, abi.Detection, abi.DeathWatch)
_C_PREFIX = {abi.HangAction: "HANGACTION"}      # procwatch.h's spelling, older than this map


def _c_enum_prefix(enum):
    """procwatch.h's prefix of an abi enum: PROCWATCH_STATE_..., PROCWATCH_DEATH_WATCH_..."""
    return _C_PREFIX.get(enum) or re.sub(r"(?<=[a-z])(?=[A-Z])", "_", enum.__name__).upper()


def _dump_source():
    lines = ['#include "procwatch.h"', "#include <stdio.h>",
             "static struct procwatch_header zh;", "static struct procwatch_slot zs;",
             "int main(void)", "{"]
    for _heading, prefix, _, cstruct in LAYOUTS:
        z = "zh" if cstruct == "procwatch_header" else "zs"
        reserved = ["reserved"] if "reserved" in {f[3] for f in _doc_fields(_heading)} else []
        for field in list(_abi_offsets(prefix)) + reserved:
            scalar = field not in ("magic", "name", "reserved", "pending_ends", "death_mutex")
            signed = f"({z}.{field} * 0 - 1 < 0)" if scalar else "0"
            lines.append(f'    printf("{cstruct} {field} %zu %zu %d\\n", offsetof(struct {cstruct}, {field}), '
                         f"sizeof {z}.{field}, {signed});")
        lines.append(f'    printf("sizeof {cstruct} %zu\\n", sizeof(struct {cstruct}));')
    consts = C_CONSTS
    for c in consts:
        lines.append(f'    printf("const {c} %lld\\n", (long long)PROCWATCH_{c});')
    lines.append('    printf("const MAGIC %zu", sizeof PROCWATCH_MAGIC);')
    lines.append('    { size_t i; for (i = 0; i < sizeof PROCWATCH_MAGIC; i++) printf(" %02x", '
                 '(unsigned)(unsigned char)PROCWATCH_MAGIC[i]); }')
    lines.append('    printf("\\n");')
    for enum in C_ENUMS:
        for m in enum:
            cname = f"PROCWATCH_{_c_enum_prefix(enum)}_{m.name}"
            lines.append(f'    printf("enum {enum.__name__}.{m.name} %d\\n", (int){cname});')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@needs_cc
def test_c_layout_matches_abi(tmp_path):
    rc, err, binary = _compile(tmp_path, _dump_source(), flags=["-std=c99", "-Wall"], name="dump")
    assert rc == 0, err
    out = subprocess.run([binary], capture_output=True, text=True, check=True).stdout.splitlines()
    seen = {}
    for line in out:
        words = line.split()
        if words[0] in ("procwatch_header", "procwatch_slot"):
            seen[(words[0], words[1])] = tuple(int(w) for w in words[2:])
        else:
            seen[(words[0], words[1])] = words[2:]

    for heading, prefix, total, cstruct in LAYOUTS:
        doc = {name: (off, size, typ) for off, size, typ, name in _doc_fields(heading)}
        for field, offset in _abi_offsets(prefix).items():
            c_off, c_size, c_signed = seen[(cstruct, field)]
            assert c_off == offset, f"{cstruct}.{field}: C offset {c_off}, abi.py {offset}"
            assert c_size == doc[field][1], f"{cstruct}.{field}: C size {c_size}, ABI.md {doc[field][1]}"
            assert c_signed == (doc[field][2] == "`i32`"), f"{cstruct}.{field}: signedness"
        if "reserved" in doc:
            assert seen[(cstruct, "reserved")][:2] == doc["reserved"][:2]
        assert seen[("sizeof", cstruct)] == [str(total)]

    for c in C_CONSTS:
        assert int(seen[("const", c)][0]) == getattr(abi, c), c
    magic = seen[("const", "MAGIC")]
    assert int(magic[0]) == len(abi.MAGIC) and bytes.fromhex("".join(magic[1:])) == abi.MAGIC
    for enum in C_ENUMS:
        for m in enum:
            assert int(seen[("enum", f"{enum.__name__}.{m.name}")][0]) == m.value


PROGRAM = """\
{pre}#include "procwatch.h"
{post}
int main(void)
{{
    struct procwatch_reg reg;
    struct procwatch_peer peer;
    int rc = procwatch_register(&reg, "strict", 0x7077c0ff);
    procwatch_beat(&reg);
    rc |= procwatch_set_heartbeat(&reg, 100);
    rc |= procwatch_unregister(&reg);
    rc |= (int)procwatch_peer_pid("strict", 0x7077c0ff);
    rc |= procwatch_wait_exit("strict", 0x7077c0ff, 0);
    if (procwatch_peer_open(&peer, "strict", 0) == 0) {{
        rc |= (int)procwatch_peer_current(&peer) + (procwatch_peer_word(&peer) != NULL);
        rc |= procwatch_peer_wait(&peer, 0);
        procwatch_peer_close(&peer);
    }}
    return rc == 12345;
}}
"""


@needs_cc
@pytest.mark.parametrize("flags,pre,post", [
    (STRICT, "", "#include <stdio.h>\n"),
    (STRICT + ["-O2", "-Wpedantic", "-Wconversion", "-Wshadow", "-Wstrict-prototypes"], "", ""),
    (STRICT + ["-D_POSIX_C_SOURCE=200809L"], "#include <stdio.h>\n#include <signal.h>\n", ""),
    (STRICT + ["-D_GNU_SOURCE"], "#include <stdlib.h>\n", ""),
    (["-std=gnu11", "-Wall", "-Wextra", "-Werror"], "#include <stdio.h>\n", ""),
    (["-std=c11", "-Wall", "-Wextra", "-Werror"], "", "#include <pthread.h>\n"),
], ids=["c99", "c99-pedantic-conversion", "c99-posix-after-stdio", "c99-gnu-after-stdlib",
        "gnu11-after-stdio", "c11"])
def test_header_compiles_warning_free(tmp_path, flags, pre, post):
    rc, err, _ = _compile(tmp_path, PROGRAM.format(pre=pre, post=post), flags=flags)
    assert rc == 0, err
    assert err == ""


@needs_cc
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("std", ["c++11", "c++17"])
def test_header_compiles_as_cxx(tmp_path, std):
    rc, err, _ = _compile(tmp_path, PROGRAM.format(pre="#include <cstdio>\n", post=""),
                          flags=[f"-std={std}", "-Wall", "-Wextra", "-Werror"], lang="c++")
    assert rc == 0, err


@needs_cc
def test_header_explains_strict_include_order(tmp_path):
    # -std=c99 with a system header first hides POSIX for the whole unit:
    # the header's own #error must come first and say what to do.
    rc, err, _ = _compile(tmp_path, PROGRAM.format(pre="#include <stdio.h>\n", post=""))
    assert rc != 0
    first_error = next(line for line in err.splitlines() if "error" in line)
    assert "#error" in first_error and "include procwatch.h first" in first_error


@needs_cc
@pytest.mark.parametrize("std,says", [
    ("c11", "procwatch_slot.exit_status must be at offset 64 (procwatch/abi.py)"),
    # under a strict -std=c99 glibc's <sys/cdefs.h> turns _Static_assert into
    # a negative-width bit-field; the failing line still names the field
    ("c99", "PROCWATCH__AT(procwatch_slot, exit_status, 64)"),
])
def test_static_asserts_guard_the_layout(tmp_path, std, says):
    # The _Static_asserts are live: a header whose struct drifted does not compile.
    header = open(os.path.join(INCLUDE, "procwatch.h")).read()
    drifted = header.replace("    uint32_t misses;", "    uint64_t misses;", 1)
    assert drifted != header
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "procwatch.h").write_text(drifted)
    src = tmp_path / "d.c"
    src.write_text('#include "procwatch.h"\nint main(void) { return 0; }\n')
    proc = subprocess.run(["gcc", f"-std={std}", "-Wall", "-Wextra", "-Werror", "-I", str(tmp_path / "inc"),
                           str(src), "-o", str(tmp_path / "d")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert says in proc.stderr


def test_include_dir_holds_the_header():
    assert os.path.isfile(os.path.join(cheader.include_dir(), "procwatch.h"))
    assert cheader.header_path() == os.path.join(cheader.include_dir(), "procwatch.h")
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'procwatch = ["include/*.h"]' in pyproject


# ---------------------------------------------------------------------------
# The C client against a real table
# ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
FUTEX_WAIT, FUTEX_WAKE = 0, 1
INT_MAX = 0x7FFFFFFF


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@pytest.fixture(scope="session")
def pwtest(tmp_path_factory):
    """The test client, built with the strict flags; and one with a short lock timeout."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("pwtest")
    binaries = {}
    for name, extra in (("pwtest", []), ("pwtest_fastlock", ["-DPROCWATCH_LOCK_TIMEOUT_MS=300"])):
        out = str(d / name)
        subprocess.run(["gcc", *STRICT, "-O2", *extra, "-I", INCLUDE, PWTEST_C, "-o", out],
                       check=True)
        binaries[name] = out
    binaries["sys_futex"] = int(subprocess.run([binaries["pwtest"], "sysno"], capture_output=True,
                                               text=True, check=True).stdout)
    return binaries


class Client:
    """A pwtest process: line-oriented, every read with a deadline."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.pid = self.proc.pid
        self._buf = b""

    def line(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"pwtest PID {self.pid}: no output in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"pwtest PID {self.pid} ended; output {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, command):
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.rc()

    def rc(self):
        m = re.match(r"rc=(-?\d+)", self.line())
        assert m
        return int(m.group(1))

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout)


@pytest.fixture
def clients(pwtest):
    """Start pwtest processes; each still running at teardown is killed by its PID."""
    started = []

    def start(*args, binary="pwtest", env=None):
        c = Client([pwtest[binary], *[a if isinstance(a, bytes) else str(a) for a in args]], env=env)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            os.kill(c.pid, signal.SIGKILL)
        c.proc.wait()
        for f in (c.proc.stdin, c.proc.stdout):
            try:
                f.close()
            except BrokenPipeError:
                pass


class Table:
    """A slot table made by hand from abi.py, the way the service lays it out."""

    def __init__(self, sys_futex, slots=8):
        self.sys_futex = sys_futex
        for _ in range(100):
            key = fresh_key()
            try:
                self.shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o600,
                                                 size=abi.segment_size(slots), init_character=b"\0")
            except sysv_ipc.ExistentialError:
                continue                # somebody else's: leave it alone
            break
        else:
            raise AssertionError("no free test key in 100 tries")
        self.key = key
        self.slots = slots
        self.sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, mode=0o600, initial_value=1)
        self.buf = memoryview(self.shm)
        self.u32 = self.buf.cast("I")
        self.u64 = self.buf.cast("Q")
        abi.HEADER_STATIC.pack_into(self.buf, 0, abi.MAGIC, abi.VERSION, abi.HEADER_SIZE,
                                    abi.SLOT_SIZE, slots)

    def field(self, i, name):
        off = abi.slot_offset(i) + getattr(abi, "S_" + name.upper())
        if name == "name":
            return bytes(self.buf[off:off + abi.NAME_SIZE])
        if name == "exit_status":
            return struct.unpack_from("=i", self.buf, off)[0]
        if name in ("start_time", "heartbeat_seq", "exit_time_ns", "registered_ns", "last_beat_ns"):
            return self.u64[off // 8]
        return self.u32[off // 4]

    def pid_address(self, i):
        return self.shm.address + abi.slot_offset(i) + abi.S_PID

    @property
    def generation(self):
        return self.u32[abi.H_GENERATION // 4]

    def zero_and_wake(self, i):
        """What the service does on an exit: clear the PID word, then FUTEX_WAKE.

        Returns how many waiters the wake woke."""
        self.u32[(abi.slot_offset(i) + abi.S_PID) // 4] = 0
        return _libc.syscall(self.sys_futex, ctypes.c_void_p(self.pid_address(i)), FUTEX_WAKE,
                             INT_MAX, None, None, 0)

    def remove(self):
        for v in (self.u32, self.u64, self.buf):
            v.release()
        self.shm.detach()
        self.shm.remove()
        self.sem.remove()


@pytest.fixture
def make_table(pwtest):
    """Tables of a given size at keys of our own, removed at teardown."""
    made = []

    def make(slots=8):
        made.append(Table(pwtest["sys_futex"], slots))
        return made[-1]

    yield make
    for t in made:
        t.remove()


@pytest.fixture
def table(make_table):
    return make_table()


def register(clients, table, name, **kw):
    c = clients("register", name, hex(table.key), **kw)
    m = re.fullmatch(r"rc=(-?\d+) slot=(\d+) pid=(-?\d+)", c.line())
    assert m, "unexpected pwtest output"
    c.rc_, c.slot = int(m.group(1)), int(m.group(2))
    if c.rc_ == 0:
        assert int(m.group(3)) == c.pid
    return c


def test_register_fills_the_slot(pwtest, clients, table):
    gen = table.generation
    before = time.time_ns()
    c = register(clients, table, "dataplane")
    after = time.time_ns()
    assert c.rc_ == 0 and c.slot == 0
    assert table.field(0, "pid") == c.pid
    assert table.field(0, "state") == abi.State.ALIVE
    assert table.field(0, "start_time") == start_time(c.pid)
    assert table.field(0, "name") == b"dataplane".ljust(abi.NAME_SIZE, b"\0")
    assert table.field(0, "heartbeat_seq") == 0
    assert table.field(0, "heartbeat_ms") == 0
    assert table.field(0, "exit_status") == abi.EXIT_STATUS_UNKNOWN
    assert table.field(0, "cause") == abi.Cause.NONE
    assert table.field(0, "exit_time_ns") == 0
    assert before <= table.field(0, "registered_ns") <= after
    assert table.field(0, "last_beat_ns") == table.field(0, "registered_ns")
    assert table.field(0, "latency_us") == abi.LATENCY_UNKNOWN
    assert table.field(0, "owner_uid") == os.getuid()
    # The death word: armed by a sentinel thread of the client, which holds the robust mutex.
    assert table.field(0, "death_arm") == abi.Arm.ARMED
    tid = table.field(0, "death_tid")
    assert tid != c.pid and os.path.exists(f"/proc/{c.pid}/task/{tid}")
    assert table.u32[(abi.slot_offset(0) + abi.S_DEATH_MUTEX) // 4] == tid    # glibc: __lock = owner TID
    assert table.field(0, "detected_by") == abi.Detection.EXIT_EVENT
    assert table.field(0, "teardown_us") == abi.LATENCY_UNKNOWN
    assert table.generation == gen + 1
    # a second name takes the next slot; the header is left alone
    assert register(clients, table, "other").slot == 1
    assert abi.HEADER_STATIC.unpack_from(table.buf, 0) == (abi.MAGIC, abi.VERSION, abi.HEADER_SIZE,
                                                           abi.SLOT_SIZE, table.slots)


def test_register_wakes_generation_waiters(pwtest, clients, table):
    # The pidfd backend sleeps on the generation word; registering must wake it.
    gen = table.generation
    result = {}

    def waiter():
        result["tid"] = threading.get_native_id()
        ts = _timespec(30, 0)
        rc = _libc.syscall(pwtest["sys_futex"], ctypes.c_void_p(table.shm.address + abi.H_GENERATION),
                           FUTEX_WAIT, ctypes.c_uint(gen), ctypes.byref(ts), None, 0)
        result["rc"], result["errno"] = rc, ctypes.get_errno()

    t = threading.Thread(target=waiter)
    t.start()
    while "tid" not in result:
        os.sched_yield()
    wait_until(lambda: "tid" in result and asleep_in_futex(os.getpid(), result["tid"]), 10,
               "the waiter to sleep in futex()")
    c = register(clients, table, "wake-the-service")
    t.join(30)
    assert c.rc_ == 0
    assert result["rc"] == 0, f"FUTEX_WAIT returned errno {result['errno']}"
    assert table.generation == gen + 1


def test_beat_and_heartbeat(pwtest, clients, table):
    c = register(clients, table, "beater")
    assert c.send("beat 1") == 0
    assert table.field(c.slot, "heartbeat_seq") == 1
    assert c.send("beat 41") == 0
    assert table.field(c.slot, "heartbeat_seq") == 42
    before = time.time_ns()
    assert c.send("hb 250") == 0
    assert table.field(c.slot, "heartbeat_ms") == 250
    assert table.field(c.slot, "last_beat_ns") >= before
    assert c.send("hb 0") == 0
    assert table.field(c.slot, "heartbeat_ms") == 0


def test_register_adopts_the_slot_procwatch_run_made_for_this_process(pwtest, table):
    """Issue 13: `procwatch run --heartbeat` registers, execs; the C program registers again.

    A fresh registration would zero heartbeat_ms; an adopted slot keeps
    run's 500 ms and its registration time, and the program's beats count.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = Client([sys.executable, "-m", "procwatch", "run", "--name", "adopted", "--key", hex(table.key),
                "--heartbeat", "0.5", "--", pwtest["pwtest"], "register", "adopted", "0"],
               env=dict(os.environ, PYTHONPATH=root, PROCWATCH_KEY="0x1"))   # run passes its own key
    try:
        m = re.fullmatch(r"rc=(-?\d+) slot=(\d+) pid=(-?\d+)", c.line())
        assert m and int(m.group(1)) == 0, m and m.group(0)
        slot = int(m.group(2))
        assert int(m.group(3)) == c.pid and table.field(slot, "pid") == c.pid
        assert table.field(slot, "heartbeat_ms") == 500
        assert table.field(slot, "start_time") == start_time(c.pid)
        assert c.send("beat 3") == 0
        assert table.field(slot, "heartbeat_seq") == 3
        assert [i for i in range(table.slots) if table.field(i, "pid")] == [slot]
    finally:
        os.kill(c.pid, signal.SIGKILL)
        c.proc.wait()
        c.proc.stdin.close()
        c.proc.stdout.close()


def test_unregister_clears_first_and_records(pwtest, clients, table):
    c = register(clients, table, "leaver")
    assert c.send("beat 3") == 0
    gen = table.generation
    before = time.time_ns()
    assert c.send("unreg") == 0
    after = time.time_ns()
    assert table.field(c.slot, "pid") == 0
    assert table.field(c.slot, "state") == abi.State.UNREGISTERED
    assert table.field(c.slot, "cause") == abi.Cause.UNREGISTERED
    assert before <= table.field(c.slot, "exit_time_ns") <= after
    assert table.field(c.slot, "name").rstrip(b"\0") == b"leaver"
    assert table.generation == gen + 1
    # idempotent, and a beat after it changes nothing
    assert c.send("unreg") == 0
    assert c.send("beat 5") == 0
    assert table.field(c.slot, "heartbeat_seq") == 3
    assert c.send("hb 100") == -errno.EINVAL
    # the same name registers again into the same slot
    again = register(clients, table, "leaver")
    assert (again.rc_, again.slot) == (0, c.slot)
    assert table.field(c.slot, "state") == abi.State.ALIVE


def test_unregister_leaves_a_slot_it_no_longer_holds(pwtest, clients, table):
    c = register(clients, table, "evicted")
    table.zero_and_wake(c.slot)                    # the service ended it
    table.u32[(abi.slot_offset(c.slot) + abi.S_STATE) // 4] = abi.State.EXITED
    assert c.send("unreg") == -errno.ESRCH
    assert table.field(c.slot, "state") == abi.State.EXITED


def test_peer_pid(pwtest, clients, table):
    c = register(clients, table, "target")
    peer = clients("peer", "target", hex(table.key))
    assert int(peer.line()) == c.pid
    assert c.send("peer target") == c.pid
    table.zero_and_wake(c.slot)
    assert int(clients("peer", "target", hex(table.key)).line()) == 0
    assert int(clients("peer", "nobody", hex(table.key)).line()) == -errno.ESRCH


def test_peer_refuses_a_name_two_live_slots_carry(pwtest, clients, table):
    """Issue 13: a forged second live slot with the name; guessing could follow it."""
    c = register(clients, table, "twin")
    a, b = abi.slot_offset(c.slot), abi.slot_offset(c.slot + 1)
    table.buf[b + 4:b + abi.SLOT_SIZE] = table.buf[a + 4:a + abi.SLOT_SIZE]
    table.u32[b // 4] = 1                               # a live PID (init) in the forged slot
    assert int(clients("peer", "twin", hex(table.key)).line()) == -errno.ENOTUNIQ
    table.u32[b // 4] = 0                               # its end: one live slot again
    assert int(clients("peer", "twin", hex(table.key)).line()) == c.pid


def test_peer_handle_follows_the_name_not_the_slot(pwtest, clients, make_table):
    t = make_table(1)
    a = register(clients, t, "first")
    watch = clients("watch", "first", hex(t.key))
    assert watch.rc() == 0
    assert watch.send("cur") == a.pid                 # one load, no syscall
    assert a.send("unreg") == 0
    assert watch.send("cur") == 0
    b = register(clients, t, "second")                # the only slot goes to another name
    assert (b.rc_, b.slot) == (0, 0)
    assert watch.send("cur") == 0                     # not "second"'s PID
    assert b.send("unreg") == 0
    again = register(clients, t, "first")             # a successor under the name is followed
    assert watch.send("cur") == again.pid


def test_wait_exit_sleeps_on_the_futex_until_woken(pwtest, clients, table):
    c = register(clients, table, "victim")
    w = clients("wait", "victim", hex(table.key), -1)
    assert w.line() == "waiting"
    wait_until(lambda: asleep_in_futex(w.pid), 10, "pwtest wait to sleep in futex()")
    # With no timeout (-1) the sleep has none either: only FUTEX_WAKE ends it, no poll.
    (uaddr, timeout), = futex_waits(w.pid).values()
    assert timeout == 0
    assert table.zero_and_wake(c.slot) == 1          # exactly our waiter was asleep on it
    assert w.line() == "1"
    assert w.wait() == 0


def test_wait_exit_woken_by_unregister(pwtest, clients, table):
    c = register(clients, table, "polite")
    w = clients("wait", "polite", hex(table.key), -1)
    assert w.line() == "waiting"
    wait_until(lambda: asleep_in_futex(w.pid), 10, "pwtest wait to sleep in futex()")
    assert c.send("unreg") == 0
    assert w.line() == "1"


def test_wait_exit_timeout_and_already_gone(pwtest, clients, table):
    c = register(clients, table, "stays")
    w = clients("wait", "stays", hex(table.key), 50)
    assert w.line() == "waiting"
    assert w.line() == "0"
    assert table.field(c.slot, "pid") == c.pid
    table.zero_and_wake(c.slot)
    w = clients("wait", "stays", hex(table.key), -1)
    assert w.line() == "waiting"
    assert w.line() == "1"
    w = clients("wait", "nobody", hex(table.key), -1)
    assert w.line() == "waiting"
    assert int(w.line()) == -errno.ESRCH


def test_name_in_use_then_reused_after_death(pwtest, clients, table):
    first = register(clients, table, "unique")
    second = register(clients, table, "unique")
    assert second.rc_ == -errno.EEXIST
    assert table.field(first.slot, "pid") == first.pid
    # No service runs here, so nobody zeroes the word of a killed client:
    # the stale slot must still be taken over, because its process is gone.
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    third = register(clients, table, "unique")
    assert (third.rc_, third.slot) == (0, first.slot)
    assert table.field(first.slot, "pid") == third.pid
    assert table.field(first.slot, "start_time") == start_time(third.pid)


def _used_end(table):
    return table.u32[abi.H_USED_END // 4]


def test_register_keeps_used_end_and_reads_past_a_hole(pwtest, clients, table):
    """procwatch.h keeps used_end past every slot it takes (issue 16); a freed slot before a
    live one does not hide that one's name."""
    a, b = register(clients, table, "a"), register(clients, table, "b")
    assert (a.slot, b.slot, _used_end(table)) == (0, 1, 2)
    assert a.send("unreg") == 0
    table.buf[abi.slot_offset(0):abi.slot_offset(1)] = bytes(abi.SLOT_SIZE)   # the service freed it
    assert register(clients, table, "b").rc_ == -errno.EEXIST
    c = register(clients, table, "c")
    assert (c.rc_, c.slot, _used_end(table)) == (0, 0, 2)


def test_register_reads_on_into_a_slot_an_older_client_took(pwtest, clients, table):
    """A client that does not keep used_end took the first EMPTY slot after it: read on into it."""
    register(clients, table, "a")
    register(clients, table, "legacy")
    table.u32[abi.H_USED_END // 4] = 1
    assert register(clients, table, "legacy").rc_ == -errno.EEXIST
    n = register(clients, table, "n")
    assert (n.rc_, n.slot, _used_end(table)) == (0, 2, 3)


def test_register_reads_a_used_end_past_the_table_as_the_table(pwtest, clients, table):
    table.u32[abi.H_USED_END // 4] = 0xFFFFFFFF       # any group member can write it
    x = register(clients, table, "x")
    assert (x.rc_, x.slot, _used_end(table)) == (0, 0, 0xFFFFFFFF)
    assert register(clients, table, "x").rc_ == -errno.EEXIST


def test_stale_claim_is_reused(pwtest, clients, table):
    # A client killed between CLAIMING and publishing leaves CLAIMING, PID 0.
    off = abi.slot_offset(0)
    table.u32[(off + abi.S_STATE) // 4] = abi.State.CLAIMING
    table.buf[off + abi.S_NAME:off + abi.S_NAME + 5] = b"half\0"
    c = register(clients, table, "half")
    assert (c.rc_, c.slot) == (0, 0)


def test_full_table_then_oldest_end_reused(pwtest, clients, make_table):
    t = make_table(2)
    a, b = register(clients, t, "a"), register(clients, t, "b")
    assert (a.slot, b.slot) == (0, 1)
    assert register(clients, t, "c").rc_ == -errno.ENOSPC
    assert b.send("unreg") == 0                   # ends first: the oldest end
    assert a.send("unreg") == 0
    c = register(clients, t, "c")
    assert (c.rc_, c.slot) == (0, 1)
    assert t.field(0, "name").rstrip(b"\0") == b"a"


def test_concurrent_registrations_get_distinct_slots(pwtest, clients, make_table):
    t = make_table(32)
    cs = [clients("register", f"racer{i}", hex(t.key)) for i in range(20)]
    slots = []
    for c in cs:
        m = re.fullmatch(r"rc=0 slot=(\d+) pid=(\d+)", c.line())
        assert m
        slots.append(int(m.group(1)))
        assert t.field(slots[-1], "pid") == c.pid
    assert sorted(slots) == list(range(20))
    assert t.generation == 20
    assert t.sem.value == 1


# A C registration holds the lock for microseconds, not Python's hundreds: a
# missing lock shows in fewer rounds, so more rounds (each costs ~50 µs).
C_RACE_ROUNDS = 10 * RACE_ROUNDS


def _race_c(pwtest, tmp_path, table, names):
    """pwtest racers meeting at a barrier before each call (conftest.run_race); per round
    each racer's (outcome, slot, t0, t1), outcome WON (rc 0), LOST (-EEXIST) or rc=N."""
    barrier = barrier_file(tmp_path, len(names))
    rounds = run_race([[pwtest["pwtest"], "race", n, hex(table.key), str(barrier), str(i), str(len(names)),
                        str(C_RACE_ROUNDS)] for i, n in enumerate(names)])
    word = {"0": "WON", str(-errno.EEXIST): "LOST"}
    rounds = [[(word.get(c[0], f"rc={c[0]}"), *c[1:]) for c in calls] for calls in rounds]
    n = overlapped(rounds)
    assert n >= RACE_MIN_OVERLAP * len(rounds), \
        f"the calls overlapped in only {n} of {len(rounds)} rounds: the race proved nothing"
    return rounds


def test_two_c_clients_racing_for_one_name(pwtest, table, tmp_path):
    """Two C clients call procwatch_register() for one name at once, round after round:
    the semaphore lets exactly one win each time."""
    rounds = _race_c(pwtest, tmp_path, table, ["contested", "contested"])
    bad = [(r, calls) for r, calls in enumerate(rounds, 1) if sorted(c[0] for c in calls) != ["LOST", "WON"]]
    assert not bad, f"{len(bad)} of {len(rounds)} rounds without exactly one winner: {bad[:3]}"
    assert table.sem.value == 1


def test_two_c_clients_registering_at_once_get_distinct_slots(pwtest, table, tmp_path):
    """Fresh names each round, so every call allocates a slot: never the same one twice."""
    rounds = _race_c(pwtest, tmp_path, table, ["left%d", "right%d"])
    bad = [(r, calls) for r, calls in enumerate(rounds, 1)
           if [c[0] for c in calls] != ["WON", "WON"] or calls[0][1] == calls[1][1]]
    assert not bad, f"{len(bad)} of {len(rounds)} rounds without two slots: {bad[:3]}"
    assert table.generation == 4 * C_RACE_ROUNDS     # each register and unregister bumps it
    assert table.sem.value == 1


@pytest.mark.parametrize("name", [b"", b"x" * 32, b"\xff\xfe", b"ab\xc0\xafcd", b"\xed\xa0\x80"],
                         ids=["empty", "32-bytes", "not-utf8", "overlong", "surrogate"])
def test_bad_names(pwtest, clients, table, name):
    assert register(clients, table, name).rc_ == -errno.EINVAL
    assert table.generation == 0


# One name rule for every entry point (issue 13): procwatch.h accepted ESC, TAB
# and LF that Python refused, and nobody refused a name of spaces.
NAME_RULE_CASES = [
    ("ok", True), ("a b", True), ("数据面-服务", True), ("x" * 31, True), ("é" * 15 + "x", True),
    ("a\tb", False), ("a\nb", False), ("a\x1bb", False), ("a\x7fb", False), ("a\x85b", False),
    (" ", False), ("   ", False), (" lead", False), ("trail ", False), ("\u00a0x", False),
    ("x\u3000", False), ("", False), ("x" * 32, False),
]


@pytest.mark.parametrize("name, ok", NAME_RULE_CASES, ids=[repr(n)[:14] for n, _ in NAME_RULE_CASES])
def test_one_name_rule_in_python_and_c(pwtest, clients, table, name, ok):
    try:
        abi.encode_name(name)
        python_ok = True
    except ValueError:
        python_ok = False
    c = register(clients, table, name.encode())
    assert (python_ok, c.rc_ == 0) == (ok, ok), (python_ok, c.rc_)
    if not ok:
        assert c.rc_ == -errno.EINVAL
    peer = int(clients("peer", name.encode(), hex(table.key)).line())
    assert peer == (c.pid if ok else -errno.EINVAL)


def test_longest_and_non_ascii_names(pwtest, clients, table):
    assert register(clients, table, "x" * 31).rc_ == 0
    name = "dätenébene-Σ"
    c = register(clients, table, name.encode())
    assert c.rc_ == 0
    assert abi.decode_name(table.field(c.slot, "name")) == name


def test_missing_and_corrupt_tables(pwtest, clients, make_table):
    t = make_table(4)
    missing = fresh_key()
    try:
        sysv_ipc.SharedMemory(missing)
        pytest.skip(f"key {missing:#x} is in use")
    except sysv_ipc.ExistentialError:
        pass
    assert register(clients, t, "x").rc_ == 0
    assert clients("register", "x", hex(missing)).line().startswith(f"rc={-errno.ENOENT} ")
    assert int(clients("peer", "x", hex(missing)).line()) == -errno.ENOENT
    assert int(clients("peer", "x", hex(missing)).line()) == -errno.ENOENT
    for off, fmt, bad in ((abi.H_MAGIC, "8s", b"PWTABLX\0"), (abi.H_VERSION, "I", 1),
                          (abi.H_SLOT_SIZE, "I", 64), (abi.H_SLOT_COUNT, "I", 5),
                          (abi.H_SLOT_COUNT, "I", 0)):
        good = struct.unpack_from("=" + fmt, t.buf, off)[0]
        struct.pack_into("=" + fmt, t.buf, off, bad)
        assert register(clients, t, "y").rc_ == -errno.EPROTO, (off, bad)
        assert int(clients("peer", "x", hex(t.key)).line()) == -errno.EPROTO
        struct.pack_into("=" + fmt, t.buf, off, good)
    assert int(clients("peer", "x", hex(t.key)).line()) > 0


@pytest.mark.parametrize("spelling", [hex, str, lambda k: f"0X{k:X}"], ids=["hex", "decimal", "HEX"])
def test_key_from_environment(pwtest, clients, table, spelling):
    env = dict(os.environ, PROCWATCH_KEY=spelling(table.key))
    c = clients("register", "from-env", 0, env=env)
    assert c.line().startswith("rc=0 slot=0 ")
    assert table.field(0, "pid") == c.pid


@pytest.mark.parametrize("value", ["zzz", "0x", "-5", "0x80000000", "0", "12abc"])
def test_bad_key_in_environment(pwtest, clients, value):
    env = dict(os.environ, PROCWATCH_KEY=value)
    c = clients("register", "from-env", 0, env=env)
    assert c.line().startswith(f"rc={-errno.EINVAL} ")


def test_lock_timeout_is_an_error(pwtest, clients, table):
    table.sem.acquire()
    try:
        c = clients("register", "patient", hex(table.key), binary="pwtest_fastlock")
        assert c.line().startswith(f"rc={-errno.ETIMEDOUT} ")
        assert table.field(0, "state") == abi.State.EMPTY
    finally:
        table.sem.release()
    c = clients("register", "patient", hex(table.key), binary="pwtest_fastlock")
    assert c.line().startswith("rc=0 ")


def test_lock_holder_killed_gives_the_lock_back(pwtest, clients, table):
    # SEM_UNDO: a client killed while holding the semaphore must not deadlock the table.
    h = clients("lockhang", hex(table.key))
    assert h.line() == "locked"
    assert table.sem.value == 0
    os.kill(h.pid, signal.SIGKILL)
    h.wait()
    assert table.sem.value == 1
    assert register(clients, table, "after").rc_ == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
