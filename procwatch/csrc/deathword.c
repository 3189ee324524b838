/*
 * procwatch._deathword - the atomics and futex_waitv(2) the death-word waiter needs.
 *
 * Python has no atomic read-modify-write on shared memory, and the waiter must
 * set FUTEX_WAITERS in a death word without losing a FUTEX_OWNER_DIED the
 * kernel may write at the same moment (kernel/futex/core.c, handle_futex_death()
 * uses a cmpxchg too).  procwatch/deathword.py falls back to libatomic through
 * ctypes when this module could not be built (it is optional=True in setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449          /* asm-generic and x86_64: Linux >= 5.16 */
#endif
#define PW_FUTEX2_SIZE_U32 0x02      /* include/uapi/linux/futex.h; shared: no FUTEX2_PRIVATE */
#define PW_WAITV_MAX 128             /* FUTEX_WAITV_MAX */

struct pw_futex_waitv { uint64_t val, uaddr; uint32_t flags, reserved; };

static uint32_t *word_at(PyObject *addr)
{
    uintptr_t a = (uintptr_t)PyLong_AsUnsignedLongLong(addr);
    if (PyErr_Occurred())
        return NULL;
    if (a == 0 || a % 4) {
        PyErr_SetString(PyExc_ValueError, "address must be a non-zero multiple of 4");
        return NULL;
    }
    return (uint32_t *)a;
}

/* cas32(address, expected, new) -> the value found (== expected: swapped) */
static PyObject *pw_cas32(PyObject *self, PyObject *args)
{
    PyObject *addr;
    unsigned int expected, desired;
    uint32_t *w, old;
    (void)self;
    if (!PyArg_ParseTuple(args, "OII", &addr, &expected, &desired))
        return NULL;
    if ((w = word_at(addr)) == NULL)
        return NULL;
    old = expected;
    __atomic_compare_exchange_n(w, &old, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLong(old);
}

/* load32(address) -> one atomic (acquire) load */
static PyObject *pw_load32(PyObject *self, PyObject *addr)
{
    uint32_t *w = word_at(addr);
    (void)self;
    if (w == NULL)
        return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(w, __ATOMIC_ACQUIRE));
}

/* waitv(addresses, values, timeout) -> index woken, -1 a word differed (EAGAIN),
 * -2 timed out, -3 interrupted.  timeout: seconds (float) or None. */
static PyObject *pw_waitv(PyObject *self, PyObject *args)
{
    PyObject *addrs, *vals, *timeout;
    struct pw_futex_waitv w[PW_WAITV_MAX];
    struct timespec ts, *tsp = NULL;
    Py_ssize_t n, i;
    long rc;
    int err;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO", &addrs, &vals, &timeout))
        return NULL;
    n = PySequence_Size(addrs);
    if (n < 1 || n > PW_WAITV_MAX || PySequence_Size(vals) != n) {
        PyErr_SetString(PyExc_ValueError, "waitv takes 1..128 addresses and as many values");
        return NULL;
    }
    memset(w, 0, sizeof w);
    for (i = 0; i < n; i++) {
        PyObject *a = PySequence_GetItem(addrs, i), *v = PySequence_GetItem(vals, i);
        uint32_t *p = a ? word_at(a) : NULL;
        unsigned long val = v ? PyLong_AsUnsignedLong(v) : 0;
        Py_XDECREF(a);
        Py_XDECREF(v);
        if (p == NULL || PyErr_Occurred())
            return NULL;
        w[i].uaddr = (uint64_t)(uintptr_t)p;
        w[i].val = (uint32_t)val;
        w[i].flags = PW_FUTEX2_SIZE_U32;
    }
    if (timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (PyErr_Occurred())
            return NULL;
        clock_gettime(CLOCK_MONOTONIC, &ts);          /* futex_waitv's timeout is absolute */
        ts.tv_sec += (time_t)t;
        ts.tv_nsec += (long)((t - (double)(time_t)t) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        tsp = &ts;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_futex_waitv, w, (unsigned)n, 0u, tsp, (int)CLOCK_MONOTONIC);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc >= 0)
        return PyLong_FromLong(rc);
    if (err == EAGAIN)
        return PyLong_FromLong(-1);
    if (err == ETIMEDOUT)
        return PyLong_FromLong(-2);
    if (err == EINTR)
        return PyLong_FromLong(-3);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyMethodDef methods[] = {
    {"cas32", pw_cas32, METH_VARARGS, "cas32(address, expected, new) -> value found"},
    {"load32", pw_load32, METH_O, "load32(address) -> value (acquire)"},
    {"waitv", pw_waitv, METH_VARARGS,
     "waitv(addresses, values, timeout) -> index, -1 EAGAIN, -2 timeout, -3 EINTR"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "procwatch._deathword",
                                    "Atomics and futex_waitv(2) for the death word.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__deathword(void)
{
    return PyModule_Create(&module);
}
