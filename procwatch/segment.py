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

import contextlib as _contextlib
import ctypes as _ctypes
import dataclasses as _dataclasses
import errno as _errno
import os as _os
import struct as _struct
import threading as _threading
import time as _time

import sysv_ipc as _sysv_ipc

from . import abi as _abi
from . import futex as _futex
from .errors import (SegmentCorrupt, SegmentMissing, SegmentPermissionError,
                     TableBusy)

# One whole slot, for status and reconcile (not for the PID word: see abi).
_SLOT = _struct.Struct("=IIQ32sQIIiIQQIIQII16x")
assert _SLOT.size == _abi.SLOT_SIZE


# semtimedop(2) through ctypes: this sysv_ipc build has no timeouts
# (SEMAPHORE_TIMEOUT_SUPPORTED is False, and acquire(timeout) then blocks
# forever), and a stuck holder must be an error, not a hang.
SEM_UNDO = 0x1000
IPC_NOWAIT = 0o4000
_libc = _ctypes.CDLL(None, use_errno=True)


class _sembuf(_ctypes.Structure):
    _fields_ = [("sem_num", _ctypes.c_ushort), ("sem_op", _ctypes.c_short), ("sem_flg", _ctypes.c_short)]


class _timespec(_ctypes.Structure):
    _fields_ = [("tv_sec", _ctypes.c_long), ("tv_nsec", _ctypes.c_long)]


def _semop(semid, op, timeout):
    """One semop with SEM_UNDO; False on timeout (timeout 0: don't wait)."""
    flags = SEM_UNDO | (IPC_NOWAIT if timeout == 0 else 0)
    buf = _sembuf(0, op, flags)
    deadline = None if not timeout else _time.monotonic() + timeout
    while True:
        ts = None
        if deadline is not None:
            left = max(0.0, deadline - _time.monotonic())
            ts = _ctypes.byref(_timespec(int(left), int(left % 1 * 1e9)))
        if _libc.semtimedop(semid, _ctypes.byref(buf), 1, ts) == 0:
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


@_dataclasses.dataclass(frozen=True)
class Slot:
    """A snapshot of one slot (not atomic across fields: for display and checks)."""
    index: int
    pid: int
    state: int
    start_time: int
    name: str
    heartbeat_seq: int
    heartbeat_ms: int
    misses: int
    exit_status: int
    cause: int
    exit_time_ns: int
    registered_ns: int
    latency_us: int
    owner_uid: int
    last_beat_ns: int
    heartbeat_action: int
    heartbeat_signal: int
    raw_name: bytes = b""

    @property
    def state_name(self):
        try:
            return _abi.State(self.state).name.lower()
        except ValueError:
            return f"invalid({self.state})"

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

    def __init__(self, key, shm, sem=None):
        self.key = key
        self._shm = shm
        self._sem = sem
        self.shmid = shm.id
        self.address = shm.address
        self.size = shm.size
        self.buf = memoryview(shm)
        self.u32 = self.buf.cast("I")
        self.u64 = self.buf.cast("Q")
        self.slot_count = 0
        self.service_lock = _threading.Lock()   # service-side compare-and-clear
        self._pending = {}                      # (slot, pid) -> entry of H_PENDING_ENDS
        self._pending_free = None

    # -- opening ------------------------------------------------------------
    @classmethod
    def attach(cls, key=None):
        """Attach an existing table (client side).  Never creates one."""
        key = resolve_key(key)
        try:
            shm = _sysv_ipc.SharedMemory(key)
        except _sysv_ipc.ExistentialError:
            raise SegmentMissing(key) from None
        except _sysv_ipc.PermissionsError:
            raise SegmentPermissionError(key, *_sysv_shm_info(key)) from None
        table = cls(key, shm)
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
        """Whether our segment is still the one at the key (not removed with ipcrm)."""
        try:
            return _sysv_ipc.SharedMemory(self.key).id == self.shmid
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
            raise TableBusy(self.key, sem.last_pid, timeout)
        try:
            yield
        finally:
            _semop(sem.id, 1, 0)

    def try_lock(self):
        """Take the semaphore only if free; True if taken (release with unlock())."""
        return _semop(self._semaphore().id, -1, 0)

    def unlock(self):
        _semop(self._semaphore().id, 1, 0)

    # -- words ----------------------------------------------------------------
    def pid_index(self, i):
        """Index into ``u32`` of slot ``i``'s PID word."""
        return (_abi.HEADER_SIZE + i * _abi.SLOT_SIZE) // 4

    def pid_address(self, i):
        """Virtual address of slot ``i``'s PID word in this process (for futexes)."""
        return self.address + _abi.slot_offset(i) + _abi.S_PID

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

    @property
    def generation(self):
        return self.u32[_abi.H_GENERATION >> 2]

    def bump_generation(self):
        """Count a registration change and wake whoever waits on it (hold lock())."""
        self.hset32(_abi.H_GENERATION, self.generation + 1)
        _futex.wake(self.address + _abi.H_GENERATION)

    def pid_words(self):
        """Every slot's PID word, as a list (one strided copy: cheap)."""
        start = _abi.HEADER_SIZE // 4
        return self.u32[start:start + self.slot_count * (_abi.SLOT_SIZE // 4):_abi.SLOT_SIZE // 4].tolist()

    def state_words(self):
        """Every slot's state word, as a list."""
        start = (_abi.HEADER_SIZE + _abi.S_STATE) // 4
        return self.u32[start:start + self.slot_count * (_abi.SLOT_SIZE // 4):_abi.SLOT_SIZE // 4].tolist()

    # -- whole slots ----------------------------------------------------------
    def read_slot(self, i):
        if not 0 <= i < self.slot_count:
            raise IndexError(f"slot {i} out of range 0..{self.slot_count - 1}")
        f = _SLOT.unpack_from(self.buf, _abi.slot_offset(i))
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

    # -- service side: ending a slot --------------------------------------------
    def clear_pid(self, i, pid, pend=False):
        """Zero slot ``i``'s PID word if it still holds ``pid``, then wake its waiters.

        Returns False when the word no longer holds ``pid`` (somebody else
        already reported this end, or the slot was re-registered).  This is the
        moment peers learn the target is gone; everything else comes after.

        ``pend``: first note (slot, pid) in the header's pending-ends list,
        where it stays until end_logged().  A service SIGKILLed between
        zeroing the word and writing its log line would otherwise lose that
        line for good, since a restarted service sees only a zero word; with
        the note, the restarted one reports it (guard.recover_pending_ends).
        """
        idx = self.pid_index(i)
        with self.service_lock:
            if self.u32[idx] != pid:
                return False
            if pend:
                self._pend(i, pid)
            self.u32[idx] = 0
        _futex.wake(self.address + _abi.slot_offset(i))
        return True

    def _pend(self, i, pid):
        """Note a pending end (hold service_lock).  A full list only loses the note."""
        if self._pending_free is None:
            base = _abi.H_PENDING_ENDS >> 3
            self._pending_free = [k for k in range(_abi.PENDING_ENDS) if self.u64[base + k] == 0]
        if not self._pending_free:
            return
        k = self._pending_free.pop()
        self._pending[(i, pid)] = k
        self.u64[(_abi.H_PENDING_ENDS >> 3) + k] = (pid << 32) | (i + 1)

    def end_logged(self, i, pid):
        """The end of (slot ``i``, ``pid``) is logged: drop its pending note."""
        with self.service_lock:
            k = self._pending.pop((i, pid), None)
            if k is not None:
                self.u64[(_abi.H_PENDING_ENDS >> 3) + k] = 0
                self._pending_free.append(k)

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
            self._pending_free = list(range(_abi.PENDING_ENDS))
        return out

    RECORD_LOCK_TIMEOUT = 0.5   # s; a client stuck in the lock longer gets an unlocked record

    def record_end(self, i, state, cause, exit_status=_abi.EXIT_STATUS_UNKNOWN,
                   latency_us=_abi.LATENCY_UNKNOWN, when_ns=None, start_time=None,
                   lock_timeout=RECORD_LOCK_TIMEOUT):
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
            off = _abi.slot_offset(i)
            _abi.SLOT_END.pack_into(self.buf, off + _abi.S_EXIT_STATUS, exit_status, cause,
                                    when_ns if when_ns is not None else _time.time_ns())
            self.set32(i, _abi.S_LATENCY_US, min(latency_us, _abi.LATENCY_UNKNOWN))
            self.set32(i, _abi.S_STATE, state)
            self.hset64(_abi.H_EXITS, self.hget64(_abi.H_EXITS) + 1)
            return True
        finally:
            if locked:
                self.unlock()

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
        }
