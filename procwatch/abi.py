"""The slot table's binary layout: the one place that knows an offset.

The table is a SysV shared-memory segment read and written by processes in
any language (Python here, C through ``procwatch.h``), so its layout is an
ABI. ``docs/ABI.md`` documents it byte by byte and ``tests/test_abi.py``
checks that document against this module and against the C header.

Layout (all integers native-endian, naturally aligned)::

    header   HEADER_SIZE (192) bytes at offset 0
    slot[i]  SLOT_SIZE (192) bytes at HEADER_SIZE + i * SLOT_SIZE

The PID word of a slot is the contract of the whole project: non-zero means
"this process is registered and alive", 0 means "empty, or gone".  Three
rules keep a reader from ever seeing a wrong answer:

* The PID word is written with one aligned 4-byte store (a ``memoryview``
  cast to ``'I'``; ``__atomic_store_n`` in C).  ``struct.pack_into`` must
  never touch it: CPython's ``s_pack_internal()`` zero-fills its target
  before packing, so a peer could briefly read a live target as 0.
* Writers publish the PID word last and clear it first, so no reader sees a
  PID next to another process's start time or name.
* The PID word is also a futex: whoever zeroes it calls FUTEX_WAKE on it, so
  waiters sleep in FUTEX_WAIT instead of polling.  The header's generation
  word is a futex too: registration changes bump it and wake the service.

The death word (layout version 2, issue 14).  Each slot carries a glibc
process-shared *robust* mutex (S_DEATH_MUTEX; its first u32 is the futex
word, "the death word") that the registered process locks from a sentinel
thread for as long as it is registered.  When the process dies, the kernel
walks the dying thread's robust list at the *start* of exit_mm()
(kernel/futex/core.c, exit_robust_list()), sets FUTEX_OWNER_DIED in the word
and wakes one waiter, before the address space is torn down; the exit event
and a pidfd come only after the teardown (about 50 ms per GiB touched).  The
service waits on the armed death words (deathword.py) and zeroes the PID
word at once.  S_DEATH_ARM says whether the word is armed, and if not, why.

Not thread safe by itself: slot allocation is serialised by the table's
SysV semaphore (see :mod:`procwatch.segment`), service-side writes by the
service's own lock.
"""

import enum as _enum
import struct as _struct

MAGIC = b"PWTABLE\0"
VERSION = 2             # 2: the death word (issue 14); 1: before it
HEADER_SIZE = 192
SLOT_SIZE = 192
NAME_SIZE = 32          # <= 31 bytes of UTF-8, NUL padded
NAME_MAX = NAME_SIZE - 1

# Default SysV key of the table (and of its semaphore): 'pw' + 0x0001.
DEFAULT_KEY = 0x70770001
DEFAULT_SLOTS = 1024
MAX_SLOTS = 65536

# -- header ---------------------------------------------------------------
# Offsets in bytes from the start of the segment.
H_MAGIC = 0              # 8s   MAGIC
H_VERSION = 8            # u32  VERSION
H_HEADER_SIZE = 12       # u32  HEADER_SIZE
H_SLOT_SIZE = 16         # u32  SLOT_SIZE
H_SLOT_COUNT = 20        # u32  number of slots
H_SERVICE_PID = 24       # u32  PID of the serving procwatch, 0 when none
H_GENERATION = 28        # u32  bumped on every registration change (futex)
H_SERVICE_HEARTBEAT = 32  # u64  bumped by the service every check period
H_SERVICE_START_TIME = 40  # u64  start time of H_SERVICE_PID (clock ticks)
H_HEARTBEAT_PERIOD_MS = 48  # u32  how often the service bumps its heartbeat
H_BACKEND = 52           # u32  Backend in use
H_EXITS = 56             # u64  exits reported since the segment was made
H_PENDING_ENDS = 64      # u64[8]  ends the service zeroed but has not logged yet (service only):
                         #         (pid << 32) | (slot + 1); 0 = free.  See segment.Table.clear_pid.
PENDING_ENDS = 8
H_DEATH_WATCH = 128      # u32  DeathWatch: whether the service waits on death words, and if not, why
H_USED_END = 132         # u32  slots from here on are EMPTY (a hint: see segment.Table.scan_end)
# 136..191 reserved, zero.

HEADER_STATIC = _struct.Struct("=8sIIII")   # magic .. slot_count, packed once at creation

# -- slot -------------------------------------------------------------------
# Offsets in bytes from the start of the slot.
S_PID = 0                # u32  PID (tgid); 0 = empty or gone.  Futex word.
S_STATE = 4              # u32  State
S_START_TIME = 8         # u64  /proc/PID/stat field 22 (clock ticks since boot)
S_NAME = 16              # 32s  UTF-8, NUL padded
S_HEARTBEAT_SEQ = 48     # u64  bumped by the client: Registration.beat()
S_HEARTBEAT_MS = 56      # u32  expected beat interval in ms; 0 = no hang detection
S_MISSES = 60            # u32  consecutive checks without progress (service)
S_EXIT_STATUS = 64       # i32  wait(2) status of the exit; -1 unknown
S_CAUSE = 68             # u32  Cause of the end; while the state is HUNG, KILLED_HUNG
                         #      means the service has sent the hang signal (heartbeat.py)
S_EXIT_TIME_NS = 72      # u64  CLOCK_REALTIME ns of the end
S_REGISTERED_NS = 80     # u64  CLOCK_REALTIME ns of the registration
S_LATENCY_US = 88        # u32  kernel event -> slot zeroed, µs; LATENCY_UNKNOWN
S_OWNER_UID = 92         # u32  real uid of the registering process
S_LAST_BEAT_NS = 96      # u64  CLOCK_REALTIME ns the service last saw progress
S_HEARTBEAT_ACTION = 104  # u32  HangAction for this slot (0 = service default)
S_HEARTBEAT_SIGNAL = 108  # u32  signal number for HangAction.KILL (0 = service default)
S_VERDICT = 112          # u32  Verdict of the last hang (service); 0 while none
S_DEATH_ARM = 116        # u32  Arm: whether the death word is armed, and if not, why (client)
S_DEATH_TID = 120        # u32  TID of the sentinel thread holding S_DEATH_MUTEX (client)
S_DETECTED_BY = 124      # u32  Detection: what zeroed the PID word (service)
S_TEARDOWN_US = 128      # u32  death word -> pidfd readable, µs (the teardown); LATENCY_UNKNOWN
# 132..135 reserved, zero.
S_DEATH_MUTEX = 136      # 56   pthread_mutex_t, robust, process-shared; its first u32 is the
                         #      death word (glibc's __lock).  Futex word, waited on by the service only.
DEATH_MUTEX_SIZE = 56    # >= sizeof(pthread_mutex_t): 40 on x86_64, 48 on aarch64 (glibc)

# include/uapi/linux/futex.h: the robust-futex bits of a death word.
FUTEX_WAITERS = 0x80000000
FUTEX_OWNER_DIED = 0x40000000
FUTEX_TID_MASK = 0x3FFFFFFF

# Slot fields by name for column reads: name -> (offset, 64-bit?).
SLOT_FIELDS = {
    "pid": (S_PID, False), "state": (S_STATE, False), "start_time": (S_START_TIME, True),
    "heartbeat_seq": (S_HEARTBEAT_SEQ, True), "heartbeat_ms": (S_HEARTBEAT_MS, False),
    "misses": (S_MISSES, False), "cause": (S_CAUSE, False), "exit_time_ns": (S_EXIT_TIME_NS, True),
    "registered_ns": (S_REGISTERED_NS, True), "owner_uid": (S_OWNER_UID, False),
    "last_beat_ns": (S_LAST_BEAT_NS, True), "death_arm": (S_DEATH_ARM, False),
}

LATENCY_UNKNOWN = 0xFFFFFFFF
EXIT_STATUS_UNKNOWN = -1

SLOT_IDENTITY = _struct.Struct("=Q32s")      # start_time, name (at S_START_TIME)
SLOT_END = _struct.Struct("=iIQ")            # exit_status, cause, exit_time_ns (at S_EXIT_STATUS)
# One whole slot, field by field in the order above (for snapshots; never to write a PID word).
SLOT = _struct.Struct("=IIQ32sQIIiIQQIIQIIIIIII4x56x")
assert SLOT.size == SLOT_SIZE


def death_word_dead(arm, word):
    """Whether an armed death word says its process died: the one rule every reader uses.

    ``arm`` is the slot's S_DEATH_ARM, ``word`` its death word.  Dead when the
    slot is ARMED and the kernel set FUTEX_OWNER_DIED.  Peer.alive, the C
    header's procwatch_peer_current() and the service all apply exactly
    this; the service then confirms the process is really exiting (an
    execve(2) fires the word too) before it zeroes the PID word.
    """
    return arm == Arm.ARMED and word & FUTEX_OWNER_DIED != 0


class State(_enum.IntEnum):
    """What a slot holds.  Values are ABI."""
    EMPTY = 0          # never used, or freed
    CLAIMING = 1       # a client holds the semaphore and is filling it in
    ALIVE = 2          # registered, PID word set
    EXITED = 3         # the kernel reported the exit; status recorded
    FOUND_DEAD = 4     # gone, noticed by reconcile (status unknown)
    HUNG = 5           # heartbeat missed max_misses times; PID word still set
    UNREGISTERED = 6   # the client left cleanly


LIVE_STATES = (State.CLAIMING, State.ALIVE, State.HUNG)


class Cause(_enum.IntEnum):
    """Why a slot ended.  Values are ABI."""
    NONE = 0
    EXITED = 1             # exit event from the kernel
    KILLED_HUNG = 2        # procwatch killed it after missed heartbeats
    FOUND_DEAD = 3         # reconcile found it gone (service down, or a lost event)
    FOUND_DEAD_OVERFLOW = 4  # reconcile after the connector socket overflowed
    PID_REUSED = 5         # the PID is alive but its start time changed
    UNREGISTERED = 6       # Registration.unregister()


class Arm(_enum.IntEnum):
    """Whether a slot's death word is armed (slot field S_DEATH_ARM).  Values are ABI.

    Anything but ARMED is "connector-only": the service learns of the end
    from the exit event (or pidfd), after the address-space teardown.
    """
    NONE = 0           # not armed: an older client, or one built without threads
    ARMED = 1          # a sentinel thread of the process holds the death mutex
    DISARMED = 2       # unregistering: marked before the sentinel unlocks (not a death)
    OTHER_PID = 3      # registered for another process (register_pid(pid=X)): cannot arm
    UNAVAILABLE = 4    # the client could not arm (no robust pthread mutex here)
    PRELOAD = 5        # 'procwatch run': the preload library arms it once CMD starts
    NOT_PRELOADABLE = 6  # 'procwatch run' of a static or setuid program: no preload
    LOST = 7           # the word fired but the process lives on (execve): connector-only since


class Detection(_enum.IntEnum):
    """What zeroed a slot's PID word (slot field S_DETECTED_BY).  Values are ABI."""
    EXIT_EVENT = 0     # the exit event (connector) or pidfd: after the teardown
    DEATH_WORD = 1     # the death word: before the teardown


class DeathWatch(_enum.IntEnum):
    """Whether the service waits on death words (header field H_DEATH_WATCH).  Values are ABI."""
    OFF = 0            # no service, or it has not started watching
    WATCHING = 1       # futex_waitv(2) on every armed slot
    NO_WAITV = 2       # futex_waitv failed ENOSYS/EPERM (Linux < 5.16, or seccomp): connector-only
    NO_ATOMICS = 3     # neither procwatch._deathword nor libatomic: connector-only


class HangAction(_enum.IntEnum):
    """What the service does to a hung process (slot field S_HEARTBEAT_ACTION).  Values are ABI.

    A value the service does not know is read as DEFAULT.
    """
    DEFAULT = 0        # the service's --hang-action
    KILL = 1           # send S_HEARTBEAT_SIGNAL (0: the service's --hang-signal)
    LOG = 2            # log only; the process is left alone


class Verdict(_enum.IntEnum):
    """Why a hung process did not beat, as the kernel tells it (slot field S_VERDICT).  Values are ABI.

    Written by the service when a slot becomes HUNG (heartbeat.py, verdict.py);
    it stays after the end, so ``status`` can say what a killed process was doing.
    """
    NONE = 0           # not hung (yet)
    STOPPED = 1        # state T/t: SIGSTOP, a debugger
    STARVED = 2        # runnable, but got (almost) no CPU: contention or its cgroup's limit
    STUCK = 3          # uninterruptible (D) through the missed checks: a signal may not act
    BUSY = 4           # on a CPU without beating: a livelock
    BLOCKED = 5        # asleep with no CPU: a deadlock
    UNKNOWN = 6        # /proc would not say (gone meanwhile, or hidden)


class Backend(_enum.IntEnum):
    """Exit-detection backend the service runs.  Values are ABI."""
    NONE = 0
    CONNECTOR = 1
    PIDFD = 2


def segment_size(slots):
    """Bytes needed for a table of ``slots`` slots."""
    return HEADER_SIZE + slots * SLOT_SIZE


def slot_offset(index):
    """Byte offset of slot ``index`` from the start of the segment."""
    return HEADER_SIZE + index * SLOT_SIZE


# The one name rule (issue 13), mirrored by procwatch__encode_name() in
# procwatch.h and held to it by tests/test_abi.py:
#   1..31 bytes of UTF-8; no control character (C0, DEL, C1: U+0000-U+001F,
#   U+007F-U+009F); no whitespace at either end (so not all whitespace).
# Whitespace is what str.isspace() says; outside the controls that is:
NAME_EDGE_SPACES = frozenset((0x20, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                              0x202F, 0x205F, 0x3000))
_SHOWN = 40          # characters of a bad name an error message quotes


def shown_name(name):
    """``repr`` of a name for an error message: cut, so a 10 MB name makes a short line."""
    if len(name) <= _SHOWN:
        return repr(name)
    return f"{name[:_SHOWN]!r}... ({len(name)} {'bytes' if isinstance(name, bytes) else 'characters'})"


def encode_name(name):
    """UTF-8 bytes of a slot name, or ValueError saying why not (the one rule, above)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}")
    if not name:
        raise ValueError("name must not be empty")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"name {shown_name(name)} cannot be encoded as UTF-8") from None
    if len(raw) > NAME_MAX:
        raise ValueError(f"name {shown_name(name)} is {len(raw)} bytes of UTF-8; the limit is {NAME_MAX}")
    if "\0" in name:
        raise ValueError(f"name {name!r} contains a NUL character")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValueError(f"name {name!r} contains a control character")
    if ord(name[0]) in NAME_EDGE_SPACES or ord(name[-1]) in NAME_EDGE_SPACES:
        raise ValueError(f"name {name!r} begins or ends with whitespace")
    return raw


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def decode_name(raw):
    """A slot's name field as printable str: never raises, never emits a control byte.

    Undecodable bytes and control characters (which no client may register,
    but any writer of the segment can put there) come out as ``\\xNN``, so a
    hostile name cannot break a log line or drive a terminal.
    """
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "backslashreplace").translate(_CONTROL)
