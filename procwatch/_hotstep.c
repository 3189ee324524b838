/* procwatch._hotstep: the detector's hot step and the peer's word reads, in C (issue 16).
 *
 * Why C: between the kernel queuing an exit event and the FUTEX_WAKE that
 * lets a peer run, the Python detector spent ~50 µs of its own (GIL retake,
 * decode, a fresh select.poll object for the pidfd check, lock + compare,
 * ctypes marshalling around the wake); a bare C listener spends ~5.  Here the
 * whole step -- recv, decode, open-addressing lookup by tgid, pidfd poll,
 * compare-and-swap of the PID word to 0, FUTEX_WAKE -- runs with the GIL
 * released, and only then hands the end back to Python, which records, logs
 * and ends the detector thread (the service respawns it: the user's design).
 *
 * Three rules keep it honest:
 *
 * - The watch map holds its *own* duplicates of the pidfds, added and removed
 *   under the map's mutex, so a watch-list sync in Python can never close a
 *   descriptor under the step (Python closes only its own copies).
 * - The PID word is cleared only by compare-and-swap (cas32), here and in
 *   Python (segment.Table.clear_pid uses this module's cas32 when it loads),
 *   so two paths can never both report one end: exactly one CAS wins.
 * - The pending-ends note (header H_PENDING_ENDS, see docs/ABI.md) is taken
 *   by CAS on a free u64 entry before the PID word is cleared, the same way
 *   Python takes it, so a service killed between the clear and its log line
 *   still finds the end at restart (guard.recover_pending_ends).
 *
 * PeerWord is the C base of client.Peer: `pid` and `alive` read the aligned
 * word with one atomic load and return, ~15-25 ns against ~70 for a Python
 * property over a memoryview.  Any change of the word the peer did not expect
 * goes to the Python subclass's _follow(), which owns the name-following
 * rules.  word_gone() is the one place a further word check (the death word
 * of issue 14) is added.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/prctl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

/* Table layout: procwatch/abi.py owns it; these mirror it and
 * tests/test_hotstep.py holds them to abi.py (layout()). */
#define HEADER_SIZE 192
#define SLOT_SIZE 192
#define H_GENERATION 28
#define H_USED_END 132           /* slots from here on are EMPTY: scan_end_raw() */
#define S_PID 0
#define S_STATE 4
#define S_START_TIME 8
#define S_NAME 16
#define NAME_SIZE 32
#define S_DEATH_ARM 116          /* issue 14: the death word, abi.death_word_dead() */
#define S_DEATH_MUTEX 136
#define ARM_ARMED 1
#define FUTEX_OWNER_DIED_BIT 0x40000000u
#define STATE_EMPTY 0
#define STATE_CLAIMING 1

/* include/uapi/linux/cn_proc.h, connector.h, netlink.h */
#define EXIT_OFFSET 36          /* 16 (nlmsghdr) + 20 (cn_msg) */
#define MIN_EXIT_LEN 60
#define PROC_EVENT_EXIT 0x80000000u

static inline uint32_t load32(uintptr_t a) { return __atomic_load_n((uint32_t *)a, __ATOMIC_ACQUIRE); }
static inline uint64_t load64(uintptr_t a) { return __atomic_load_n((uint64_t *)a, __ATOMIC_ACQUIRE); }

static inline int cas32_raw(uintptr_t a, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n((uint32_t *)a, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline int cas64_raw(uintptr_t a, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n((uint64_t *)a, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline long futex_wake_raw(uintptr_t a)
{
    return syscall(SYS_futex, (uint32_t *)a, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Note (slot, pid) in a free pending-ends entry; its index, or -1 if the list is full
 * (only the note is lost then, as in Python). */
static int pend_raw(uintptr_t pending, int count, uint32_t slot, uint32_t pid)
{
    uint64_t v = ((uint64_t)pid << 32) | (uint64_t)(slot + 1);
    for (int k = 0; k < count; k++) {
        uintptr_t a = pending + 8 * (uintptr_t)k;
        if (load64(a) == 0 && cas64_raw(a, 0, v))
            return k;
    }
    return -1;
}

/* The end of (word at `word`, pid): note it pending, CAS the word pid -> 0, wake.
 * Returns the pending index (>= -1) when this call ended it, -2 when another did. */
static int end_word(uintptr_t word, uint32_t pid, uintptr_t pending, int npending, uint32_t slot)
{
    int k = pending ? pend_raw(pending, npending, slot, pid) : -1;
    if (!cas32_raw(word, pid, 0)) {
        if (k >= 0)
            __atomic_store_n((uint64_t *)(pending + 8 * (uintptr_t)k), 0, __ATOMIC_RELEASE);
        return -2;
    }
    futex_wake_raw(word);
    return k;
}

static inline uintptr_t slot_at(uintptr_t base, unsigned int i)
{
    return base + HEADER_SIZE + (uintptr_t)i * SLOT_SIZE;
}

/* OWNER_DIED in the ARMED death word of the slot at s: abi.death_word_dead(), the one rule
 * the peer's reads and the death step both apply. */
static inline int death_fired_raw(uintptr_t s)
{
    return load32(s + S_DEATH_ARM) == ARM_ARMED && (load32(s + S_DEATH_MUTEX) & FUTEX_OWNER_DIED_BIT);
}

/* How far a pass over the slots must go (docs/ABI.md, "Register" step 3): the header's
 * used_end, clamped to the table, then on while the slots right after it are not EMPTY (a
 * client that does not keep used_end takes the first EMPTY slot, which is there).  Any
 * group member can write used_end, so it is never trusted past the table, and a too-low
 * value costs only names a registration does not see until the service's guard puts it
 * right (true_end_raw). */
static unsigned int scan_end_raw(uintptr_t base, unsigned int count)
{
    uint32_t end = load32(base + H_USED_END);
    if (end > count)
        end = count;
    while (end < count && load32(slot_at(base, end) + S_STATE) != STATE_EMPTY)
        end++;
    return end;
}

/* One past the last slot whose state or PID word is not zero: what used_end should say.
 * Read backwards, so it costs the EMPTY tail of the table and no more. */
static unsigned int true_end_raw(uintptr_t base, unsigned int count)
{
    unsigned int end = count;
    while (end > 0) {
        uintptr_t s = slot_at(base, end - 1);
        if (load32(s + S_STATE) != STATE_EMPTY || load32(s + S_PID) != 0)
            break;
        end--;
    }
    return end;
}

/* ---- module-level functions --------------------------------------------------------- */

static PyObject *py_cas32(PyObject *self, PyObject *args)
{
    unsigned long long a;
    unsigned int expected, desired;
    if (!PyArg_ParseTuple(args, "KII", &a, &expected, &desired))
        return NULL;
    return PyBool_FromLong(cas32_raw((uintptr_t)a, expected, desired));
}

static PyObject *py_cas64(PyObject *self, PyObject *args)
{
    unsigned long long a, expected, desired;
    if (!PyArg_ParseTuple(args, "KKK", &a, &expected, &desired))
        return NULL;
    return PyBool_FromLong(cas64_raw((uintptr_t)a, expected, desired));
}

static PyObject *py_clear_pid(PyObject *self, PyObject *args)
{
    /* clear_pid(word_address, pid, pending_address, pending_count, slot) -> pending index, or
     * None when the word no longer held pid (someone else ended it). */
    unsigned long long word, pending;
    unsigned int pid, slot;
    int npending;
    if (!PyArg_ParseTuple(args, "KIKiI", &word, &pid, &pending, &npending, &slot))
        return NULL;
    int k = end_word((uintptr_t)word, pid, (uintptr_t)pending, npending, slot);
    if (k == -2)
        Py_RETURN_NONE;
    return PyLong_FromLong(k);
}

static PyObject *py_wake(PyObject *self, PyObject *args)
{
    unsigned long long a;
    int count = INT_MAX;
    if (!PyArg_ParseTuple(args, "K|i", &a, &count))
        return NULL;
    long rc = syscall(SYS_futex, (uint32_t *)(uintptr_t)a, FUTEX_WAKE, count, NULL, NULL, 0);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(rc);
}

static PyObject *py_wait(PyObject *self, PyObject *args)
{
    /* wait(address, expected, timeout=None) -> False on timeout, else True (woken, or the
     * word already differs).  Spurious wake-ups possible: callers re-read and loop. */
    unsigned long long a;
    unsigned int expected;
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTuple(args, "KI|O", &a, &expected, &timeout))
        return NULL;
    double left = -1;
    if (timeout != Py_None) {
        left = PyFloat_AsDouble(timeout);
        if (left == -1 && PyErr_Occurred())
            return NULL;
        if (left <= 0)
            return PyBool_FromLong(load32((uintptr_t)a) != expected);
    }
    uint64_t deadline = left < 0 ? 0 : mono_ns() + (uint64_t)(left * 1e9);
    long rc;
    int err;
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (deadline) {
            uint64_t now = mono_ns();
            if (now >= deadline)
                Py_RETURN_FALSE;
            uint64_t d = deadline - now;
            ts.tv_sec = d / 1000000000u;
            ts.tv_nsec = d % 1000000000u;
            tsp = &ts;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = syscall(SYS_futex, (uint32_t *)(uintptr_t)a, FUTEX_WAIT, expected, tsp, NULL, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0 || err == EAGAIN)
            Py_RETURN_TRUE;
        if (err == ETIMEDOUT)
            Py_RETURN_FALSE;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
}

static PyObject *py_find_name(PyObject *self, PyObject *args)
{
    /* find_name(table_address, slot_count, raw) -> (same, first_empty, end): the first non-EMPTY
     * slot carrying name `raw`, the first EMPTY slot (-1 for none), and how far the pass went
     * (scan_end_raw; -1 when it stopped at `same`).  The pass ends at the first EMPTY slot at or
     * after the header's used_end, so a registration costs the used slots, not the table: a
     * fresh attachment of a 65536-slot table faulted in all of its 12 MiB before (~4-8 ms). */
    unsigned long long base;
    unsigned int count;
    const char *raw;
    Py_ssize_t rawlen;
    if (!PyArg_ParseTuple(args, "KIy#", &base, &count, &raw, &rawlen))
        return NULL;
    if (rawlen >= NAME_SIZE) {
        PyErr_SetString(PyExc_ValueError, "name longer than the slot's name field");
        return NULL;
    }
    char want[NAME_SIZE];
    memset(want, 0, sizeof want);
    memcpy(want, raw, (size_t)rawlen);
    long same = -1, empty = -1, end = -1;
    Py_BEGIN_ALLOW_THREADS
    uint32_t hint = load32((uintptr_t)base + H_USED_END);
    if (hint > count)
        hint = count;
    unsigned int i;
    for (i = 0; i < count; i++) {
        uintptr_t s = slot_at((uintptr_t)base, i);
        if (load32(s + S_STATE) == STATE_EMPTY) {
            if (empty < 0)
                empty = i;
            if (i >= hint)
                break;
            continue;
        }
        if (memcmp((const void *)(s + S_NAME), want, NAME_SIZE) == 0) {
            same = i;
            break;
        }
    }
    if (same < 0)
        end = i;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("lll", same, empty, end);
}

static PyObject *py_scan_end(PyObject *self, PyObject *args)
{
    /* scan_end(table_address, slot_count) -> int: how far a pass over the slots must go. */
    unsigned long long base;
    unsigned int count;
    if (!PyArg_ParseTuple(args, "KI", &base, &count))
        return NULL;
    return PyLong_FromUnsignedLong(scan_end_raw((uintptr_t)base, count));
}

static PyObject *py_first_used(PyObject *self, PyObject *args)
{
    /* first_used(table_address, start, stop) -> int: the first slot in [start, stop) whose state
     * or PID word is not zero, -1 for none (the guard's look at a piece of the EMPTY tail). */
    unsigned long long base;
    unsigned int start, stop;
    long found = -1;
    if (!PyArg_ParseTuple(args, "KII", &base, &start, &stop))
        return NULL;
    for (unsigned int i = start; i < stop; i++) {
        uintptr_t s = slot_at((uintptr_t)base, i);
        if (load32(s + S_STATE) != STATE_EMPTY || load32(s + S_PID) != 0) {
            found = i;
            break;
        }
    }
    return PyLong_FromLong(found);
}

static PyObject *py_true_end(PyObject *self, PyObject *args)
{
    /* true_end(table_address, slot_count) -> int: one past the last slot with a state or PID. */
    unsigned long long base;
    unsigned int count;
    unsigned int end;
    if (!PyArg_ParseTuple(args, "KI", &base, &count))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    end = true_end_raw((uintptr_t)base, count);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLong(end);
}

static int append_index(PyObject *out, unsigned int i)
{
    /* Append slot index i to list out: 0, or -1 with an exception set (the slot scans below). */
    PyObject *n = PyLong_FromUnsignedLong(i);
    if (!n)
        return -1;
    int rc = PyList_Append(out, n);
    Py_DECREF(n);
    return rc;
}

static PyObject *py_stale_claims(PyObject *self, PyObject *args)
{
    /* stale_claims(table_address, slot_count) -> [slot]: PID word 0 and state CLAIMING. */
    unsigned long long base;
    unsigned int count;
    if (!PyArg_ParseTuple(args, "KI", &base, &count))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned int i = 0; i < count; i++) {
        uintptr_t s = (uintptr_t)base + HEADER_SIZE + (uintptr_t)i * SLOT_SIZE;
        if (load32(s + S_STATE) == STATE_CLAIMING && load32(s + S_PID) == 0) {
            if (append_index(out, i) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    return out;
}

static PyObject *py_bad_states(PyObject *self, PyObject *args)
{
    /* bad_states(table_address, slot_count, max_state, alive, hung) -> [slot]: a set PID word
     * with a state other than ALIVE/HUNG, or a state above max_state (guard.py).  The state is
     * read before the PID word, in the order the service's own ending writes them. */
    unsigned long long base;
    unsigned int count, max_state, alive, hung;
    if (!PyArg_ParseTuple(args, "KIIII", &base, &count, &max_state, &alive, &hung))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned int i = 0; i < count; i++) {
        uintptr_t s = (uintptr_t)base + HEADER_SIZE + (uintptr_t)i * SLOT_SIZE;
        uint32_t state = load32(s + S_STATE);
        uint32_t pid = load32(s + S_PID);
        if (pid ? (state != alive && state != hung) : state > max_state) {
            if (append_index(out, i) < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    return out;
}

static PyObject *py_fingerprint(PyObject *self, PyObject *args)
{
    /* fingerprint(table_address, slot_count, off32_a, off32_b, off64) -> int: a 64-bit hash of
     * two u32 fields and one u64 field of every slot.  The hang checker compares it pass to
     * pass instead of copying three columns into Python lists (issue 16: ~8 ms at 65536). */
    unsigned long long base;
    unsigned int count, a, b, c;
    if (!PyArg_ParseTuple(args, "KIIII", &base, &count, &a, &b, &c))
        return NULL;
    uint64_t h = 1469598103934665603ull;
    for (unsigned int i = 0; i < count; i++) {
        uintptr_t s = (uintptr_t)base + HEADER_SIZE + (uintptr_t)i * SLOT_SIZE;
        uint64_t v = ((uint64_t)load32(s + a) << 32 | load32(s + b)) ^ (load64(s + c) * 0x9E3779B97F4A7C15ull);
        h = (h ^ v ^ i) * 1099511628211ull;
        h ^= h >> 29;
    }
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *py_any_set(PyObject *self, PyObject *args)
{
    /* any_set(table_address, slot_count, off32) -> bool: whether some slot with a PID has a
     * non-zero u32 at `off32` (the hang checker: does any registered slot ask for beats?). */
    unsigned long long base;
    unsigned int count, off;
    if (!PyArg_ParseTuple(args, "KII", &base, &count, &off))
        return NULL;
    for (unsigned int i = 0; i < count; i++) {
        uintptr_t s = (uintptr_t)base + HEADER_SIZE + (uintptr_t)i * SLOT_SIZE;
        if (load32(s + off) && load32(s + S_PID))
            Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* ---- slots by a field's value (issue 16, third pass) ------------------------------------ */

static PyObject *py_pids_where(PyObject *self, PyObject *args)
{
    /* pids_where(table_address, slot_count, off32, value) -> [(slot, pid)]: every slot with a
     * PID word and the u32 at `off32` equal to `value` (segment.Table.armed_slots: the death-word
     * waiters ask on every generation change; two Python columns of the used slots cost ~30 µs
     * a call cold, this one strided pass a few).  The PID word is read after the field. */
    unsigned long long base;
    unsigned int count, off, value;
    if (!PyArg_ParseTuple(args, "KIII", &base, &count, &off, &value))
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned int i = 0; i < count; i++) {
        uintptr_t s = slot_at((uintptr_t)base, i);
        if (load32(s + off) != value)
            continue;
        uint32_t pid = load32(s + S_PID);
        if (!pid)
            continue;
        PyObject *pair = Py_BuildValue("(II)", i, pid);
        if (!pair || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return out;
}

static PyObject *py_layout(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:I,s:i,s:i,s:i,s:I}",
                         "S_DEATH_ARM", S_DEATH_ARM, "S_DEATH_MUTEX", S_DEATH_MUTEX, "ARMED", ARM_ARMED,
                         "FUTEX_OWNER_DIED", FUTEX_OWNER_DIED_BIT,
                         "HEADER_SIZE", HEADER_SIZE, "SLOT_SIZE", SLOT_SIZE,
                         "H_GENERATION", H_GENERATION, "S_PID", S_PID, "S_STATE", S_STATE,
                         "S_START_TIME", S_START_TIME, "S_NAME", S_NAME, "NAME_SIZE", NAME_SIZE,
                         "EMPTY", STATE_EMPTY, "CLAIMING", STATE_CLAIMING,
                         "EXIT_OFFSET", EXIT_OFFSET, "PROC_EVENT_EXIT", PROC_EVENT_EXIT);
}

/* ---- Changes: which slots' (PID, start time) moved since the last look ------------------ */

typedef struct {
    PyObject_HEAD
    uint32_t *pids;
    uint64_t *starts;
    unsigned int count;
    unsigned int hi;            /* one past the last slot remembered with a PID: pids[hi..] are 0 */
} Changes;

static int Changes_init(Changes *self, PyObject *args, PyObject *kw)
{
    unsigned int count;
    if (!PyArg_ParseTuple(args, "I", &count))
        return -1;
    PyMem_Free(self->pids);
    PyMem_Free(self->starts);
    self->pids = PyMem_Calloc(count ? count : 1, sizeof(uint32_t));
    self->starts = PyMem_Calloc(count ? count : 1, sizeof(uint64_t));
    self->count = count;
    self->hi = 0;
    if (!self->pids || !self->starts) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Changes_dealloc(Changes *self)
{
    PyMem_Free(self->pids);
    PyMem_Free(self->starts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Changes_diff(Changes *self, PyObject *args)
{
    /* diff(table_address) -> [(slot, pid, start_time)] of the slots whose PID word or start time
     * differ from the last diff (all-zero at first), and remember the new values.  It reads the
     * slots a pass must cover (scan_end_raw) and every slot it remembers with a PID, so it costs
     * the used slots, not the table; the service's guard moves used_end over a slot written
     * past it (segment.Table.fix_used_end). */
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    unsigned int end = scan_end_raw((uintptr_t)base, self->count), hi = 0;
    if (end < self->hi)
        end = self->hi;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned int i = 0; i < end; i++) {
        uintptr_t s = slot_at((uintptr_t)base, i);
        uint32_t pid = load32(s + S_PID);
        uint64_t start = pid ? load64(s + S_START_TIME) : 0;
        if (pid)
            hi = i + 1;
        if (pid == self->pids[i] && start == self->starts[i])
            continue;
        self->pids[i] = pid;
        self->starts[i] = start;
        PyObject *t = Py_BuildValue("IIK", i, pid, (unsigned long long)start);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            self->hi = end;         /* an upper bound of what is remembered */
            return NULL;
        }
        Py_DECREF(t);
    }
    self->hi = hi;
    return out;
}

static PyObject *Changes_forget(Changes *self, PyObject *args)
{
    /* forget(slot): the next diff reports `slot` again (its watcher was dropped). */
    unsigned int i;
    if (!PyArg_ParseTuple(args, "I", &i))
        return NULL;
    if (i < self->count) {
        self->pids[i] = 0;
        self->starts[i] = 0;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Changes_methods[] = {
    {"diff", (PyCFunction)Changes_diff, METH_VARARGS, NULL},
    {"forget", (PyCFunction)Changes_forget, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject ChangesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procwatch._hotstep.Changes",
    .tp_basicsize = sizeof(Changes),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Changes(slot_count): the slots whose (PID word, start time) moved since the last diff().",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Changes_init,
    .tp_dealloc = (destructor)Changes_dealloc,
    .tp_methods = Changes_methods,
};


/* ---- ServiceLock: the table's service-side lock, shared by Python and the step ------------
 *
 * segment.Table.service_lock orders the service's own writes to a slot (the end of a slot
 * against the heartbeat checker's HUNG and KILLED_HUNG, the guard's repairs).  The step
 * clears words without the GIL, so the lock is a pthread mutex both sides take: Python with
 * `with`, the step around its compare-and-swap.  Python waits for it with the GIL released
 * (a Python holder may need the GIL to finish). */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
} ServiceLock;

static PyObject *ServiceLock_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ServiceLock *l = (ServiceLock *)type->tp_alloc(type, 0);
    if (l)
        pthread_mutex_init(&l->mu, NULL);
    return (PyObject *)l;
}

static void ServiceLock_dealloc(ServiceLock *l)
{
    pthread_mutex_destroy(&l->mu);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyObject *ServiceLock_acquire(ServiceLock *l, PyObject *unused)
{
    if (pthread_mutex_trylock(&l->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&l->mu);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_TRUE;
}

static PyObject *ServiceLock_release(ServiceLock *l, PyObject *unused)
{
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_NONE;
}

static PyObject *ServiceLock_exit(ServiceLock *l, PyObject *args)
{
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_FALSE;
}

static PyMethodDef ServiceLock_methods[] = {
    {"acquire", (PyCFunction)ServiceLock_acquire, METH_NOARGS, NULL},
    {"release", (PyCFunction)ServiceLock_release, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)ServiceLock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)ServiceLock_exit, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject ServiceLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procwatch._hotstep.ServiceLock",
    .tp_basicsize = sizeof(ServiceLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mutex taken by Python (with) and by the hot step around its compare-and-swap.",
    .tp_new = ServiceLock_new,
    .tp_dealloc = (destructor)ServiceLock_dealloc,
    .tp_methods = ServiceLock_methods,
};

/* ---- HotStep: the detector's watch map and step ----------------------------------------- */

typedef struct {
    uint32_t tgid;      /* 0: empty, TOMB: deleted */
    uint32_t slot;
    int fd;             /* our own dup of the pidfd, or -1 (process already unreadable) */
    uint64_t gone_ns;   /* fd -1: CLOCK_MONOTONIC when it was found gone; only an exit event
                         * stamped before that can be its own (a later one is a reused PID's) */
} Entry;

#define TOMB 0xFFFFFFFFu

typedef struct {
    PyObject_HEAD
    int sock;
    int evfd;           /* stop(): wakes a step parked in poll() */
    int epfd;           /* every pidfd of the map, for exited() */
    uintptr_t table;
    uintptr_t pending;
    int npending;
    pthread_mutex_t mu;
    ServiceLock *service_lock;      /* segment.Table.service_lock, taken around each end */
    Entry *map;
    uint32_t cap;       /* power of two */
    uint32_t used;      /* live + tombstones */
    uint32_t live;
    uint32_t synced_generation;
    int parked;         /* in poll() with nothing to read: idle, not stuck (watchdog) */
    uint64_t alive_ns;  /* CLOCK_MONOTONIC ns of the last wake-up */
    uint64_t drained_ns; /* CLOCK_MONOTONIC ns the socket was last found empty: every event sent
                          * before then has been read (the reconcile's found-dead test) */
    unsigned long long events;
    unsigned char buf[1024];
} HotStep;

static inline uint32_t hash32(uint32_t x)
{
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

static int map_grow(HotStep *h, uint32_t want)
{
    uint32_t cap = 64;
    while (cap < want * 2)
        cap <<= 1;
    Entry *m = calloc(cap, sizeof(Entry));
    if (!m)
        return -1;
    for (uint32_t i = 0; i < h->cap; i++) {
        Entry *e = &h->map[i];
        if (e->tgid == 0 || e->tgid == TOMB)
            continue;
        uint32_t j = hash32(e->tgid) & (cap - 1);
        while (m[j].tgid)
            j = (j + 1) & (cap - 1);
        m[j] = *e;
    }
    free(h->map);
    h->map = m;
    h->cap = cap;
    h->used = h->live;
    return 0;
}

static void HotStep_dealloc(HotStep *h)
{
    if (h->map) {
        for (uint32_t i = 0; i < h->cap; i++)
            if (h->map[i].tgid && h->map[i].tgid != TOMB && h->map[i].fd >= 0)
                close(h->map[i].fd);
        free(h->map);
    }
    if (h->evfd >= 0)
        close(h->evfd);
    if (h->epfd >= 0)
        close(h->epfd);
    pthread_mutex_destroy(&h->mu);
    Py_XDECREF(h->service_lock);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *HotStep_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    HotStep *h = (HotStep *)type->tp_alloc(type, 0);
    if (!h)
        return NULL;
    h->sock = h->evfd = h->epfd = -1;
    pthread_mutex_init(&h->mu, NULL);
    return (PyObject *)h;
}

static int HotStep_init(HotStep *h, PyObject *args, PyObject *kw)
{
    /* HotStep(sock_fd, table_address, pending_address, pending_count, service_lock).  sock_fd < 0:
     * no socket (the map and exited() only: the pidfd backend, tests). */
    int sock, npending;
    unsigned long long table, pending;
    ServiceLock *lock;
    if (!PyArg_ParseTuple(args, "iKKiO!", &sock, &table, &pending, &npending, &ServiceLockType, &lock))
        return -1;
    if (h->map) {
        PyErr_SetString(PyExc_RuntimeError, "HotStep is initialised once");
        return -1;
    }
    h->sock = sock;
    h->table = (uintptr_t)table;
    h->pending = (uintptr_t)pending;
    h->npending = npending;
    Py_INCREF(lock);
    h->service_lock = lock;
    h->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (h->evfd < 0 || h->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    h->alive_ns = mono_ns();
    if (map_grow(h, 32) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *HotStep_add(HotStep *h, PyObject *args)
{
    /* add(slot, pid, pidfd, gone_ns=0): watch `pid` in `slot`; pidfd is duplicated (ours to
     * close).  pidfd -1: no descriptor (the process was already gone at gone_ns, CLOCK_MONOTONIC):
     * an exit event of that tgid stamped before gone_ns ends it at once, a later one is ignored. */
    unsigned int slot, pid;
    int fd;
    unsigned long long gone_ns = 0;
    if (!PyArg_ParseTuple(args, "IIi|K", &slot, &pid, &fd, &gone_ns))
        return NULL;
    if (pid == 0 || pid == TOMB) {
        PyErr_Format(PyExc_ValueError, "pid %u cannot be watched", pid);
        return NULL;
    }
    int own = -1;
    if (fd >= 0) {
        own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (own < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)slot << 32) | pid};
        if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, own, &ev) < 0) {
            int err = errno;
            close(own);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    pthread_mutex_lock(&h->mu);
    if ((h->used + 1) * 2 > h->cap && map_grow(h, h->live + 1) < 0) {
        pthread_mutex_unlock(&h->mu);
        if (own >= 0)
            close(own);
        return PyErr_NoMemory();
    }
    uint32_t j = hash32(pid) & (h->cap - 1);
    while (h->map[j].tgid && h->map[j].tgid != TOMB)
        j = (j + 1) & (h->cap - 1);
    if (h->map[j].tgid == 0)
        h->used++;
    h->map[j] = (Entry){pid, slot, own, (uint64_t)gone_ns};
    h->live++;
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

static PyObject *HotStep_remove(HotStep *h, PyObject *args)
{
    /* remove(slot, pid) -> bool: stop watching; our pidfd copy is closed here, under the map's
     * mutex, so a step never polls a closed descriptor. */
    unsigned int slot, pid;
    if (!PyArg_ParseTuple(args, "II", &slot, &pid))
        return NULL;
    int found = 0;
    pthread_mutex_lock(&h->mu);
    uint32_t j = hash32(pid) & (h->cap - 1);
    while (h->map[j].tgid) {
        Entry *e = &h->map[j];
        if (e->tgid == pid && e->slot == slot) {
            if (e->fd >= 0) {
                epoll_ctl(h->epfd, EPOLL_CTL_DEL, e->fd, NULL);
                close(e->fd);
            }
            e->tgid = TOMB;
            e->fd = -1;
            h->live--;
            found = 1;
            break;
        }
        j = (j + 1) & (h->cap - 1);
    }
    pthread_mutex_unlock(&h->mu);
    return PyBool_FromLong(found);
}

static inline int fd_exited(int fd)
{
    /* Only POLLIN means the whole thread group exited (see procfs.pidfd_exited). */
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

typedef struct {
    uint32_t slot, pid;
    int pend;
} Ended;

/* Look tgid up and end every slot of it whose process is wholly gone (hold no lock; takes
 * the map's); ts is the exit event's kernel stamp.  Returns how many were ended here (into
 * out[], at most max). */
static int end_tgid(HotStep *h, uint32_t tgid, uint64_t ts, Ended *out, int max, int *matched)
{
    int n = 0;
    *matched = 0;
    pthread_mutex_lock(&h->mu);
    uint32_t j = hash32(tgid) & (h->cap - 1);
    while (h->map[j].tgid) {
        Entry *e = &h->map[j];
        j = (j + 1) & (h->cap - 1);
        if (e->tgid != tgid)
            continue;
        *matched = 1;
        /* No pidfd: the process was gone (reaped) when the watch list adopted it.  Its own
         * exit event was sent before that; one sent after is a later process's that got the
         * same PID, whose status it must not take (the reconcile finds it dead instead). */
        if (e->fd < 0 ? ts > e->gone_ns : !fd_exited(e->fd))
            continue;                               /* one thread of a live process */
        uintptr_t word = h->table + HEADER_SIZE + (uintptr_t)e->slot * SLOT_SIZE + S_PID;
        pthread_mutex_lock(&h->service_lock->mu);
        int k = end_word(word, tgid, h->pending, h->npending, e->slot);
        pthread_mutex_unlock(&h->service_lock->mu);
        if (k != -2 && n < max)
            out[n++] = (Ended){e->slot, tgid, k};
    }
    pthread_mutex_unlock(&h->mu);
    return n;
}

static PyObject *ended_tuple(Ended *out, int n, uint32_t tgid, uint32_t status, uint64_t ts,
                             uint64_t zeroed)
{
    PyObject *lst = PyList_New(n);
    if (!lst)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("IIi", out[i].slot, out[i].pid, out[i].pend);
        if (!t) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, t);
    }
    return Py_BuildValue("sIIKKN", "exit", tgid, status,
                         (unsigned long long)ts, (unsigned long long)zeroed, lst);
}

#define MAX_ENDED 16

static PyObject *HotStep_step(HotStep *h, PyObject *noargs)
{
    /* Read events until one ends a registered process, then return:
     *   ("exit", tgid, status, kernel_ts_ns, zeroed_ns, [(slot, pid, pending_index)])
     *   ("miss", tgid, status, kernel_ts_ns)   an exit of a tgid the map lacks while the table's
     *                                          generation moved past synced_generation: sync, then end()
     *   ("overflow",)                          recv failed with ENOBUFS
     *   ("stop",)                              stop() was called
     * The GIL is released from recv to the wake. */
    if (h->sock < 0) {
        PyErr_SetString(PyExc_ValueError, "HotStep has no socket");
        return NULL;
    }
    Ended out[MAX_ENDED];
    int n = 0, kind = 0, err = 0;
    uint32_t tgid = 0, status = 0;
    uint64_t ts = 0, zeroed = 0;
    /* The thread's name in top -H, ps -L and /proc/PID/task/TID/comm: each respawned
     * detector names itself on its first step (one prctl, after an exit, not before one). */
    static __thread int named;
    if (!named) {
        prctl(PR_SET_NAME, "pw-detector", 0, 0, 0);
        named = 1;
    }
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        ssize_t r = recv(h->sock, h->buf, sizeof h->buf, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == ENOBUFS) {
                kind = 2;
                break;
            }
            if (errno != EAGAIN) {
                err = errno;
                kind = -1;
                break;
            }
            struct pollfd p[2] = {{.fd = h->sock, .events = POLLIN}, {.fd = h->evfd, .events = POLLIN}};
            __atomic_store_n(&h->drained_ns, mono_ns(), __ATOMIC_RELAXED);
            __atomic_store_n(&h->parked, 1, __ATOMIC_RELEASE);
            int pr = poll(p, 2, -1);
            __atomic_store_n(&h->parked, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&h->alive_ns, mono_ns(), __ATOMIC_RELAXED);
            if (pr < 0 && errno != EINTR) {
                err = errno;
                kind = -1;
                break;
            }
            if (p[1].revents & POLLIN) {
                uint64_t v;
                if (read(h->evfd, &v, sizeof v) < 0) { /* nothing: the flag is what counts */ }
                kind = 3;
                break;
            }
            continue;
        }
        if (r < MIN_EXIT_LEN)
            continue;
        uint32_t what;
        memcpy(&what, h->buf + EXIT_OFFSET, 4);
        if (what != PROC_EVENT_EXIT)
            continue;
        h->events++;
        /* proc_event: what, cpu, timestamp_ns (u64), then exit: pid, tgid, exit_code */
        memcpy(&ts, h->buf + EXIT_OFFSET + 8, 8);
        memcpy(&tgid, h->buf + EXIT_OFFSET + 20, 4);
        memcpy(&status, h->buf + EXIT_OFFSET + 24, 4);
        /* The generation first, then the map: Python adds to the map before it publishes
         * synced_generation, so a registration the map lacks shows as a moved generation. */
        uint32_t seen = __atomic_load_n(&h->synced_generation, __ATOMIC_ACQUIRE);
        int matched;
        zeroed = mono_ns();
        n = end_tgid(h, tgid, ts, out, MAX_ENDED, &matched);
        if (n) {
            kind = 1;
            break;
        }
        if (!matched && load32(h->table + H_GENERATION) != seen) {
            kind = 4;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    switch (kind) {
    case 1:
        return ended_tuple(out, n, tgid, status, ts, zeroed);
    case 2:
        return Py_BuildValue("(s)", "overflow");
    case 3:
        return Py_BuildValue("(s)", "stop");
    case 4:
        return Py_BuildValue("sIIK", "miss", tgid, status, (unsigned long long)ts);
    default:
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
}

static PyObject *HotStep_end(HotStep *h, PyObject *args)
{
    /* end(tgid, kernel_ts_ns) -> [(slot, pid, pending_index)]: the step's lookup, pidfd check,
     * CAS and wake for one tgid's exit event (after a "miss" and a sync). */
    unsigned int tgid;
    unsigned long long ts;
    if (!PyArg_ParseTuple(args, "IK", &tgid, &ts))
        return NULL;
    Ended out[MAX_ENDED];
    int n, matched;
    Py_BEGIN_ALLOW_THREADS
    n = end_tgid(h, tgid, (uint64_t)ts, out, MAX_ENDED, &matched);
    Py_END_ALLOW_THREADS
    PyObject *lst = PyList_New(n);
    if (!lst)
        return NULL;
    for (int i = 0; i < n; i++)
        PyList_SET_ITEM(lst, i, Py_BuildValue("IIi", out[i].slot, out[i].pid, out[i].pend));
    return lst;
}

static PyObject *HotStep_exited(HotStep *h, PyObject *noargs)
{
    /* exited() -> [(slot, pid)] whose pidfd is readable now (the whole group exited): one
     * epoll_wait over every watched process, so a check of N watched ones costs O(gone). */
    struct epoll_event evs[256];
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    int n = epoll_wait(h->epfd, evs, 256, 0);
    if (n < 0) {
        Py_DECREF(out);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (int i = 0; i < n; i++) {
        uint64_t d = evs[i].data.u64;
        PyObject *t = Py_BuildValue("II", (unsigned int)(d >> 32), (unsigned int)d);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *HotStep_stop(HotStep *h, PyObject *noargs)
{
    uint64_t one = 1;
    if (write(h->evfd, &one, sizeof one) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *HotStep_clear_stop(HotStep *h, PyObject *noargs)
{
    uint64_t v;
    if (read(h->evfd, &v, sizeof v) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *HotStep_set_socket(HotStep *h, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    h->sock = fd;
    Py_RETURN_NONE;
}

static PyObject *HotStep_get_synced(HotStep *h, void *c)
{
    return PyLong_FromUnsignedLong(__atomic_load_n(&h->synced_generation, __ATOMIC_ACQUIRE));
}

static int HotStep_set_synced(HotStep *h, PyObject *v, void *c)
{
    unsigned long g = PyLong_AsUnsignedLong(v);
    if (g == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    __atomic_store_n(&h->synced_generation, (uint32_t)g, __ATOMIC_RELEASE);
    return 0;
}

static PyObject *HotStep_get_parked(HotStep *h, void *c)
{
    return PyBool_FromLong(__atomic_load_n(&h->parked, __ATOMIC_ACQUIRE));
}

static PyObject *HotStep_get_alive(HotStep *h, void *c)
{
    return PyFloat_FromDouble(__atomic_load_n(&h->alive_ns, __ATOMIC_RELAXED) / 1e9);
}

static PyObject *HotStep_get_drained(HotStep *h, void *c)
{
    /* Parked in poll(): the socket is empty now (an event arriving ends the poll at once). */
    if (__atomic_load_n(&h->parked, __ATOMIC_ACQUIRE))
        return PyFloat_FromDouble(mono_ns() / 1e9);
    return PyFloat_FromDouble(__atomic_load_n(&h->drained_ns, __ATOMIC_RELAXED) / 1e9);
}

static PyObject *HotStep_get_events(HotStep *h, void *c)
{
    return PyLong_FromUnsignedLongLong(h->events);
}

static PyObject *HotStep_get_watched(HotStep *h, void *c)
{
    return PyLong_FromUnsignedLong(h->live);
}

static PyGetSetDef HotStep_getset[] = {
    {"synced_generation", (getter)HotStep_get_synced, (setter)HotStep_set_synced,
     "the table generation the map is in line with (set by the watch list after a sync)", NULL},
    {"parked", (getter)HotStep_get_parked, NULL, "in poll() with nothing to read: idle, not stuck", NULL},
    {"alive_at", (getter)HotStep_get_alive, NULL, "CLOCK_MONOTONIC s of the step's last wake-up", NULL},
    {"drained_at", (getter)HotStep_get_drained, NULL,
     "CLOCK_MONOTONIC s the socket was last found empty (now while parked; 0: never)", NULL},
    {"events", (getter)HotStep_get_events, NULL, "exit events read", NULL},
    {"watched", (getter)HotStep_get_watched, NULL, "processes in the map", NULL},
    {NULL},
};

static PyMethodDef HotStep_methods[] = {
    {"add", (PyCFunction)HotStep_add, METH_VARARGS, NULL},
    {"remove", (PyCFunction)HotStep_remove, METH_VARARGS, NULL},
    {"step", (PyCFunction)HotStep_step, METH_NOARGS, NULL},
    {"end", (PyCFunction)HotStep_end, METH_VARARGS, NULL},
    {"exited", (PyCFunction)HotStep_exited, METH_NOARGS, NULL},
    {"stop", (PyCFunction)HotStep_stop, METH_NOARGS, NULL},
    {"clear_stop", (PyCFunction)HotStep_clear_stop, METH_NOARGS, NULL},
    {"set_socket", (PyCFunction)HotStep_set_socket, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject HotStepType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procwatch._hotstep.HotStep",
    .tp_basicsize = sizeof(HotStep),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "HotStep(sock_fd, table_address, pending_address, pending_count): the detector's hot step.",
    .tp_new = HotStep_new,
    .tp_init = (initproc)HotStep_init,
    .tp_dealloc = (destructor)HotStep_dealloc,
    .tp_methods = HotStep_methods,
    .tp_getset = HotStep_getset,
};

/* ---- PeerWord: the C base of client.Peer -------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *dict;
    PyObject *weakrefs;
    uintptr_t word;     /* address of the slot's PID word; 0 once closed */
    uint32_t known;     /* the PID the peer expects there */
} PeerWord;

/* The target's PID as the table says it now: 0 also when its armed death word says
 * FUTEX_OWNER_DIED (issue 14, abi.death_word_dead(): the kernel marked the death and the
 * service has not zeroed the PID word yet).  The PID word is at the slot's start, so the
 * slot's death fields are at fixed distances from it. */
static inline uint32_t word_pid(PeerWord *p)
{
    if (death_fired_raw(p->word - S_PID))
        return 0;
    return load32(p->word);
}

static PyObject *peer_closed(void)
{
    PyErr_SetString(PyExc_ValueError, "the Peer is closed");
    return NULL;
}

static PyObject *PeerWord_pid(PeerWord *p, void *c)
{
    if (!p->word)
        return peer_closed();
    uint32_t v = word_pid(p);
    if (v == p->known || v == 0)
        return PyLong_FromUnsignedLong(v);
    return PyObject_CallMethod((PyObject *)p, "_follow", "k", (unsigned long)v);
}

static PyObject *PeerWord_alive(PeerWord *p, void *c)
{
    if (!p->word)
        return peer_closed();
    uint32_t v = word_pid(p);
    if (v == p->known || v == 0)
        return PyBool_FromLong(v != 0);
    PyObject *r = PyObject_CallMethod((PyObject *)p, "_follow", "k", (unsigned long)v);
    if (!r)
        return NULL;
    int alive = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (alive < 0)
        return NULL;
    return PyBool_FromLong(alive);
}

static PyObject *PeerWord_get_known(PeerWord *p, void *c)
{
    return PyLong_FromUnsignedLong(p->known);
}

static int PeerWord_set_known(PeerWord *p, PyObject *v, void *c)
{
    unsigned long k = PyLong_AsUnsignedLong(v);
    if (k == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    p->known = (uint32_t)k;
    return 0;
}

static PyObject *PeerWord_bind(PeerWord *p, PyObject *args)
{
    /* _bind(address): read the PID word at `address` from now on (0: closed). */
    unsigned long long a;
    if (!PyArg_ParseTuple(args, "K", &a))
        return NULL;
    if (a % 4) {
        PyErr_SetString(PyExc_ValueError, "a PID word is 4-byte aligned");
        return NULL;
    }
    p->word = (uintptr_t)a;
    Py_RETURN_NONE;
}

static int PeerWord_traverse(PeerWord *p, visitproc visit, void *arg)
{
    Py_VISIT(p->dict);
    Py_VISIT(Py_TYPE(p));
    return 0;
}

static int PeerWord_clear(PeerWord *p)
{
    Py_CLEAR(p->dict);
    return 0;
}

static void PeerWord_dealloc(PeerWord *p)
{
    PyTypeObject *tp = Py_TYPE(p);
    PyObject_GC_UnTrack(p);
    if (p->weakrefs)
        PyObject_ClearWeakRefs((PyObject *)p);
    PeerWord_clear(p);
    tp->tp_free((PyObject *)p);
}

static PyGetSetDef PeerWord_getset[] = {
    {"pid", (getter)PeerWord_pid, NULL, "The target's PID, or 0 when it is gone (or was never started).", NULL},
    {"alive", (getter)PeerWord_alive, NULL, "Whether the target lives (pid != 0).", NULL},
    {"_known", (getter)PeerWord_get_known, (setter)PeerWord_set_known, NULL, NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyMethodDef PeerWord_methods[] = {
    {"_bind", (PyCFunction)PeerWord_bind, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject PeerWordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procwatch._hotstep.PeerWord",
    .tp_basicsize = sizeof(PeerWord),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of procwatch.Peer: pid and alive read the slot's PID word.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)PeerWord_dealloc,
    .tp_traverse = (traverseproc)PeerWord_traverse,
    .tp_clear = (inquiry)PeerWord_clear,
    .tp_getset = PeerWord_getset,
    .tp_methods = PeerWord_methods,
    .tp_dictoffset = offsetof(PeerWord, dict),
    .tp_weaklistoffset = offsetof(PeerWord, weakrefs),
};

/* ---- module ------------------------------------------------------------------------------- */

/* ---- The death step: the death-word waiter's wait, confirm, zero and wake, without the GIL ----
 *
 * Issue 14's waiter in Python spent 0.3-1 ms between the kernel's wake and the peer's
 * (GIL retake, /proc reads through Python file objects, a pidfd, the clear), and the
 * waits behind the GIL made the tail: a fired word waited for whatever Python thread held
 * it.  Here one call sets FUTEX_WAITERS in each death word (by CAS: a plain write could
 * lose the kernel's OWNER_DIED), sleeps in futex_waitv(2) on them and the header's
 * generation word, and when a word fires decides the plain case -- the whole thread group
 * is exiting -- opens a pidfd for the status, zeroes the PID word and wakes its waiters,
 * all with the GIL released.  Anything it cannot decide (an execve(2) in progress, a
 * process hidden or reaped already, a PID word that moved) goes back to Python as "fired",
 * where deathword.confirm() keeps the rules.  The same rules as group_exiting() in
 * procfs.py: a false death is worse than a late one.
 *
 * The waiter can run at a real-time priority (SCHED_FIFO, `priority` > 0) while it waits
 * and until the wake: woken by a dying process that tears gigabytes down on one CPU, a
 * normal thread is often queued behind it for milliseconds, a real-time one is pushed to
 * the other CPU at once.  It is back at SCHED_OTHER before it takes the GIL again, so the
 * bookkeeping after the wake never holds a CPU the woken peer needs. */

#define PF_EXITING_FLAG 0x4u     /* include/linux/sched.h */
#define STATE_ALIVE 2
#define STATE_HUNG 5
#define PW_STEP_FUTEX2_U32 0x02     /* FUTEX2_SIZE_U32; shared: no FUTEX2_PRIVATE */
#define DEATH_ENTRIES 127        /* futex_waitv's 128 words, one of them the generation */
#define RESTLESS_TURNS 64        /* turns without a sleep before a step gives its priority up */

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

struct step_waitv { uint64_t val, uaddr; uint32_t flags, reserved; };

typedef struct {
    uint32_t slot, pid;
    unsigned long long start;
    uint32_t owner;             /* the death mutex's owner TID when last armed (0: not seen) */
    int leader_fd, owner_fd;    /* their held stat files (StatFds), or -1 */
    int pidfd;                  /* the held pidfd (StatFds), or -1 */
} DeathEntry;

/* Read a small /proc file; its length, or -1 with errno. */
static ssize_t read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, size - 1);
    int e = errno;
    close(fd);
    if (r < 0) {
        errno = e;
        return -1;
    }
    buf[r] = 0;
    return r;
}

/* What the death step reads of a /proc/.../stat line. */
typedef struct {
    char state;                 /* field 3 */
    unsigned long flags;        /* field 9 */
    long threads;               /* field 20: the group's threads not yet released */
    unsigned long long start;   /* field 22 */
    unsigned long long sigpnd;  /* field 31: the thread's own pending signals, its SigPnd (the
                                 * status file says the same for ~10x the read) */
} TaskStat;

/* Parse a /proc/.../stat line: 0, or -1 with errno EINVAL. */
static int parse_stat(char *buf, TaskStat *t)
{
    char *p = strrchr(buf, ')');            /* comm may hold spaces and parentheses */
    if (!p || p[1] != ' ' || !p[2]) {
        errno = EINVAL;
        return -1;
    }
    p += 2;
    t->state = *p;
    for (int field = 3; field < 31; field++) {
        p = strchr(p, ' ');
        if (!p) {
            errno = EINVAL;
            return -1;
        }
        p++;
        if (field + 1 == 9)
            t->flags = strtoul(p, NULL, 10);
        else if (field + 1 == 20)
            t->threads = strtol(p, NULL, 10);
        else if (field + 1 == 22)
            t->start = strtoull(p, NULL, 10);
    }
    t->sigpnd = strtoull(p, NULL, 10);
    return 0;
}

/* Read and parse /proc/.../stat: 0, or -1 with errno (ENOENT/ESRCH: gone). */
static int read_stat(const char *path, TaskStat *t)
{
    char buf[1024];
    if (read_small(path, buf, sizeof buf) < 0)
        return -1;
    return parse_stat(buf, t);
}

/* The same through a descriptor opened before (StatFds): a pread(2), no path walk. */
static int pread_stat(int fd, TaskStat *t)
{
    char buf[1024];
    ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
    if (r < 0)
        return -1;                          /* ESRCH: the task was reaped */
    buf[r] = 0;
    return parse_stat(buf, t);
}

/* A thread that will not run user code again: a zombie, exiting, or SIGKILL pending (a fatal
 * signal and exit_group() queue it on every other thread, complete_signal() and
 * zap_other_threads(); a thread not scheduled since has not reached do_exit()). */
static inline int task_dying(const TaskStat *t)
{
    return t->state == 'Z' || t->state == 'X' || (t->flags & PF_EXITING_FLAG)
           || (t->sigpnd & (1ull << (SIGKILL - 1)));
}

/* The hex mask after "\n<name>" in a /proc status file: 1 found (in *out), 0 absent,
 * -1 with errno (gone). */
static int status_hex(const char *path, const char *name, unsigned long long *out)
{
    char buf[4096];
    if (read_small(path, buf, sizeof buf) < 0)
        return -1;
    char *at = strstr(buf, name);
    if (!at)
        return 0;
    *out = strtoull(at + strlen(name), NULL, 16);
    return 1;
}

#define YIELD_TIDS 64

/* ---- StatFds: a shard's /proc stat files, opened while its processes live ----------------
 *
 * Opening /proc/PID/task/TID/stat walks a path whose dentries the kernel makes on first use:
 * ~100 µs here for a process never looked at, and ~80 again after the machine slept, against
 * ~6 µs for a pread(2) on a descriptor opened before.  A death step reads two such files
 * between the fired word and the wake, so each shard keeps them open: the leader's and the
 * death mutex owner's (the sentinel thread's), opened when the step first sees the word
 * armed (not on the death path), closed when the entry leaves the shard; and the process's
 * pidfd the same way, which the death hands on as a dup(2) (pidfd_open(2) was ~20 µs of the
 * death path).  A descriptor of a
 * reaped task reads ESRCH and never another process's.  One object per shard, used by that
 * shard's one waiter at a time (the mutex makes misuse harmless), so a respawned waiter finds
 * them open. */

typedef struct { uint32_t pid, tid; unsigned long long start; int fd, seen; } StatFd;

/* Descriptors all StatFds hold, and the most they may: a quarter of RLIMIT_NOFILE (each armed
 * process holds up to three; the watch list holds two more of its own).  Past it an entry is
 * read by path, as without held files. */
static long statfds_open_now, statfds_open_max = -1;

static int statfds_budget(void)
{
    long max = __atomic_load_n(&statfds_open_max, __ATOMIC_RELAXED);
    if (max < 0) {
        struct rlimit rl;
        max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (long)(rl.rlim_cur / 4)
                                                                                : 16384;
        __atomic_store_n(&statfds_open_max, max, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&statfds_open_now, __ATOMIC_RELAXED) < max;
}

static void statfds_close_fd(int fd)
{
    if (fd >= 0) {
        close(fd);
        __atomic_sub_fetch(&statfds_open_now, 1, __ATOMIC_RELAXED);
    }
}

/* The leader's is /proc/PID/stat, not /proc/PID/task/PID/stat: the same fields the step reads
 * (the leader's state, flags, pending signals and start time; the group's thread count), and
 * a path the registration's start-time check has just looked up (~10 µs to open, not ~100). */
static void stat_path(char *path, size_t size, uint32_t pid, uint32_t tid)
{
    if (tid == pid)
        snprintf(path, size, "/proc/%u/stat", pid);
    else
        snprintf(path, size, "/proc/%u/task/%u/stat", pid, tid);
}

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    StatFd *items;
    int n, cap;
    int closing;                /* close() came while a step held it: the step closes all */
} StatFds;

static PyObject *StatFds_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    StatFds *o = (StatFds *)type->tp_alloc(type, 0);
    if (o)
        pthread_mutex_init(&o->mu, NULL);
    return (PyObject *)o;
}

static void statfds_close_all(StatFds *o)
{
    for (int i = 0; i < o->n; i++)
        statfds_close_fd(o->items[i].fd);
    o->n = 0;
}

static void StatFds_dealloc(StatFds *o)
{
    statfds_close_all(o);
    free(o->items);
    pthread_mutex_destroy(&o->mu);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

/* The descriptor of (pid, tid)'s stat file -- of pid's pidfd for tid 0 -- opened now if it is
 * not yet (-1 if it cannot be, or the budget is spent: the step then reads by path, opens its
 * pidfd then).  Keyed by the registered start time too: a PID reused by a new registration
 * never gets the files of the process that had it.  Marks it seen for statfds_sweep().
 * Holding o->mu. */
static int statfds_get(StatFds *o, uint32_t pid, uint32_t tid, unsigned long long start)
{
    for (int i = 0; i < o->n; i++)
        if (o->items[i].pid == pid && o->items[i].tid == tid && o->items[i].start == start) {
            o->items[i].seen = 1;
            return o->items[i].fd;
        }
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 64;
        StatFd *items = realloc(o->items, (size_t)cap * sizeof *items);
        if (!items)
            return -1;
        o->items = items;
        o->cap = cap;
    }
    int fd = -1;
    if (!statfds_budget()) {
        /* by path */
    } else if (tid == 0) {
        fd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
    } else {
        char path[64];
        stat_path(path, sizeof path, pid, tid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd >= 0)
        __atomic_add_fetch(&statfds_open_now, 1, __ATOMIC_RELAXED);
    o->items[o->n++] = (StatFd){.pid = pid, .tid = tid, .start = start, .fd = fd, .seen = 1};
    return fd;                              /* -1 remembered too: not retried every turn */
}

/* Close the descriptors no entry asked for since the last sweep.  Holding o->mu. */
static void statfds_sweep(StatFds *o)
{
    for (int i = 0; i < o->n;) {
        if (!o->items[i].seen) {
            statfds_close_fd(o->items[i].fd);
            o->items[i] = o->items[--o->n];
            continue;
        }
        o->items[i++].seen = 0;
    }
}

/* Never waits for a step: one may hold the mutex for as long as its wait lasts (a stop whose
 * wake it missed).  Then the step closes everything on its way out, and from then on closes
 * what each later call opens: a closed StatFds stays closed. */
static PyObject *StatFds_close(StatFds *o, PyObject *unused)
{
    __atomic_store_n(&o->closing, 1, __ATOMIC_RELEASE);
    if (pthread_mutex_trylock(&o->mu) != 0)
        Py_RETURN_FALSE;                    /* the step that holds it closes them */
    statfds_close_all(o);
    pthread_mutex_unlock(&o->mu);
    Py_RETURN_TRUE;
}

static PyObject *StatFds_len(StatFds *o, void *c)
{
    return PyLong_FromLong(o->n);
}

static PyMethodDef StatFds_methods[] = {
    {"close", (PyCFunction)StatFds_close, METH_NOARGS,
     "Close every descriptor held, for good: True now, False when a step holds them (it closes them)."},
    {NULL},
};

static PyGetSetDef StatFds_getset[] = {
    {"held", (getter)StatFds_len, NULL, "how many stat files it holds open (or tried to)", NULL},
    {NULL},
};

static PyTypeObject StatFdsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procwatch._hotstep.StatFds",
    .tp_basicsize = sizeof(StatFds),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "StatFds(): one death-word shard's open /proc stat files (see _hotstep.c).",
    .tp_new = StatFds_new,
    .tp_dealloc = (destructor)StatFds_dealloc,
    .tp_methods = StatFds_methods,
    .tp_getset = StatFds_getset,
};

/* A thread's stat through its held descriptor, else by path. */
static int task_stat(int fd, uint32_t pid, uint32_t tid, TaskStat *t)
{
    if (fd >= 0)
        return pread_stat(fd, t);
    char path[64];
    stat_path(path, sizeof path, pid, tid);
    return read_stat(path, t);
}

/* The common case of group_exiting_c() in two stat reads and no directory listing (which
 * cost ~60-90 µs of the ~150 here, on a dying process's /proc): the leader and the death
 * mutex's owner -- the sentinel thread -- are the group's only threads, and both are dying
 * (or the leader is the only one left, dying).  1 when that is so; 0 when it does not say
 * (group_exiting_c() decides).
 *
 * Why two reads are enough.  The leader is read first: its field 20 counts the group's
 * threads not yet released, and the owner is read after it.  The owner existed before its
 * word fired, and still exists at the second read, so it was one of the two counted at the
 * first: the group was {leader, owner}.  No thread joins it afterwards: clone(2) fails in a
 * thread with a signal pending (copy_process()), and both were dying.  An execve(2) in a
 * third thread (which kills the other two) makes the count 3 and takes the full path. */
static int group_dying_fast(const DeathEntry *e, pid_t *tids, int *ntids)
{
    TaskStat leader, other;
    if (task_stat(e->leader_fd, e->pid, e->pid, &leader) < 0 || leader.start != e->start
            || !task_dying(&leader))
        return 0;
    if (leader.threads == 1) {              /* the leader alone, and dying */
        tids[(*ntids)++] = (pid_t)e->pid;
        return 1;
    }
    if (leader.threads != 2 || e->owner == 0 || e->owner == e->pid)
        return 0;
    if (task_stat(e->owner_fd, e->pid, e->owner, &other) < 0 || !task_dying(&other))
        return 0;
    tids[(*ntids)++] = (pid_t)e->pid;
    tids[(*ntids)++] = (pid_t)e->owner;
    return 1;
}

/* One listing of /proc/PID/task for group_exiting_c(): 1 every thread dying, 0 not decided,
 * 2 every thread read was dying but one listed was gone when read.  A listing can stop short
 * there: proc_task_readdir()'s next_tid() ends the walk at a thread released while it was
 * being listed (pid_alive()), so the threads after it are never shown.  During an execve(2)
 * from a third thread the other threads are released one after another, all dying, and the
 * exec'ing thread -- the one not dying -- may be among those not shown. */
static int task_listing(uint32_t pid, unsigned long long start, pid_t *tids, int *ntids)
{
    char path[96];
    snprintf(path, sizeof path, "/proc/%u/task", pid);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int verdict = 1, leader = 0, vanished = 0;
    struct dirent *de;
    while (verdict == 1 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        TaskStat t;
        snprintf(path, sizeof path, "/proc/%u/task/%s/stat", pid, de->d_name);
        if (read_stat(path, &t) < 0) {
            if (errno != ENOENT && errno != ESRCH)
                verdict = 0;                        /* unreadable is never read as gone */
            else
                vanished = 1;
            continue;
        }
        if ((uint32_t)strtoul(de->d_name, NULL, 10) == pid) {
            if (t.start != start) {
                verdict = 0;                        /* another process: Python decides */
                continue;
            }
            leader = 1;
        }
        if (tids && *ntids < YIELD_TIDS && t.state != 'Z' && t.state != 'X')
            tids[(*ntids)++] = (pid_t)strtol(de->d_name, NULL, 10);
        if (task_dying(&t))
            continue;
        unsigned long long core = 0;
        snprintf(path, sizeof path, "/proc/%u/status", pid);
        int r = status_hex(path, "\nCoreDumping:", &core);   /* decimal 0/1 reads the same in hex */
        verdict = r == 1 && core == 1;
    }
    closedir(d);
    if (!verdict || !leader)
        return 0;
    return vanished ? 2 : 1;
}

#define LISTING_TRIES 3

/* Whether every thread of (pid, start) is exiting: 1 yes, 0 not decided here (some thread is
 * not exiting -- an execve(2), or one not scheduled since its SIGKILL came -- or /proc hides
 * or lacks the process, or the PID is another's).  procfs.group_exiting() is the full rule.
 * The leader's entry must be there with the registered start time: that is what ties the
 * verdict (and a pidfd opened before it) to the registered process.  One stat read a thread:
 * the pending SIGKILL comes from its field 31, not from the status file (~10x the read).
 * The threads seen go to tids (at most YIELD_TIDS; *ntids of them) when tids is not NULL.
 * A listing that may have stopped short is made again, LISTING_TRIES times at most. */
static int group_exiting_c(uint32_t pid, unsigned long long start, pid_t *tids, int *ntids)
{
    for (int i = 0; i < LISTING_TRIES; i++) {
        *ntids = 0;
        int v = task_listing(pid, start, tids, ntids);
        if (v != 2)
            return v;
    }
    return 0;                               /* threads kept leaving: Python asks again */
}

static __thread int step_policy_fifo;

/* SCHED_FIFO at `priority` (> 0) or back to SCHED_OTHER (0) for the calling thread; 0 or errno. */
static int set_fifo(int priority)
{
    if ((priority > 0) == step_policy_fifo)
        return 0;
    struct sched_param sp = {.sched_priority = priority};
    if (sched_setscheduler(0, priority > 0 ? SCHED_FIFO : SCHED_OTHER, &sp) != 0)
        return errno;
    step_policy_fifo = priority > 0;
    return 0;
}

static PyObject *py_realtime_probe(PyObject *self, PyObject *args)
{
    /* realtime_probe(priority) -> 0, or the errno sched_setscheduler(2) gave: whether death
     * steps can wait at that SCHED_FIFO priority here (tried on the calling thread, undone). */
    int priority;
    if (!PyArg_ParseTuple(args, "i", &priority))
        return NULL;
    int err = set_fifo(priority);
    if (!err)
        set_fifo(0);
    return PyLong_FromLong(err);
}

/* ---- The dead yield: a confirmed death's teardown gives its CPU to the woken ------------
 *
 * The kernel wakes the death-word waiter from inside the dying process, which then tears its
 * memory down in kernel mode (~50 ms a GiB).  A normal-priority peer the scheduler queues on
 * that CPU waits until the teardown's slice ends -- 2-5 ms here (HZ 250, no full preemption)
 * about one kill in thirty.  So once a death is confirmed and its peers woken, the step puts
 * each thread of the dying group at SCHED_IDLE: any woken normal task preempts an idle-policy
 * one at its next cond_resched().  The old policy comes back `yield_ns` later (the next step
 * turn past that moment, on any shard), so a busy machine never starves the teardown of the
 * memory it is freeing for longer than that.  Only threads the confirmation saw exiting are
 * touched, and a thread is restored only while its group's leader still has the start time
 * it had (a TID is not reused before the PID space wraps; this rules out the leader's). */

struct pw_sched_attr {              /* struct sched_attr, SCHED_ATTR_SIZE_VER0 */
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
};

#define YIELD_MAX 256
#ifndef SCHED_IDLE
#define SCHED_IDLE 5
#endif
#define PW_SCHED_DEADLINE 6

typedef struct {
    pid_t pid, tid;
    unsigned long long start;
    uint64_t until;
    struct pw_sched_attr attr;
} Yielded;

static pthread_mutex_t yield_mu = PTHREAD_MUTEX_INITIALIZER;
static Yielded yielded[YIELD_MAX];
static int nyielded;
static unsigned long long yield_counts[3];      /* threads yielded, restored, not restored */
static int yield_refused;                      /* a restore was refused: yield no more */

static int sched_attr_get(pid_t tid, struct pw_sched_attr *a)
{
    memset(a, 0, sizeof *a);
    return (int)syscall(SYS_sched_getattr, tid, a, (unsigned)sizeof *a, 0u);
}

static int sched_attr_set(pid_t tid, const struct pw_sched_attr *a)
{
    struct pw_sched_attr c = *a;
    c.size = sizeof c;
    return (int)syscall(SYS_sched_setattr, tid, &c, 0u);
}

/* Put the dying group's threads `tids` at SCHED_IDLE until `until` (CLOCK_MONOTONIC ns). */
static void yield_teardown(uint32_t pid, unsigned long long start, const pid_t *tids, int ntids, uint64_t until)
{
    pthread_mutex_lock(&yield_mu);
    for (int i = 0; i < ntids && nyielded < YIELD_MAX && !yield_refused; i++) {
        Yielded *y = &yielded[nyielded];
        if (sched_attr_get(tids[i], &y->attr) != 0 || y->attr.sched_policy == SCHED_IDLE
                || y->attr.sched_policy == PW_SCHED_DEADLINE)
            continue;                       /* gone; idle already; a deadline task keeps its budget */
        struct pw_sched_attr idle = {.sched_policy = SCHED_IDLE};
        if (sched_attr_set(tids[i], &idle) != 0)
            continue;
        y->pid = (pid_t)pid;
        y->tid = tids[i];
        y->start = start;
        y->until = until;
        nyielded++;
        yield_counts[0]++;
    }
    pthread_mutex_unlock(&yield_mu);
}

/* Restore the yielded threads whose time is up (all of them with `all`); the earliest time
 * still to come, or 0 when none is left. */
static uint64_t restore_yielded(int all)
{
    uint64_t now = mono_ns(), next = 0;
    pthread_mutex_lock(&yield_mu);
    for (int i = 0; i < nyielded;) {
        Yielded *y = &yielded[i];
        if (!all && y->until > now) {
            if (!next || y->until < next)
                next = y->until;
            i++;
            continue;
        }
        TaskStat t;
        if (task_stat(-1, (uint32_t)y->pid, (uint32_t)y->tid, &t) == 0) {
            if (task_stat(-1, (uint32_t)y->pid, (uint32_t)y->pid, &t) == 0 && t.start == y->start) {
                if (sched_attr_set(y->tid, &y->attr) == 0)
                    yield_counts[1]++;
                else if (errno != ESRCH) {
                    yield_counts[2]++;
                    yield_refused = 1;      /* e.g. EPERM: never leave more at SCHED_IDLE */
                }
            }
        }
        *y = yielded[--nyielded];
    }
    pthread_mutex_unlock(&yield_mu);
    return next;
}

static PyObject *py_restore_yielded(PyObject *self, PyObject *noargs)
{
    /* restore_yielded() -> (yielded, restored, refused): put every thread the death steps
     * left at SCHED_IDLE back now (the service's stop), and the counts so far. */
    Py_BEGIN_ALLOW_THREADS
    restore_yielded(1);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&yield_mu);
    PyObject *r = Py_BuildValue("KKK", yield_counts[0], yield_counts[1], yield_counts[2]);
    pthread_mutex_unlock(&yield_mu);
    return r;
}

/* Set FUTEX_WAITERS in slot s's death word; the value to wait on, or -1 when it fired. */
static long long set_waiters_raw(uintptr_t s)
{
    uintptr_t a = s + S_DEATH_MUTEX;
    uint32_t v = load32(a);
    for (;;) {
        if (v & FUTEX_OWNER_DIED_BIT)
            return -1;
        if ((v & FUTEX_WAITERS) || !(v & FUTEX_TID_MASK))
            return v;                   /* already set; or unlocked (an unregister in progress) */
        uint32_t found = v;
        if (__atomic_compare_exchange_n((uint32_t *)a, &found, v | FUTEX_WAITERS, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return v | FUTEX_WAITERS;
        v = found;
    }
}

enum { DS_MOVED, DS_TIMEOUT, DS_FIRED, DS_DEAD, DS_ERROR };

/* A fired word of e: decide the plain death and end it.  DS_DEAD (fd, pend, zeroed set) or
 * DS_FIRED (Python decides). */
static int end_death(uintptr_t table, uintptr_t pending, int npending, ServiceLock *lock,
                     const DeathEntry *e, uint64_t yield_ns, int *fd_out, int *pend_out,
                     uint64_t *zeroed_out)
{
    pid_t tids[YIELD_TIDS];
    int ntids = 0;
    uintptr_t s = slot_at(table, e->slot);
    uint32_t state = load32(s + S_STATE);
    if (load32(s + S_PID) != e->pid || !death_fired_raw(s) || (state != STATE_ALIVE && state != STATE_HUNG))
        return DS_FIRED;
    /* The pidfd first -- a dup of the one held since the arming, else opened now -- so that
     * the start time read next ties it to the registered process; one reaped before this has
     * no status to read but its exit event's, so its end is left to the exit event
     * (Reporter.report_death). */
    int fd = e->pidfd >= 0 ? fcntl(e->pidfd, F_DUPFD_CLOEXEC, 0)     /* the caller's to close */
                           : (int)syscall(SYS_pidfd_open, (pid_t)e->pid, 0);
    if (fd < 0)
        return DS_FIRED;
    if (group_dying_fast(e, tids, &ntids) != 1
            && (ntids = 0, group_exiting_c(e->pid, e->start, tids, &ntids) != 1)) {
        close(fd);
        return DS_FIRED;
    }
    *zeroed_out = mono_ns();
    pthread_mutex_lock(&lock->mu);
    int k = end_word(s + S_PID, e->pid, pending, npending, e->slot);
    pthread_mutex_unlock(&lock->mu);
    if (k == -2) {
        close(fd);
        return DS_FIRED;                    /* ended by another path meanwhile */
    }
    if (yield_ns && ntids) {
        yield_teardown(e->pid, e->start, tids, ntids, mono_ns() + yield_ns);
        /* Every other step computed its wake time before this yield, and may sleep with none
         * (a death moves no generation): wake them to look again, so that the restore comes
         * on time even if this shard's next waiter never steps (its shard emptied). */
        futex_wake_raw(table + H_GENERATION);
    }
    *fd_out = fd;
    *pend_out = k;
    return DS_DEAD;
}

static PyObject *py_death_step(PyObject *self, PyObject *args)
{
    /* death_step(table, pending, npending, service_lock, generation, entries, timeout, priority)
     *   entries: [(slot, pid, start_time)], at most 127, the death words to wait on;
     *   generation: the header's generation the caller built `entries` from; timeout: seconds
     *   or None; priority: SCHED_FIFO priority while waiting (0: the thread's own).
     * Returns one of
     *   ("dead", slot, pid, fired_ns, zeroed_ns, pidfd, pending_index)  ended and woken here
     *   ("fired", slot, pid, fired_ns)    fired, not decided here: deathword.confirm() decides
     *   ("moved",)                        the generation moved: rebuild `entries`
     *   ("timeout",) */
    unsigned long long table, pending;
    int npending, priority;
    unsigned int generation, yield_us = 0;
    PyObject *lock, *entries, *timeout, *stats_obj = Py_None;
    if (!PyArg_ParseTuple(args, "KKiO!IOOi|IO", &table, &pending, &npending, &ServiceLockType, &lock,
                          &generation, &entries, &timeout, &priority, &yield_us, &stats_obj))
        return NULL;
    if (stats_obj != Py_None && !PyObject_TypeCheck(stats_obj, &StatFdsType))
        return PyErr_Format(PyExc_TypeError, "stats must be a StatFds or None");
    StatFds *stats = stats_obj == Py_None ? NULL : (StatFds *)stats_obj;
    DeathEntry es[DEATH_ENTRIES];
    PyObject *seq = PySequence_Fast(entries, "entries must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > DEATH_ENTRIES) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %d death words a step", DEATH_ENTRIES);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        es[i].owner = 0;
        es[i].leader_fd = es[i].owner_fd = es[i].pidfd = -1;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IIK", &es[i].slot, &es[i].pid, &es[i].start)) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    uint64_t deadline_ns = 0;               /* 0: none */
    if (timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (PyErr_Occurred())
            return NULL;
        deadline_ns = mono_ns() + (uint64_t)(t * 1e9);
    }
    struct timespec until;
    uintptr_t gen = (uintptr_t)table + H_GENERATION;
    struct step_waitv w[DEATH_ENTRIES + 1];
    int idx[DEATH_ENTRIES + 1];
    int kind = DS_MOVED, err = 0, fd = -1, pend = -1, which = -1, turns = 0;
    uint64_t fired = 0, zeroed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (stats) {
        pthread_mutex_lock(&stats->mu);
        /* Look each entry's files up (opening what a new one needs) here, before going
         * real-time: an open is bookkeeping (~100 µs for a /proc file the kernel has not looked
         * up yet), and so is a search of the shard's files, not the wait's business.  Then close
         * the files of every entry not passed this time: it left the shard (or Python is
         * confirming it), and a later call need not come (a shard that empties ends its waiter;
         * DeathWatch closes that shard's files). */
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t owner = load32(slot_at((uintptr_t)table, es[i].slot) + S_DEATH_MUTEX) & FUTEX_TID_MASK;
            es[i].leader_fd = statfds_get(stats, es[i].pid, es[i].pid, es[i].start);
            es[i].pidfd = statfds_get(stats, es[i].pid, 0, es[i].start);
            /* Only the owner the word names: a word that fired already has no TID, and an owner
             * guessed from the files held would not be known to be the thread whose exit fired
             * it, which group_dying_fast()'s reasoning needs: that entry takes the full check. */
            if (owner && owner != es[i].pid) {
                es[i].owner = owner;
                es[i].owner_fd = statfds_get(stats, es[i].pid, owner, es[i].start);
            }
        }
        statfds_sweep(stats);
    }
    if (priority > 0)
        set_fifo(priority);                 /* refused: the caller probed; waits at its own */
    for (;; turns++) {
        /* Any group member can write a death word: one that keeps it moving (each turn finds
         * it changed, so futex_waitv never sleeps) must not get a real-time thread spinning.
         * Past RESTLESS_TURNS the step goes on at normal priority. */
        if (turns == RESTLESS_TURNS && priority > 0)
            set_fifo(0);
        if (load32(gen) != generation) {
            kind = DS_MOVED;
            break;
        }
        /* The wait ends at the caller's deadline or at the next yielded teardown's restore. */
        uint64_t restore_at = __atomic_load_n(&nyielded, __ATOMIC_RELAXED) ? restore_yielded(0) : 0;
        uint64_t wake_at = deadline_ns && (!restore_at || deadline_ns < restore_at) ? deadline_ns : restore_at;
        until.tv_sec = (time_t)(wake_at / 1000000000u);
        until.tv_nsec = (long)(wake_at % 1000000000u);
        int m = 1;
        memset(w, 0, sizeof w);
        w[0] = (struct step_waitv){.val = generation, .uaddr = gen, .flags = PW_STEP_FUTEX2_U32};
        for (Py_ssize_t i = 0; i < n && which < 0; i++) {
            uintptr_t s = slot_at((uintptr_t)table, es[i].slot);
            long long v = set_waiters_raw(s);
            if (v >= 0 && ((uint32_t)v & FUTEX_TID_MASK) != es[i].owner) {
                es[i].owner = (uint32_t)v & FUTEX_TID_MASK;     /* another owner since the
                                                                 * files were looked up: by path */
                es[i].owner_fd = -1;
            }
            if (v < 0) {
                if (load32(s + S_DEATH_ARM) == ARM_ARMED)
                    which = (int)i;         /* fired before we slept */
                continue;                   /* OWNER_DIED on an unarmed slot: not a death word */
            }
            idx[m] = (int)i;
            w[m++] = (struct step_waitv){.val = (uint32_t)v, .uaddr = s + S_DEATH_MUTEX,
                                         .flags = PW_STEP_FUTEX2_U32};
        }
        if (which < 0) {
            long rc = syscall(SYS_futex_waitv, w, (unsigned)m, 0u, wake_at ? &until : NULL,
                              (int)CLOCK_MONOTONIC);
            if (rc == 0) {
                kind = DS_MOVED;            /* the generation word (or stop()): look again */
                break;
            }
            if (rc > 0) {
                if (!death_fired_raw(slot_at((uintptr_t)table, es[idx[rc]].slot)))
                    continue;               /* moved, not fired (an unlock, a re-arm) */
                which = idx[rc];
            } else if (errno == ETIMEDOUT) {
                if (deadline_ns && mono_ns() >= deadline_ns) {
                    kind = DS_TIMEOUT;
                    break;
                }
                turns--;                    /* a restore's time: not a restless turn */
                continue;
            } else if (errno == EAGAIN || errno == EINTR) {
                continue;
            } else {
                err = errno;
                kind = DS_ERROR;
                break;
            }
        }
        fired = mono_ns();
        kind = end_death((uintptr_t)table, (uintptr_t)pending, npending, (ServiceLock *)lock,
                         &es[which], (uint64_t)yield_us * 1000u, &fd, &pend, &zeroed);
        break;
    }
    if (priority > 0)
        set_fifo(0);                        /* the bookkeeping runs at normal priority */
    if (stats) {
        if (__atomic_load_n(&stats->closing, __ATOMIC_ACQUIRE))
            statfds_close_all(stats);       /* closed while this step held them */
        pthread_mutex_unlock(&stats->mu);
    }
    Py_END_ALLOW_THREADS
    switch (kind) {
    case DS_DEAD: {
        PyObject *r = Py_BuildValue("sIIKKii", "dead", es[which].slot, es[which].pid,
                                    (unsigned long long)fired, (unsigned long long)zeroed, fd, pend);
        if (!r)
            close(fd);
        return r;
    }
    case DS_FIRED:
        return Py_BuildValue("sIIK", "fired", es[which].slot, es[which].pid, (unsigned long long)fired);
    case DS_TIMEOUT:
        return Py_BuildValue("(s)", "timeout");
    case DS_MOVED:
        return Py_BuildValue("(s)", "moved");
    default:
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
}

static PyMethodDef module_methods[] = {
    {"cas32", py_cas32, METH_VARARGS, "cas32(address, expected, new) -> bool: atomic compare-and-swap of a u32."},
    {"cas64", py_cas64, METH_VARARGS, "cas64(address, expected, new) -> bool: atomic compare-and-swap of a u64."},
    {"clear_pid", py_clear_pid, METH_VARARGS,
     "clear_pid(word, pid, pending, npending, slot) -> pending index (-1: list full), or None if not ours."},
    {"wake", py_wake, METH_VARARGS, "wake(address, count=INT_MAX) -> woken: FUTEX_WAKE on a shared word."},
    {"wait", py_wait, METH_VARARGS, "wait(address, expected, timeout=None) -> False on timeout."},
    {"find_name", py_find_name, METH_VARARGS, "find_name(table, count, raw) -> (same, first_empty, end)."},
    {"scan_end", py_scan_end, METH_VARARGS, "scan_end(table, count) -> how far a pass over the slots must go."},
    {"true_end", py_true_end, METH_VARARGS, "true_end(table, count) -> one past the last slot in use."},
    {"first_used", py_first_used, METH_VARARGS, "first_used(table, start, stop) -> first slot in use there, or -1."},
    {"stale_claims", py_stale_claims, METH_VARARGS, "stale_claims(table, count) -> [slot]."},
    {"bad_states", py_bad_states, METH_VARARGS, "bad_states(table, count, max_state, alive, hung) -> [slot]."},
    {"fingerprint", py_fingerprint, METH_VARARGS, "fingerprint(table, count, off32, off32, off64) -> int."},
    {"any_set", py_any_set, METH_VARARGS, "any_set(table, count, off32) -> bool."},
    {"pids_where", py_pids_where, METH_VARARGS,
     "pids_where(table, count, off32, value) -> [(slot, pid)] with a PID word and that u32 == value."},
    {"layout", py_layout, METH_NOARGS, "The table offsets this module was compiled with."},
    {"death_step", py_death_step, METH_VARARGS,
     "death_step(table, pending, npending, service_lock, generation, entries, timeout, priority, yield_us=0) -> "
     "('dead', slot, pid, fired_ns, zeroed_ns, pidfd, pending) | ('fired', slot, pid, fired_ns) | "
     "('moved',) | ('timeout',)"},
    {"restore_yielded", py_restore_yielded, METH_NOARGS,
     "restore_yielded() -> (yielded, restored, refused): end every teardown yield now; the counts."},
    {"realtime_probe", py_realtime_probe, METH_VARARGS,
     "realtime_probe(priority) -> 0 or the errno: whether a thread may wait at that SCHED_FIFO priority."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "procwatch._hotstep",
    "The detector's hot step and the peer's word reads, in C (see _hotstep.c).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__hotstep(void)
{
    if (PyType_Ready(&ServiceLockType) < 0 || PyType_Ready(&HotStepType) < 0 || PyType_Ready(&PeerWordType) < 0 || PyType_Ready(&ChangesType) < 0
            || PyType_Ready(&StatFdsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&HotStepType);
    Py_INCREF(&PeerWordType);
    Py_INCREF(&ChangesType);
    Py_INCREF(&ServiceLockType);
    Py_INCREF(&StatFdsType);
    if (PyModule_AddObject(m, "ServiceLock", (PyObject *)&ServiceLockType) < 0 ||
        PyModule_AddObject(m, "HotStep", (PyObject *)&HotStepType) < 0 ||
        PyModule_AddObject(m, "PeerWord", (PyObject *)&PeerWordType) < 0 ||
        PyModule_AddObject(m, "Changes", (PyObject *)&ChangesType) < 0 ||
        PyModule_AddObject(m, "StatFds", (PyObject *)&StatFdsType) < 0)
        return NULL;
    return m;
}
