"""The slot table's SysV segment and semaphore: create, adopt, attach, lock.

This is the only module that talks to sysv_ipc.  Its errors are translated
here, once, into procwatch's own (psutil's ``wrap_exceptions`` idea):
``ExistentialError`` -> :class:`SegmentMissing`, ``PermissionsError`` ->
:class:`SegmentPermissionError`, a foreign or damaged layout ->
:class:`SegmentCorrupt`.

Two hazards shape it:

* sysv_ipc fills a new segment with spaces unless told otherwise
  (``init_character``); a table must start as zeroes, since a zero PID word
  means "empty".
* The semaphore that serialises slot allocation is taken with SEM_UNDO, so
  a client killed while holding it cannot deadlock the table: the kernel
  undoes its decrement at exit (semop(2)).
"""

import collections as _collections
import contextlib as _contextlib
import ctypes as _ctypes
import errno as _errno
import os as _os
import threading as _threading
import time as _time

import sysv_ipc as _sysv_ipc

from . import abi as _abi
from . import futex as _futex
from . import procfs as _procfs
from .native import hot as _hot
from .errors import (SegmentCorrupt, SegmentMissing, SegmentPermissionError,
                     TableBusy)

_MAX_STATE = max(_abi.State)
_PID_STATES = (_abi.State.ALIVE, _abi.State.HUNG)      # the only states a set PID word may have


# semtimedop(2) through ctypes: this sysv_ipc build has no timeouts
# (SEMAPHORE_TIMEOUT_SUPPORTED is False, and acquire(timeout) then blocks
# forever), and a stuck holder must be an error, not a hang.
SEM_UNDO = 0x1000
IPC_NOWAIT = 0o4000
SHM_DEST = 0o1000          # include/uapi/linux/shm.h: segment will be destroyed on last detach


class _sembuf(_ctypes.Structure):
    _fields_ = [("sem_num", _ctypes.c_ushort), ("sem_op", _ctypes.c_short), ("sem_flg", _ctypes.c_short)]


def _semop(semid, op, timeout):
    """One semop with SEM_UNDO; False on timeout (timeout 0: don't wait)."""
    flags = SEM_UNDO | (IPC_NOWAIT if timeout == 0 else 0)
    buf = _sembuf(0, op, flags)
    deadline = None if not timeout else _time.monotonic() + timeout
    while True:
        ts = None
        if deadline is not None:
            left = max(0.0, deadline - _time.monotonic())
            ts = _ctypes.byref(_futex.timespec.of(left))
        if _futex.libc.semtimedop(semid, _ctypes.byref(buf), 1, ts) == 0:
            return True
        err = _ctypes.get_errno()
        if err == _errno.EINTR:
            continue
        if err == _errno.EAGAIN:
            return False
        raise OSError(err, _os.strerror(err))


def resolve_key(key=None):
    """The table key to use: ``key``, else $PROCWATCH_KEY, else the default."""
    if key is None:
        env = _os.environ.get("PROCWATCH_KEY")
        if env:
            try:
                key = int(env, 0)
            except ValueError:
                raise ValueError(f"PROCWATCH_KEY={env!r} is not an integer (e.g. 0x70770001)") from None
        else:
            key = _abi.DEFAULT_KEY
    if not 0 < key <= 0x7FFFFFFF:
        raise ValueError(f"key {key:#x} is out of range: use 1..0x7fffffff")
    return key


# A named tuple, not a dataclass: ``import dataclasses`` alone cost a client
# ~9 ms of its start-up (issue 12).
_SlotFields = _collections.namedtuple(
    "Slot", "index pid state start_time name heartbeat_seq heartbeat_ms misses exit_status cause "
            "exit_time_ns registered_ns latency_us owner_uid last_beat_ns heartbeat_action "
            "heartbeat_signal verdict death_arm death_tid detected_by teardown_us raw_name",
    defaults=(0, 0, 0, 0, _abi.LATENCY_UNKNOWN, b""))


def state_name(state):
    """A slot's state word in words: 'alive', 'exited', ..., or 'invalid(N)'."""
    try:
        return _abi.State(state).name.lower()
    except ValueError:
        return f"invalid({state})"


class Slot(_SlotFields):
    """A snapshot of one slot (not atomic across fields: for display and checks)."""
    __slots__ = ()

    @property
    def state_name(self):
        return state_name(self.state)

    @property
    def verdict_name(self):
        """'busy', 'starved', ... or None while no hang was judged."""
        if not self.verdict:
            return None
        try:
            return _abi.Verdict(self.verdict).name.lower()
        except ValueError:
            return f"invalid({self.verdict})"

    @property
    def arm_name(self):
        try:
            return _abi.Arm(self.death_arm).name.lower()
        except ValueError:
            return f"invalid({self.death_arm})"

    @property
    def cause_name(self):
        try:
            return _abi.Cause(self.cause).name.lower()
        except ValueError:
            return f"invalid({self.cause})"


def _sysv_shm_info(key):
    """(mode, gid) of the segment at ``key`` from /proc/sysvipc/shm, for messages."""
    try:
        with open("/proc/sysvipc/shm") as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[0]) == key:
                    return int(cols[2], 8) & 0o777, int(cols[8])
    except (OSError, ValueError, IndexError):
        pass
    return None, None


class Table:
    """An attached slot table.

    ``u32`` and ``u64`` are memoryviews of the whole segment cast to aligned
    words: ``u32[i] = v`` is one aligned store, the only way the PID word is
    ever written from Python.
    """

    def __init__(self, key, shm, sem=None, readonly=False):
        self.key = key
        self._shm = shm
        self._sem = sem
        self.shmid = shm.id
        self.address = shm.address
        self.size = shm.size
        self.readonly = readonly
        # A read-only mapping written through a writable view would SIGSEGV:
        # the view says read-only too, so a write is a TypeError instead.
        self.buf = memoryview(shm).toreadonly() if readonly else memoryview(shm)
        self.u32 = self.buf.cast("I")
        self.u64 = self.buf.cast("Q")
        self.slot_count = 0
        # Service-side writes to a slot; with the C extension a mutex the hot step takes too.
        self.service_lock = _hot.ServiceLock() if _hot else _threading.Lock()
        self._exits = None                      # the service's own count (own_exits()), else None
        self._pending = {}                      # (slot, pid) -> entry of H_PENDING_ENDS

    # -- opening ------------------------------------------------------------
    @classmethod
    def attach(cls, key=None, readonly=False):
        """Attach an existing table (client side).  Never creates one.

        ``readonly``: shmat(SHM_RDONLY), for processes that only read the
        table (``Peer``, ``procwatch wait`` and ``status``).  The service
        signals a hung process only if it has the table attached writable
        (a client that beats must), so a forged slot naming a reader cannot
        get that reader killed (issue 13).  sysv_ipc attaches read-only
        when the mode asked for has no write bit.
        """
        key = resolve_key(key)
        try:
            shm = _sysv_ipc.SharedMemory(key, mode=0o400) if readonly else _sysv_ipc.SharedMemory(key)
        except _sysv_ipc.ExistentialError:
            raise SegmentMissing(key) from None
        except _sysv_ipc.PermissionsError:
            raise SegmentPermissionError(key, *_sysv_shm_info(key)) from None
        table = cls(key, shm, readonly=readonly)
        table._validate()
        return table

    @classmethod
    def create_or_adopt(cls, key, slots=_abi.DEFAULT_SLOTS, mode=0o660, gid=None):
        """Create the table, or adopt an existing one of the same layout.

        Returns ``(table, adopted)``.  Adopting keeps every registration: a
        restarted service must not forget its clients.  A segment of another
        layout raises :class:`SegmentCorrupt`, whose message names the
        ``ipcrm`` command; it is never wiped silently.
        """
        key = resolve_key(key)
        if not 1 <= slots <= _abi.MAX_SLOTS:
            raise ValueError(f"--slots {slots} is out of range: use 1..{_abi.MAX_SLOTS}")
        adopted = False
        try:
            shm = _sysv_ipc.SharedMemory(key, _sysv_ipc.IPC_CREX, mode=mode,
                                         size=_abi.segment_size(slots), init_character=b"\0")
        except _sysv_ipc.ExistentialError:
            adopted = True
            try:
                shm = _sysv_ipc.SharedMemory(key)
            except _sysv_ipc.PermissionsError:
                raise SegmentPermissionError(key, *_sysv_shm_info(key)) from None
        except _sysv_ipc.PermissionsError:
            raise SegmentPermissionError(key) from None
        if gid is not None and shm.gid != gid:
            shm.gid = gid
        if not adopted:
            _abi.HEADER_STATIC.pack_into(shm, 0, _abi.MAGIC, _abi.VERSION, _abi.HEADER_SIZE,
                                         _abi.SLOT_SIZE, slots)
        try:
            sem = _sysv_ipc.Semaphore(key, _sysv_ipc.IPC_CREX, mode=mode, initial_value=1)
        except _sysv_ipc.ExistentialError:
            sem = _sysv_ipc.Semaphore(key)
        if gid is not None and sem.gid != gid:
            sem.gid = gid
        table = cls(key, shm, sem)
        table._validate()
        return table, adopted

    def _validate(self):
        """Check the header against this layout; raise SegmentCorrupt if foreign."""
        why = self.header_problem()
        if why:
            self.detach()
            raise SegmentCorrupt(self.key, why)
        self.slot_count = self.u32[_abi.H_SLOT_COUNT // 4]

    def header_problem(self):
        """Why the header is not a valid table of this layout, or None."""
        if self.size < _abi.HEADER_SIZE:
            return f"segment is {self.size} bytes, smaller than the {_abi.HEADER_SIZE}-byte header"
        magic, version, hsize, ssize, count = _abi.HEADER_STATIC.unpack_from(self.buf, 0)
        if magic != _abi.MAGIC:
            return f"magic is {magic!r}, expected {_abi.MAGIC!r}"
        if version != _abi.VERSION:
            if magic == _abi.MAGIC and version < _abi.VERSION:
                return (f"it has layout version {version}, made by an older procwatch; this one needs "
                        f"version {_abi.VERSION} (the death word)")
            return f"layout version {version}, this procwatch reads {_abi.VERSION}"
        if hsize != _abi.HEADER_SIZE or ssize != _abi.SLOT_SIZE:
            return f"header/slot sizes {hsize}/{ssize}, expected {_abi.HEADER_SIZE}/{_abi.SLOT_SIZE}"
        if not 1 <= count <= _abi.MAX_SLOTS or _abi.segment_size(count) > self.size:
            return f"slot count {count} does not fit a {self.size}-byte segment"
        return None

    def detach(self):
        """Release the views and detach.  Idempotent."""
        if self._shm is None:
            return
        for view in (self.u32, self.u64, self.buf):
            view.release()
        try:
            self._shm.detach()
        except _sysv_ipc.NotAttachedError:
            pass
        self._shm = None

    def remove(self):
        """Remove segment and semaphore (tests and uninstall; the service never does)."""
        self.detach()
        for remover in (lambda: _sysv_ipc.remove_shared_memory(self.shmid),
                        lambda: _sysv_ipc.Semaphore(self.key).remove()):
            try:
                remover()
            except (_sysv_ipc.ExistentialError, _sysv_ipc.PermissionsError):
                pass

    def still_present(self):
        """Whether our segment is still the one at the key (not removed with ipcrm).

        One IPC_STAT of our own shmid: ``ipcrm -M`` marks an attached segment
        SHM_DEST (and frees its key) until its last detach.  Never build a
        ``sysv_ipc.SharedMemory`` here: its constructor attaches, and this runs
        every reconcile pass (issue 13: one mapping more per pass, until the
        kernel's map limit killed the service).
        """
        if self._shm is None:
            return False
        try:
            return not self._shm.mode & SHM_DEST
        except (_sysv_ipc.ExistentialError, _sysv_ipc.PermissionsError):
            return False

    def semaphore_present(self):
        """Whether the semaphore at the key is still the one this table locks with."""
        if self._sem is None:
            return True               # never used yet: attach it when needed
        try:
            return _sysv_ipc.Semaphore(self.key).id == self._sem.id
        except (_sysv_ipc.ExistentialError, _sysv_ipc.PermissionsError):
            return False

    # -- the semaphore --------------------------------------------------------
    def _semaphore(self):
        if self._sem is None:
            try:
                self._sem = _sysv_ipc.Semaphore(self.key)
            except _sysv_ipc.ExistentialError:
                raise SegmentMissing(self.key) from None
            except _sysv_ipc.PermissionsError:
                raise SegmentPermissionError(self.key, *_sysv_shm_info(self.key)) from None
        return self._sem

    @_contextlib.contextmanager
    def lock(self, timeout=5.0):
        """Hold the table's semaphore (SEM_UNDO) for slot allocation."""
        sem = self._semaphore()
        try:
            taken = _semop(sem.id, -1, timeout)
        except PermissionError:
            raise SegmentPermissionError(self.key, *_sysv_shm_info(self.key)) from None
        except OSError as e:
            if e.errno in (_errno.EINVAL, _errno.EIDRM):     # removed under us
                raise SegmentMissing(self.key) from None
            raise
        if not taken:
            holder = sem.last_pid
            raise TableBusy(self.key, holder, timeout, holder_gone=not _procfs.process_exists(holder))
        try:
            yield
        finally:
            _semop(sem.id, 1, 0)

    def lock_holder(self):
        """(value, last PID, last semop time in s) of the table's semaphore; None if it is gone.

        semctl(2) GETVAL, GETPID, IPC_STAT's sem_otime.  A value of 0 means
        "held": by the last PID, unless that process gave it back since.
        """
        try:
            sem = self._semaphore()
            return sem.value, sem.last_pid, sem.o_time
        except (SegmentMissing, SegmentPermissionError, _sysv_ipc.ExistentialError,
                _sysv_ipc.PermissionsError):
            return None

    def unwedge_lock(self, seen):
        """Give the semaphore back (value 1) if it still is as ``seen`` (lock_holder()).

        For a hold its holder can no longer release: taken without SEM_UNDO
        by a process that has exited.  XXX: semctl(SETVAL) cannot compare and
        set; a release and a new take between the check and the SETVAL would
        let two holders in, but a wedged lock sees no release in the first place.
        """
        if self.lock_holder() != seen:
            return False
        try:
            self._semaphore().value = 1
        except (_sysv_ipc.ExistentialError, _sysv_ipc.PermissionsError):
            return False
        return True

    def try_lock(self):
        """Take the semaphore only if free; True if taken (release with unlock())."""
        return _semop(self._semaphore().id, -1, 0)

    def unlock(self):
        _semop(self._semaphore().id, 1, 0)

    # -- raw words ----------------------------------------------------------------
    # By offset: for this module, and for tests that play a foreign writer
    # (a C client, a hostile group member).  Every other procwatch module
    # says what it wants through the named operations below.
    def get32(self, i, field):
        return self.u32[(_abi.slot_offset(i) + field) >> 2]

    def set32(self, i, field, value):
        self.u32[(_abi.slot_offset(i) + field) >> 2] = value & 0xFFFFFFFF

    def get64(self, i, field):
        return self.u64[(_abi.slot_offset(i) + field) >> 3]

    def set64(self, i, field, value):
        self.u64[(_abi.slot_offset(i) + field) >> 3] = value

    def hget32(self, field):
        return self.u32[field >> 2]

    def hset32(self, field, value):
        self.u32[field >> 2] = value & 0xFFFFFFFF

    def hget64(self, field):
        return self.u64[field >> 3]

    def hset64(self, field, value):
        self.u64[field >> 3] = value

    def pid_index(self, i):
        """Index into ``u32`` of slot ``i``'s PID word."""
        return (_abi.HEADER_SIZE + i * _abi.SLOT_SIZE) // 4

    # -- the header -----------------------------------------------------------------
    @property
    def generation(self):
        return self.u32[_abi.H_GENERATION >> 2]

    @property
    def generation_address(self):
        """Virtual address of the header's generation word (a futex: FUTEX_WAIT on it)."""
        return self.address + _abi.H_GENERATION

    def bump_generation(self):
        """Count a registration change and wake whoever waits on it (hold lock())."""
        self.hset32(_abi.H_GENERATION, self.generation + 1)
        _futex.wake(self.address + _abi.H_GENERATION)

    def nudge_generation(self):
        """Move the generation without the lock and wake its waiters (the service's stop).

        A wake alone is lost on a thread between its last look and its sleep,
        which then sleeps on the old value; a moved value turns that sleep
        away.  Atomic where the C extension is there, so a client's bump
        under the lock is never undone; its waiters only look again.
        """
        address = self.address + _abi.H_GENERATION
        if _hot is not None:
            while True:
                value = self.generation
                if _hot.cas32(address, value, (value + 1) & 0xFFFFFFFF):
                    break
        else:
            self.hset32(_abi.H_GENERATION, self.generation + 1)
        _futex.wake(address)

    def service(self):
        """(PID, start time) of the service the header names; PID 0 when none."""
        return self.hget32(_abi.H_SERVICE_PID), self.hget64(_abi.H_SERVICE_START_TIME)

    def set_service(self, pid, start_time, heartbeat_period_ms):
        """Name the serving process.  The PID goes last: a reader that sees it sees its start time."""
        self.hset64(_abi.H_SERVICE_START_TIME, start_time)
        self.hset32(_abi.H_HEARTBEAT_PERIOD_MS, heartbeat_period_ms)
        self.hset32(_abi.H_SERVICE_PID, pid)

    def clear_service(self, pid, backend=False):
        """The service ``pid`` leaves: PID 0 (and, with ``backend``, Backend.NONE).

        Only if the header still names ``pid``: a newer service may own it now.
        """
        if self.hget32(_abi.H_SERVICE_PID) != pid:
            return False
        self.hset32(_abi.H_SERVICE_PID, 0)
        if backend:
            self.hset32(_abi.H_BACKEND, _abi.Backend.NONE)
            self.hset32(_abi.H_DEATH_WATCH, _abi.DeathWatch.OFF)
        return True

    def set_backend(self, backend):
        self.hset32(_abi.H_BACKEND, backend)

    def beat_service(self):
        """Bump the service heartbeat (the service's main loop, every period)."""
        self.hset64(_abi.H_SERVICE_HEARTBEAT, self.hget64(_abi.H_SERVICE_HEARTBEAT) + 1)

    # The header words the service writes once at start and never again while
    # it runs, with names for messages.  (The backend and the heartbeat period
    # may legitimately change at run time; they are not here.)
    # The service's own header words: written at start (the backend once it is
    # chosen, before the guard takes its snapshot) and never again while it
    # runs.  The exits counter changes, but only by the service: own_exits().
    _SERVICE_WORDS = ((_abi.H_SERVICE_PID, 4, "service PID"),
                      (_abi.H_SERVICE_START_TIME, 8, "service start time"),
                      (_abi.H_HEARTBEAT_PERIOD_MS, 4, "heartbeat period"),
                      (_abi.H_BACKEND, 4, "backend"))

    def header_snapshot(self):
        """What restore_header() puts back: the layout fields and the service's own words."""
        return (bytes(self.buf[:_abi.HEADER_STATIC.size]),
                tuple(self.hget32(off) if size == 4 else self.hget64(off)
                      for off, size, _ in self._SERVICE_WORDS))

    def restore_header(self, snapshot):
        """Put back what differs from ``snapshot``; returns the names of what was changed."""
        static, words = snapshot
        changed = []
        if bytes(self.buf[:len(static)]) != static:
            self.buf[:len(static)] = static              # no PID word lives here
            changed.append("layout fields (magic .. slot count)")
        for (off, size, name), value in zip(self._SERVICE_WORDS, words):
            if (self.hget32(off) if size == 4 else self.hget64(off)) != value:
                if size == 4:
                    self.hset32(off, value)
                else:
                    self.hset64(off, value)
                changed.append(name)
        return changed

    # -- columns: one field of every slot, one strided copy each -------------------
    def column(self, field, end=None):
        """Field ``field`` (a name of abi.SLOT_FIELDS, e.g. 'pid') of every slot (or of the first ``end``), as a list."""
        off, wide = _abi.SLOT_FIELDS[field]
        n = self.slot_count if end is None else end
        if wide:
            step = _abi.SLOT_SIZE // 8
            a = (_abi.HEADER_SIZE + off) // 8
            return self.u64[a:a + n * step:step].tolist()
        step = _abi.SLOT_SIZE // 4
        a = (_abi.HEADER_SIZE + off) // 4
        return self.u32[a:a + n * step:step].tolist()

    def any_heartbeat(self):
        """Whether some registered slot (PID word set) asks for beats; None without the C extension.

        The hang checker, while it tracks nothing, asks this (one C pass,
        ~5 µs at 1024 slots) before it copies any column: a registration
        without a heartbeat then costs it nothing (issue 16).
        """
        if _hot is None:
            return None
        return _hot.any_set(self.address, self.scan_end(), _abi.S_HEARTBEAT_MS)

    def slot_changes(self):
        """A procwatch._hotstep.Changes over this table's slots (None without the C extension):
        its diff(address) lists the slots whose (PID word, start time) moved since the last one."""
        return None if _hot is None else _hot.Changes(self.slot_count)

    def hang_fingerprint(self):
        """A hash of every slot's (heartbeat interval, PID word, registration time), or None
        without the C extension.  The hang checker compares it pass to pass while it tracks
        nothing, instead of copying three columns (issue 16: ~8 ms at 65536 slots)."""
        if _hot is None:
            return None
        return _hot.fingerprint(self.address, self.scan_end(), _abi.S_HEARTBEAT_MS, _abi.S_PID,
                                _abi.S_REGISTERED_NS)

    def pid_words(self):
        """Every slot's PID word, as a list (one strided copy: cheap)."""
        return self.column("pid")

    def state_words(self):
        """Every slot's state word, as a list."""
        return self.column("state")

    # -- one field of one slot --------------------------------------------------------
    def pid(self, i):
        """Slot ``i``'s PID word: non-zero while its process is registered and alive."""
        return self.u32[(_abi.HEADER_SIZE + i * _abi.SLOT_SIZE) >> 2]

    def pid_word(self, i):
        """(u32 view, index) of slot ``i``'s PID word, for readers that inline the read.

        ``view[index]`` is one aligned load; Peer.alive reads it that way, since
        a method call would be most of its cost.  Never write through it.
        """
        return self.u32, (_abi.HEADER_SIZE + i * _abi.SLOT_SIZE) >> 2

    def death_word_view(self, i):
        """(u32 view, arm index, word index) of slot ``i``'s death word, for readers that
        inline abi.death_word_dead() (Peer.alive).  Never write through it."""
        off = _abi.slot_offset(i)
        return self.u32, (off + _abi.S_DEATH_ARM) >> 2, (off + _abi.S_DEATH_MUTEX) >> 2

    def beat_word(self, i):
        """(u64 view, index) of slot ``i``'s heartbeat sequence: ``view[index] += 1`` is beat()."""
        return self.u64, (_abi.slot_offset(i) + _abi.S_HEARTBEAT_SEQ) >> 3

    def pid_address(self, i):
        """Virtual address of slot ``i``'s PID word in this process (for futexes)."""
        return self.address + _abi.slot_offset(i) + _abi.S_PID

    def state(self, i):
        return self.get32(i, _abi.S_STATE)

    def cause(self, i):
        return self.get32(i, _abi.S_CAUSE)

    def start_time(self, i):
        return self.get64(i, _abi.S_START_TIME)

    def name_bytes(self, i):
        """Slot ``i``'s name as stored (UTF-8, NUL padding stripped)."""
        off = _abi.slot_offset(i) + _abi.S_NAME
        return bytes(self.buf[off:off + _abi.NAME_SIZE]).rstrip(b"\0")

    def heartbeat_ms(self, i):
        return self.get32(i, _abi.S_HEARTBEAT_MS)

    def misses(self, i):
        return self.get32(i, _abi.S_MISSES)

    def registered_ns(self, i):
        return self.get64(i, _abi.S_REGISTERED_NS)

    def exit_time_ns(self, i):
        return self.get64(i, _abi.S_EXIT_TIME_NS)

    # -- how far a pass goes: the header's used_end (issue 16) -------------------------
    # A table of 65536 slots is 12 MiB; a pass over all of it costs a fresh attachment ~4-8 ms
    # of page faults and an idle service a strided read of every slot.  Clients take the first
    # EMPTY slot and keep H_USED_END past every slot they take (under the lock), so the slots
    # in use lie below it; passes stop at the first EMPTY slot at or after it (a client that
    # does not keep it took exactly that slot).  Any group member can write it: it is clamped
    # to the table, a pass never trusts it for more than where to stop, and the service's
    # guard puts it right (fix_used_end) when a slot was written past it or it says too much.
    def used_end(self):
        """The header's used_end, as written (may be anything: see scan_end())."""
        return self.hget32(_abi.H_USED_END)

    def scan_end(self):
        """How far a pass over the slots must go: used_end clamped, then on past used slots."""
        if _hot is not None:
            return _hot.scan_end(self.address, self.slot_count)
        end, count, u32 = min(self.used_end(), self.slot_count), self.slot_count, self.u32
        while end < count and u32[(_abi.slot_offset(end) + _abi.S_STATE) >> 2] != _abi.State.EMPTY:
            end += 1
        return end

    def true_end(self):
        """One past the last slot whose state or PID word is not zero (what used_end should say)."""
        if _hot is not None:
            return _hot.true_end(self.address, self.slot_count)
        u32, end = self.u32, self.slot_count
        while end and not (u32[(_abi.slot_offset(end - 1) + _abi.S_STATE) >> 2]
                           or u32[_abi.slot_offset(end - 1) >> 2]):
            end -= 1
        return end

    def first_used(self, start, stop):
        """The first slot in [start, stop) whose state or PID word is not zero, or -1."""
        stop = min(stop, self.slot_count)
        if _hot is not None:
            return _hot.first_used(self.address, start, stop) if start < stop else -1
        u32 = self.u32
        for i in range(start, stop):
            off = _abi.slot_offset(i)
            if u32[(off + _abi.S_STATE) >> 2] or u32[off >> 2]:
                return i
        return -1

    def used_end_looks_wrong(self):
        """Whether used_end is not where the used slots end, as far as a look near it tells.

        Past the table, short of a slot used right after it (read on into by
        every pass), or over a last slot that is clear: a few words read.  A
        slot used further past it is found by first_used() on the tail.
        """
        written, end = self.used_end(), self.scan_end()
        if written != end:
            return True
        if end == 0:
            return False
        off = _abi.slot_offset(end - 1)
        return not (self.u32[(off + _abi.S_STATE) >> 2] or self.u32[off >> 2])

    def _raise_used_end(self, end):
        """used_end := ``end`` if that is more (hold lock(): every writer of used_end does).

        Never less: only the service's guard lowers it, after a look under the lock.
        """
        if end > self.used_end():
            self.hset32(_abi.H_USED_END, end)

    def fix_used_end(self, wait=False):
        """Service: make used_end say where the used slots end; (old, new) when it changed, else None.

        The look is one backward pass over the EMPTY tail (no lock: ~1 ms at
        65536 slots, so the guard calls this only when used_end_looks_wrong()
        or first_used() found a slot past it); only when it disagrees is the
        lock taken and the look repeated under it, so no client is
        mid-registration.  A busy lock: None, try again later
        (``wait``: start-up, before the first full sync, waits for it as a
        client would, and raises TableBusy if it stays taken).
        """
        if self.true_end() == self.used_end():
            return None
        if wait:
            with self.lock():
                return self._set_used_end()
        if not self.try_lock():
            return None
        try:
            return self._set_used_end()
        finally:
            self.unlock()

    def _set_used_end(self):
        old, new = self.used_end(), self.true_end()
        if old == new:
            return None
        self.hset32(_abi.H_USED_END, new)
        return old, new

    def find_name(self, raw):
        """(same, first_empty): the first used slot named ``raw`` and the first EMPTY slot; -1 for none.

        Hold lock().  The pass stops at the first EMPTY slot at or after
        used_end (one C pass where the extension loaded), and moves used_end
        past the used slots it found beyond it (written by a client that does
        not keep it).
        """
        if _hot is not None:
            same, first_empty, end = _hot.find_name(self.address, self.slot_count, raw)
        else:
            same = first_empty = -1
            hint, u32, end = min(self.used_end(), self.slot_count), self.u32, self.slot_count
            for i in range(self.slot_count):
                off = _abi.slot_offset(i)
                if u32[(off + _abi.S_STATE) >> 2] == _abi.State.EMPTY:
                    if first_empty < 0:
                        first_empty = i
                    if i >= hint:
                        end = i
                        break
                    continue
                if bytes(self.buf[off + _abi.S_NAME:off + _abi.S_NAME + _abi.NAME_SIZE]).rstrip(b"\0") == raw:
                    same, end = i, -1
                    break
        if end > self.used_end() and not self.readonly:
            self._raise_used_end(end)
        return same, first_empty

    def stale_claim_candidates(self):
        """Slots with PID word 0 in state CLAIMING (not locked: check again under the lock)."""
        if _hot is not None:
            return _hot.stale_claims(self.address, self.scan_end())
        return [i for i, (pid, state) in enumerate(zip(self.pid_words(), self.state_words()))
                if pid == 0 and state == _abi.State.CLAIMING]

    # -- the death word (issue 14) ----------------------------------------------
    def death_mutex_address(self, i):
        """Virtual address of slot ``i``'s death mutex here (its first u32 is the death word)."""
        return self.address + _abi.slot_offset(i) + _abi.S_DEATH_MUTEX

    def death_word(self, i):
        return self.u32[(_abi.slot_offset(i) + _abi.S_DEATH_MUTEX) >> 2]

    def death_arm(self, i):
        return self.u32[(_abi.slot_offset(i) + _abi.S_DEATH_ARM) >> 2]

    def death_fired(self, i):
        """Whether slot ``i``'s armed death word says its process died (abi.death_word_dead)."""
        off = _abi.slot_offset(i)
        return _abi.death_word_dead(self.u32[(off + _abi.S_DEATH_ARM) >> 2],
                                    self.u32[(off + _abi.S_DEATH_MUTEX) >> 2])

    def arm(self, i, tid):
        """Sentinel thread ``tid`` holds slot ``i``'s death mutex: the TID first, then ARMED.

        A client arms before it publishes the PID word, under the table lock
        (client.register_pid); the preload library of 'procwatch run' arms a
        published slot and then bumps the generation itself.
        """
        off = _abi.slot_offset(i)
        self.u32[(off + _abi.S_DEATH_TID) >> 2] = tid
        self.u32[(off + _abi.S_DEATH_ARM) >> 2] = _abi.Arm.ARMED

    def set_arm(self, i, arm):
        """Say why slot ``i`` is not armed (an Arm other than ARMED), or that it is being disarmed."""
        self.u32[(_abi.slot_offset(i) + _abi.S_DEATH_ARM) >> 2] = arm

    def disarm(self, i, pid):
        """Unregistering ``pid``: DISARMED first, so the unlock that follows is never a death."""
        off = _abi.slot_offset(i)
        if (self.u32[(off + _abi.S_PID) >> 2] == pid
                and self.u32[(off + _abi.S_DEATH_ARM) >> 2] == _abi.Arm.ARMED):
            self.u32[(off + _abi.S_DEATH_ARM) >> 2] = _abi.Arm.DISARMED

    def lose_arm_if_fired(self, i):
        """The word fired but the process lives on (execve): the slot is connector-only now.

        Only while the word still says OWNER_DIED: a new image that re-armed
        it meanwhile (the preload library) keeps its arming.  XXX: a re-arm
        between this check and the store loses the arming (the slot is then
        connector-only: late, never falsely dead).
        """
        if self.death_fired(i):
            self.set_arm(i, _abi.Arm.LOST)
            return True
        return False

    def armed_slots(self):
        """[(slot, pid)] of every slot with a non-zero PID word and an ARMED death word."""
        end = self.scan_end()
        if _hot is not None:        # one C pass: the death-word waiters ask on every generation change
            return _hot.pids_where(self.address, end, _abi.S_DEATH_ARM, _abi.Arm.ARMED)
        return [(i, p) for i, (p, a) in enumerate(zip(self.column("pid", end), self.column("death_arm", end)))
                if p and a == _abi.Arm.ARMED]

    def set_death_watch(self, value):
        self.hset32(_abi.H_DEATH_WATCH, value)

    def death_watch(self):
        """The header's DeathWatch: whether the service waits on death words."""
        return self.hget32(_abi.H_DEATH_WATCH)

    # -- whole slots ----------------------------------------------------------
    def read_slot(self, i):
        if not 0 <= i < self.slot_count:
            raise IndexError(f"slot {i} out of range 0..{self.slot_count - 1}")
        f = _abi.SLOT.unpack_from(self.buf, _abi.slot_offset(i))
        return Slot(i, f[0], f[1], f[2], _abi.decode_name(f[3]), *f[4:], raw_name=bytes(f[3]).rstrip(b"\0"))

    def used_slots(self):
        """Snapshots of every slot that is not EMPTY."""
        return [self.read_slot(i) for i, s in enumerate(self.state_words()) if s != _abi.State.EMPTY]

    def write_name(self, i, raw):
        off = _abi.slot_offset(i) + _abi.S_NAME
        self.buf[off:off + _abi.NAME_SIZE] = raw.ljust(_abi.NAME_SIZE, b"\0")

    def clear_slot_body(self, i):
        """Zero slot ``i`` after its PID word and state (set the state yourself).

        The state stays as it is meanwhile, so a reader never sees a slot
        being filled in as EMPTY.
        """
        off = _abi.slot_offset(i)
        self.buf[off + 8:off + _abi.SLOT_SIZE] = bytes(_abi.SLOT_SIZE - 8)

    def reset(self, i):
        """Make slot ``i`` EMPTY: its body zeroed, then the state.  Its PID word must be 0."""
        self.clear_slot_body(i)
        self.set32(i, _abi.S_STATE, _abi.State.EMPTY)

    # -- client side: claim, publish, release --------------------------------------
    # The two rules of abi's docstring live here and nowhere else: the PID
    # word is cleared first (claim, release, clear_pid) and published last
    # (publish), each with one aligned store.  tests/test_segment.py holds
    # each rule to the order of the stores.
    def claim(self, i):
        """Start filling slot ``i`` in (hold lock()): PID word 0 first, then CLAIMING, body zeroed.

        used_end moves past it first, so no pass stops before a slot in use.
        """
        self._raise_used_end(i + 1)
        self.u32[self.pid_index(i)] = 0                 # cleared first
        self.set32(i, _abi.S_STATE, _abi.State.CLAIMING)
        self.clear_slot_body(i)

    def publish(self, i, pid, start_time, raw_name, heartbeat_ms=0,
                hang_action=_abi.HangAction.DEFAULT, hang_signal=0, owner_uid=0, now_ns=None):
        """Fill claimed slot ``i`` in and publish ``pid`` (hold lock(), after claim()).

        Every field is written before the state turns ALIVE and the PID word
        is set, last: a reader that sees the PID sees its start time and name.
        Then the generation moves, so the service sees the registration.
        """
        now = _time.time_ns() if now_ns is None else now_ns
        self.set64(i, _abi.S_START_TIME, start_time)
        self.write_name(i, raw_name)
        self.set32(i, _abi.S_HEARTBEAT_MS, heartbeat_ms)
        self.set32(i, _abi.S_HEARTBEAT_ACTION, hang_action)
        self.set32(i, _abi.S_HEARTBEAT_SIGNAL, hang_signal)
        self.set32(i, _abi.S_EXIT_STATUS, _abi.EXIT_STATUS_UNKNOWN)
        self.set64(i, _abi.S_REGISTERED_NS, now)
        self.set32(i, _abi.S_LATENCY_US, _abi.LATENCY_UNKNOWN)
        self.set32(i, _abi.S_TEARDOWN_US, _abi.LATENCY_UNKNOWN)
        self.set32(i, _abi.S_OWNER_UID, owner_uid)
        self.set64(i, _abi.S_LAST_BEAT_NS, now)
        self.set32(i, _abi.S_STATE, _abi.State.ALIVE)
        self.u32[self.pid_index(i)] = pid               # published last
        self.bump_generation()

    def release(self, i, pid, now_ns=None):
        """Unregister ``pid`` from slot ``i`` (hold lock()); False if the slot no longer holds it.

        The PID word is cleared first and its waiters woken; the cause, time
        and state UNREGISTERED follow.
        """
        idx = self.pid_index(i)
        if self.u32[idx] != pid:
            return False
        self.disarm(i, pid)                             # marked first: the unlock that follows is no death
        self.u32[idx] = 0                               # cleared first
        _futex.wake(self.pid_address(i))
        self.set32(i, _abi.S_CAUSE, _abi.Cause.UNREGISTERED)
        self.set64(i, _abi.S_EXIT_TIME_NS, _time.time_ns() if now_ns is None else now_ns)
        self.set32(i, _abi.S_STATE, _abi.State.UNREGISTERED)
        self.bump_generation()
        return True

    def set_heartbeat(self, i, ms, now_ns=None):
        """Slot ``i`` expects a beat every ``ms`` ms (0: no hang detection), counted from now."""
        self.set32(i, _abi.S_HEARTBEAT_MS, ms)
        self.set64(i, _abi.S_LAST_BEAT_NS, _time.time_ns() if now_ns is None else now_ns)

    def adopt(self, i, heartbeat_ms=None, hang_action=None, hang_signal=None, now_ns=None):
        """Slot ``i`` already holds the registering process: change only what is given (not None).

        The PID word is never touched, so no peer sees an end (issue 13:
        ``procwatch run --heartbeat`` registers, execs, and the program
        registers the same name to beat it).  A new interval restarts the
        service's clock, as set_heartbeat() does.
        """
        if heartbeat_ms is not None:
            self.set_heartbeat(i, heartbeat_ms, now_ns)
        if hang_action is not None:
            self.set32(i, _abi.S_HEARTBEAT_ACTION, hang_action)
        if hang_signal is not None:
            self.set32(i, _abi.S_HEARTBEAT_SIGNAL, hang_signal)

    def set_hang_action(self, i, action, signal):
        self.set32(i, _abi.S_HEARTBEAT_ACTION, action)
        self.set32(i, _abi.S_HEARTBEAT_SIGNAL, signal)

    # -- service side: state changes under the service lock --------------------------
    def set_state_if(self, i, pid, old, new):
        """State ``old`` (a tuple) -> ``new`` if slot ``i`` still holds ``pid``; False if not.

        Under the service lock, so clear_pid() (which zeroes the word under
        the same lock, then records EXITED) cannot interleave.  A client's
        release() takes the table semaphore instead; if it slipped in
        between, its UNREGISTERED is put back.
        """
        with self.service_lock:
            if self.pid(i) != pid or self.state(i) not in old:
                return False
            self.set32(i, _abi.S_STATE, new)
        if self.pid(i) != pid and self.cause(i) == _abi.Cause.UNREGISTERED:
            self.set32(i, _abi.S_STATE, _abi.State.UNREGISTERED)
            return False
        return True

    def mark_kill(self, i, pid):
        """Cause KILLED_HUNG on HUNG slot ``i`` before its hang signal goes; False if it ended or recovered.

        Marked before the signal, because the exit may be reported at once.
        """
        with self.service_lock:
            if self.pid(i) != pid or self.state(i) != _abi.State.HUNG:
                return False
            self.set32(i, _abi.S_CAUSE, _abi.Cause.KILLED_HUNG)
            return True

    def unmark_kill(self, i, pid):
        """Undo mark_kill() (the signal failed, or the process outlived it)."""
        with self.service_lock:
            if self.pid(i) == pid and self.cause(i) == _abi.Cause.KILLED_HUNG:
                self.set32(i, _abi.S_CAUSE, _abi.Cause.NONE)

    def killed_hung(self, i):
        """Whether slot ``i`` was HUNG and marked by mark_kill(): its end is procwatch's kill."""
        return self.state(i) == _abi.State.HUNG and self.cause(i) == _abi.Cause.KILLED_HUNG

    def set_misses(self, i, misses):
        self.set32(i, _abi.S_MISSES, min(misses, 0xFFFFFFFF))

    def note_checks(self, beats, misses, now_ns):
        """One heartbeat pass's results, stored only where the slot still holds the PID.

        ``beats`` and ``misses`` hold the checker's tracks (anything with
        ``i``, the slot, and ``pid``; a miss also ``misses``, the count):
        a beat sets last_beat_ns to ``now_ns``, a miss stores the count.  A
        slot that no longer holds the PID is left alone and its track is
        returned (in a list, usually empty): it was re-registered.  One call
        per pass, not per slot: this is the checker's hot loop.
        """
        u32, u64 = self.u32, self.u64
        step32, step64 = _abi.SLOT_SIZE >> 2, _abi.SLOT_SIZE >> 3
        pid_at = _abi.HEADER_SIZE >> 2
        beat_at = (_abi.HEADER_SIZE + _abi.S_LAST_BEAT_NS) >> 3
        miss_at = (_abi.HEADER_SIZE + _abi.S_MISSES) >> 2
        stale = []
        for tr in beats:
            i = tr.i
            if u32[pid_at + i * step32] == tr.pid:
                u64[beat_at + i * step64] = now_ns
            else:
                stale.append(tr)
        for tr in misses:
            i = tr.i
            if u32[pid_at + i * step32] == tr.pid:
                u32[miss_at + i * step32] = min(tr.misses, 0xFFFFFFFF)
            else:
                stale.append(tr)
        return stale

    def set_rule_heartbeat(self, i, pid, ms):
        """A configuration rule's heartbeat for slot ``i``, if it still holds ``pid``.

        XXX: a client calling set_heartbeat() at this instant can have its
        value replaced by the rule's (a compare and a store, not one atomic step).
        """
        if self.pid(i) != pid:
            return False
        self.set32(i, _abi.S_HEARTBEAT_MS, ms)
        return True

    def clear_stale_claims(self):
        """Reset CLAIMING slots whose client was killed mid-registration; returns their indices.

        Under the lock no client is mid-claim, so a CLAIMING slot with PID
        word 0 is stale.  (ALIVE with a zero PID word is not: that is the
        service between clear_pid() and record_end().)  A busy lock: nothing
        done, try again next time.
        """
        stale = self.stale_claim_candidates()
        if not stale or not self.try_lock():
            return []
        cleared = []
        try:
            for i in stale:
                if self.pid(i) == 0 and self.state(i) == _abi.State.CLAIMING:
                    self.reset(i)
                    cleared.append(i)
        finally:
            self.unlock()
        return cleared

    def repair_states(self):
        """Fix slots whose state word cannot be true; returns [(slot, pid, old state)] fixed.

        Every honest writer keeps "PID word set => state ALIVE or HUNG" at
        all times (the PID word is zeroed before the state changes), so a
        slot breaking it, or a state out of range with no PID, was written by
        somebody else.  A PID word with another state gets ALIVE back (the
        watch list checks the PID itself); an out-of-range state with no PID
        is reset.  None when a client holds the lock: look again later.
        """
        if _hot is not None:        # one C pass: ~0.5 ms at 65536 slots, not ~10 (issue 16)
            bad = _hot.bad_states(self.address, self.scan_end(), _MAX_STATE,
                                  _abi.State.ALIVE, _abi.State.HUNG)
        else:
            pids, states = self.pid_words(), self.state_words()
            bad = [i for i, (pid, state) in enumerate(zip(pids, states))
                   if (state not in _PID_STATES if pid else state > _MAX_STATE)]
        if not bad:
            return []
        if not self.try_lock():          # a client is registering
            return None
        fixed = []
        try:
            for i in bad:
                with self.service_lock:  # against clear_pid()
                    state, pid = self.state(i), self.pid(i)
                    if pid == 0 and state > _MAX_STATE:
                        self.reset(i)
                    elif pid != 0 and state not in _PID_STATES:
                        self.set32(i, _abi.S_STATE, _abi.State.ALIVE)
                    else:
                        continue
                fixed.append((i, pid, state))
        finally:
            self.unlock()
        return fixed

    def set_verdict(self, i, pid, verdict):
        """Record why slot ``i``'s process hung (an :class:`abi.Verdict`), if it still holds ``pid``.

        Written by the heartbeat checker when it declares the hang, before
        the hang line and any signal, so that ``status`` and the exit that
        may follow read it; a registration zeroes it with the slot body.
        """
        with self.service_lock:
            if self.u32[self.pid_index(i)] != pid:
                return False
            self.set32(i, _abi.S_VERDICT, int(verdict))
        return True

    # -- service side: ending a slot --------------------------------------------
    def clear_pid(self, i, pid, pend=False):
        """Zero slot ``i``'s PID word if it still holds ``pid``, then wake its waiters.

        Returns False when the word no longer holds ``pid`` (somebody else
        already reported this end, or the slot was re-registered).  This is the
        moment peers learn the target is gone; everything else comes after.

        The clear is one compare-and-swap (pid -> 0), under ``service_lock``,
        the same the C hot step does: two paths can never both win one end.

        ``pend``: first note (slot, pid) in the header's pending-ends list,
        where it stays until end_logged().  A service SIGKILLed between
        zeroing the word and writing its log line would otherwise lose that
        line for good, since a restarted service sees only a zero word; with
        the note, the restarted one reports it (guard.recover_pending_ends).
        """
        word = self.pid_address(i)
        with self.service_lock:
            if _hot is not None:
                k = _hot.clear_pid(word, pid, self._pending_address() if pend else 0,
                                   _abi.PENDING_ENDS, i)
                if k is None:
                    return False
                if k >= 0:
                    self._pending[(i, pid)] = k
                return True
            idx = self.pid_index(i)
            if self.u32[idx] != pid:
                return False
            if pend:
                self._pend(i, pid)
            self.u32[idx] = 0
        _futex.wake(word)
        return True

    def _pending_address(self):
        return self.address + _abi.H_PENDING_ENDS

    def hot_step(self, sock_fd=-1):
        """A procwatch._hotstep.HotStep over this table (None without the C extension).

        It ends slots the way clear_pid() does: the pending-ends note, then the
        compare-and-swap of the PID word under ``service_lock``, then the wake.
        """
        if _hot is None:
            return None
        return _hot.HotStep(sock_fd, self.address, self._pending_address(), _abi.PENDING_ENDS,
                            self.service_lock)

    @property
    def native_death_step(self):
        """Whether death_step() runs in C (procwatch._hotstep loaded)."""
        return _hot is not None

    def death_stat_files(self):
        """A holder of one death-word shard's /proc stat files for death_step() (see _hotstep.c,
        "StatFds"), or None without the C step.  close() it when the shard is done."""
        return _hot.StatFds() if _hot is not None else None

    def death_step(self, generation, entries, timeout=None, priority=0, yield_us=0, stat_files=None):
        """One death-word wait of the C step (see _hotstep.c, "The death step"); needs native_death_step.

        ``entries``: [(slot, pid, start_time)] to wait on, built from the
        header's ``generation``.  Returns ``("dead", slot, pid, fired_ns,
        zeroed_ns, pidfd)`` when it ended a slot the way clear_pid(pend=True)
        does (the pending-ends note is kept here, as clear_pid() keeps it),
        ``("fired", slot, pid, fired_ns)`` for a fired word it left to the
        caller to confirm, ``("moved",)`` or ``("timeout",)``.
        """
        r = _hot.death_step(self.address, self._pending_address(), _abi.PENDING_ENDS, self.service_lock,
                            generation, entries, timeout, priority, yield_us, stat_files)
        if r[0] == "dead":
            kind, slot, pid, fired_ns, zeroed_ns, fd, k = r
            if k >= 0:
                try:
                    self.adopt_pending(slot, pid, k)
                except BaseException:
                    _os.close(fd)
                    raise
            return kind, slot, pid, fired_ns, zeroed_ns, fd
        return r

    def _pend(self, i, pid):
        """Note a pending end in a free entry (hold service_lock).  A full list only loses the note."""
        base = _abi.H_PENDING_ENDS >> 3
        for k in range(_abi.PENDING_ENDS):
            if self.u64[base + k] == 0:
                self.u64[base + k] = (pid << 32) | (i + 1)
                self._pending[(i, pid)] = k
                return

    def adopt_pending(self, i, pid, k):
        """The hot step noted (slot ``i``, ``pid``) in entry ``k``: end_logged() drops it."""
        if k >= 0:
            self._pending[(i, pid)] = k

    def end_logged(self, i, pid):
        """The end of (slot ``i``, ``pid``) is logged: drop its pending note."""
        with self.service_lock:
            k = self._pending.pop((i, pid), None)
            if k is not None and self.u64[(_abi.H_PENDING_ENDS >> 3) + k] == (pid << 32) | (i + 1):
                self.u64[(_abi.H_PENDING_ENDS >> 3) + k] = 0

    def take_pending_ends(self):
        """[(slot, pid)] a previous service left pending; the list is emptied (start-up only)."""
        base = _abi.H_PENDING_ENDS >> 3
        out = []
        with self.service_lock:
            for k in range(_abi.PENDING_ENDS):
                v = self.u64[base + k]
                if v:
                    out.append(((v & 0xFFFFFFFF) - 1, v >> 32))
                    self.u64[base + k] = 0
            self._pending.clear()
        return out

    RECORD_LOCK_TIMEOUT = 0.5   # s; a client stuck in the lock longer gets an unlocked record

    def record_end(self, i, state, cause, exit_status=_abi.EXIT_STATUS_UNKNOWN,
                   latency_us=_abi.LATENCY_UNKNOWN, when_ns=None, start_time=None,
                   lock_timeout=RECORD_LOCK_TIMEOUT, detected_by=_abi.Detection.EXIT_EVENT,
                   teardown_us=_abi.LATENCY_UNKNOWN):
        """Write how slot ``i`` ended (after clear_pid()).

        A peer that saw the word turn 0 may register the same name at once,
        and a same-name registration reuses this very slot.  Written after
        that registration, EXITED would overwrite its state, and the next sync
        would clear the live newcomer as corrupt.  So the record is written
        under the table's semaphore (no registration is then half done), and
        only while the slot still holds the ended process: PID word 0 and,
        if given, the same ``start_time``.

        Returns True when written, False when the slot was re-registered
        since (nothing to write), None when ``lock_timeout`` is 0 and a client
        holds the lock: nothing written, call again later.  Past a non-zero
        ``lock_timeout`` it writes without the lock.  ``lock_timeout`` None:
        the caller holds the lock.
        """
        locked = None if lock_timeout is None else self._try_lock(lock_timeout)
        if locked is False and lock_timeout == 0:
            return None
        try:
            if self.u32[self.pid_index(i)] != 0 or (
                    start_time is not None and self.get64(i, _abi.S_START_TIME) != start_time):
                return False
            self.set32(i, _abi.S_EXIT_STATUS, exit_status)      # i32: -1 stored as 0xFFFFFFFF
            self.set32(i, _abi.S_CAUSE, cause)
            self.set64(i, _abi.S_EXIT_TIME_NS, when_ns if when_ns is not None else _time.time_ns())
            self.set32(i, _abi.S_LATENCY_US, min(latency_us, _abi.LATENCY_UNKNOWN))
            self.set32(i, _abi.S_DETECTED_BY, detected_by)
            self.set32(i, _abi.S_TEARDOWN_US, min(max(teardown_us, 0), _abi.LATENCY_UNKNOWN))
            self.set32(i, _abi.S_STATE, state)
            self._count_exit()
            return True
        finally:
            if locked:
                self.unlock()

    def record_ends(self, batch):
        """record_end() of each argument tuple in ``batch``, under one hold of the lock.

        The lock is waited for up to RECORD_LOCK_TIMEOUT; past that (a client
        stuck in it), or with no semaphore left, the records are written anyway.
        """
        locked = self._try_lock(self.RECORD_LOCK_TIMEOUT)
        try:
            for args in batch:      # (i, state, cause, status, latency, when, start[, detected_by, teardown])
                self.record_end(*args[:7], lock_timeout=None,
                                **dict(zip(("detected_by", "teardown_us"), args[7:])))
        finally:
            if locked:
                self.unlock()

    # -- the header's exits counter: the service is its only writer -------------------
    EXITS_PER_SECOND_MAX = 1_000_000    # far above any real rate: a registered exit costs a fork

    def own_exits(self):
        """The service takes the exits counter over (start-up); returns the value it had if implausible.

        The service is the counter's only writer, so from here on it keeps its
        own copy and restore_exits() puts that back over anything else.  A
        value left by a writer while no service ran is judged by the
        segment's age: more than EXITS_PER_SECOND_MAX per second since its
        last IPC_SET is junk, and the count restarts from the ended slots (a
        lower bound of the truth).
        """
        with self.service_lock:
            value = self.hget64(_abi.H_EXITS)
            try:
                age = max(0.0, _time.time() - self._shm.last_change_time)
            except (_sysv_ipc.ExistentialError, _sysv_ipc.PermissionsError):
                age = 0.0
            bad = None
            if value > (age + 1) * self.EXITS_PER_SECOND_MAX:
                bad = value
                value = sum(1 for s in self.state_words() if s in (_abi.State.EXITED, _abi.State.FOUND_DEAD))
                self.hset64(_abi.H_EXITS, value)
            self._exits = value
        return bad

    def _count_exit(self):
        with self.service_lock:
            n = (self.hget64(_abi.H_EXITS) if self._exits is None else self._exits) + 1
            if self._exits is not None:
                self._exits = n
            self.hset64(_abi.H_EXITS, n & 0xFFFFFFFFFFFFFFFF)

    def restore_exits(self):
        """Put the service's own exits count back if the header says otherwise; True if it did."""
        with self.service_lock:
            if self._exits is None or self.hget64(_abi.H_EXITS) == self._exits:
                return False
            self.hset64(_abi.H_EXITS, self._exits)
            return True

    def _try_lock(self, timeout):
        """Take the semaphore within ``timeout`` s (0: only if free).

        True if taken, False if busy, None if there is no semaphore to take
        (removed with ipcrm, or not ours to lock).
        """
        try:
            return _semop(self._semaphore().id, -1, timeout)
        except (OSError, SegmentMissing, SegmentPermissionError):
            return None

    def header(self):
        """The header's service fields, as a dict."""
        return {
            "key": self.key,
            "shmid": self.shmid,
            "slot_count": self.slot_count,
            "service_pid": self.hget32(_abi.H_SERVICE_PID),
            "service_start_time": self.hget64(_abi.H_SERVICE_START_TIME),
            "service_heartbeat": self.hget64(_abi.H_SERVICE_HEARTBEAT),
            "heartbeat_period_ms": self.hget32(_abi.H_HEARTBEAT_PERIOD_MS),
            "backend": self.hget32(_abi.H_BACKEND),
            "generation": self.generation,
            "exits": self.hget64(_abi.H_EXITS),
            "death_watch": self.hget32(_abi.H_DEATH_WATCH),
        }
