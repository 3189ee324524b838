/*
 * procwatch.h - header-only C client of the procwatch slot table.
 *
 * procwatch tells processes, within a millisecond, that a watched peer died or
 * hung.  Processes register in a slot of a SysV shared-memory table; the
 * procwatch service learns of each registered process's exit from the kernel
 * (proc connector or pidfd) and zeroes that slot's PID word, so any peer that
 * reads the word, or sleeps on it as a futex, knows at once that the target
 * is gone.  This header speaks that table from C (and C++) with libc only:
 *
 *     #include "procwatch.h"            // cc -I"$(procwatch --include-dir)"
 *     struct procwatch_reg reg;
 *     int rc = procwatch_register(&reg, "dataplane", 0);
 *     if (rc < 0) fprintf(stderr, "procwatch: %s\n", strerror(-rc));  // go on without it
 *     ...  procwatch_beat(&reg);  ...   procwatch_unregister(&reg);
 *
 *     if (procwatch_wait_exit("dataplane", 0, -1) == 1) ...   // it is gone
 *
 * The layout below is the ABI documented byte by byte in docs/ABI.md and owned
 * by procwatch/abi.py; tests/test_abi.py compiles this header and checks every
 * offset against both.  Rules every writer keeps (abi.py):
 *   - the PID word is written with one aligned 4-byte atomic store, never
 *     piecewise (0 means "empty or gone": a torn write could say a live target
 *     is dead);
 *   - writers publish the PID word last and clear it first;
 *   - the PID word and the header's generation word are shared futexes:
 *     whoever changes them calls FUTEX_WAKE (no FUTEX_PRIVATE_FLAG: waker and
 *     waiter are different processes).
 *
 * Every function returns 0 (or the documented value) on success and a
 * negative errno on failure:
 *   -ENOENT   no table (or semaphore) at the key: the service is not running.
 *             A client should go on working without procwatch.
 *   -EACCES   the table exists but this user may not attach or lock it
 *             (add the user to the table's group, usually 'procwatch').
 *   -EPROTO   the segment at the key is not a procwatch table of this layout.
 *   -EINVAL   bad argument: name empty, longer than 31 bytes, not UTF-8, with a
 *             control character (TAB, LF, ESC ...) or whitespace at either end;
 *             key negative; PROCWATCH_KEY not a number in 1..0x7fffffff.
 *   -EEXIST   another live process is registered under this name.
 *   -ENOSPC   every slot holds a live registration.
 *   -ETIMEDOUT the table's semaphore stayed taken for PROCWATCH_LOCK_TIMEOUT_MS.
 *   -ESRCH    no slot carries this name (peer functions), or this
 *             registration no longer holds its slot (unregister, set_heartbeat).
 *   -ENOTUNIQ two live slots carry this name (peer functions): a group member
 *             wrote one by hand; procwatch will not guess which is real.
 *
 * Include order.  The header needs semtimedop(2) and syscall(2), which glibc
 * declares only under _GNU_SOURCE.  It defines _GNU_SOURCE itself, which works
 * when it is included before any system header (or when you compile with
 * -D_GNU_SOURCE).  Included later, it declares those two itself if the libc
 * hid them; only under a strict -std=cXX with a system header included first
 * is POSIX itself hidden, and then the header stops with an #error naming the
 * fix.
 *
 * The death word (layout version 2).  With glibc, procwatch_register() also
 * starts a sentinel thread that holds the slot's process-shared robust mutex
 * while the process is registered: when the process dies, the kernel marks
 * the mutex's word (FUTEX_OWNER_DIED) at the start of the exit, before the
 * address space is torn down, and the service learns of the death at once
 * instead of after the teardown (about 50 ms per GiB).  Link with -pthread:
 *     cc -pthread -I"$(procwatch --include-dir)" prog.c
 * Define PROCWATCH_NO_DEATH_WORD before including this header to leave the
 * slot connector-only (no thread).  A registered process that calls execve(2)
 * fires its death word: call procwatch_unregister() first.
 *
 * Threads: a struct procwatch_reg belongs to one thread at a time;
 * procwatch_beat() may be called from any thread that owns it.  Different
 * registrations and the peer functions are independent.
 *
 * Targets Linux (SysV IPC, futex(2), /proc).  Tested on x86_64 with glibc.
 */
#ifndef PROCWATCH_H
#define PROCWATCH_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1          /* semtimedop(2), syscall(2): effective only if we come first */
#endif

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <signal.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/syscall.h>

#if defined(__GLIBC__) && !defined(PROCWATCH_NO_DEATH_WORD)
#define PROCWATCH__DEATH_WORD 1
#include <pthread.h>
#include <signal.h>
#endif

#if defined(__GLIBC__) && !defined(__USE_POSIX199309)
#error "procwatch.h: an earlier #include under a strict -std=cXX hid POSIX; include procwatch.h first, or compile with -D_GNU_SOURCE or -std=gnuXX"
#endif
/* An earlier #include fixed glibc's features without _GNU_SOURCE: declare
 * what <sys/sem.h> and <unistd.h> then hide; the functions are in libc all
 * the same. */
#if defined(__GLIBC__) && !defined(__USE_GNU)
#if defined(__USE_TIME_BITS64)
#error "procwatch.h: with _TIME_BITS=64, include procwatch.h first or compile with -D_GNU_SOURCE"
#endif
extern int semtimedop(int, struct sembuf *, size_t, const struct timespec *);
#endif
#if defined(__GLIBC__) && !defined(__USE_MISC)
extern long int syscall(long int, ...);
#endif

#if !defined(SYS_futex) && defined(SYS_futex_time64)
#define SYS_futex SYS_futex_time64    /* 32-bit ABIs with only the time64 syscall */
#endif

/* Under a strict -std=c99, glibc's <sys/cdefs.h> defines _Static_assert as a
 * negative-width bit-field trick: a drifted offset still fails to compile,
 * at the PROCWATCH__AT line that names the field. */
#ifdef __cplusplus
#define PROCWATCH__STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define PROCWATCH__STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* ------------------------------------------------------------------------
 * Layout (procwatch/abi.py; docs/ABI.md).  Native-endian, naturally aligned.
 * ------------------------------------------------------------------------ */

#define PROCWATCH_MAGIC            "PWTABLE"   /* 8 bytes with its NUL */
#define PROCWATCH_VERSION          2u          /* 2: the death word */
#define PROCWATCH_HEADER_SIZE      192u
#define PROCWATCH_SLOT_SIZE        192u
#define PROCWATCH_NAME_SIZE        32u         /* <= 31 bytes of UTF-8, NUL padded */
#define PROCWATCH_NAME_MAX         31u
#define PROCWATCH_DEFAULT_KEY      0x70770001  /* 'pw' 0x0001 */
#define PROCWATCH_MAX_SLOTS        65536u
#define PROCWATCH_PENDING_ENDS     8u          /* entries of procwatch_header.pending_ends */
#define PROCWATCH_LATENCY_UNKNOWN  0xFFFFFFFFu
#define PROCWATCH_EXIT_STATUS_UNKNOWN (-1)
#define PROCWATCH_DEATH_MUTEX_SIZE 56u         /* >= sizeof(pthread_mutex_t) */
/* include/uapi/linux/futex.h: the robust-futex bits of a death word. */
#define PROCWATCH_FUTEX_WAITERS    0x80000000u
#define PROCWATCH_FUTEX_OWNER_DIED 0x40000000u
#define PROCWATCH_FUTEX_TID_MASK   0x3FFFFFFFu

#ifndef PROCWATCH_LOCK_TIMEOUT_MS
/* How long register/unregister wait for the table's semaphore; a holder that
 * is stuck longer is an error (-ETIMEDOUT), not a hang.  Same as Python's. */
#define PROCWATCH_LOCK_TIMEOUT_MS  5000
#endif

/* What a slot holds (abi.State). */
enum procwatch_state {
    PROCWATCH_STATE_EMPTY = 0,        /* never used, or freed */
    PROCWATCH_STATE_CLAIMING = 1,     /* a client holds the semaphore and fills it in */
    PROCWATCH_STATE_ALIVE = 2,        /* registered, PID word set */
    PROCWATCH_STATE_EXITED = 3,       /* the kernel reported the exit; status recorded */
    PROCWATCH_STATE_FOUND_DEAD = 4,   /* gone, noticed by reconcile (status unknown) */
    PROCWATCH_STATE_HUNG = 5,         /* heartbeat missed; PID word still set */
    PROCWATCH_STATE_UNREGISTERED = 6  /* the client left cleanly */
};

/* Why a slot ended (abi.Cause). */
enum procwatch_cause {
    PROCWATCH_CAUSE_NONE = 0,
    PROCWATCH_CAUSE_EXITED = 1,              /* exit event from the kernel */
    PROCWATCH_CAUSE_KILLED_HUNG = 2,         /* procwatch killed it after missed heartbeats */
    PROCWATCH_CAUSE_FOUND_DEAD = 3,          /* reconcile found it gone */
    PROCWATCH_CAUSE_FOUND_DEAD_OVERFLOW = 4, /* reconcile after a connector overflow */
    PROCWATCH_CAUSE_PID_REUSED = 5,          /* the PID lives on with another start time */
    PROCWATCH_CAUSE_UNREGISTERED = 6         /* procwatch_unregister() */
};

/* Whether a slot's death word is armed, and if not why (abi.Arm). */
enum procwatch_arm {
    PROCWATCH_ARM_NONE = 0,            /* not armed: older client, or no threads */
    PROCWATCH_ARM_ARMED = 1,           /* a sentinel thread holds the death mutex */
    PROCWATCH_ARM_DISARMED = 2,        /* unregistering: marked before the unlock */
    PROCWATCH_ARM_OTHER_PID = 3,       /* registered for another process */
    PROCWATCH_ARM_UNAVAILABLE = 4,     /* the client could not arm */
    PROCWATCH_ARM_PRELOAD = 5,         /* 'procwatch run': the preload library arms it */
    PROCWATCH_ARM_NOT_PRELOADABLE = 6, /* 'procwatch run' of a static or setuid program */
    PROCWATCH_ARM_LOST = 7             /* fired while the process lived on (execve) */
};

/* What zeroed a slot's PID word (abi.Detection). */
enum procwatch_detection {
    PROCWATCH_DETECTION_EXIT_EVENT = 0,  /* exit event or pidfd: after the teardown */
    PROCWATCH_DETECTION_DEATH_WORD = 1   /* the death word: before the teardown */
};

/* Whether the service waits on death words (abi.DeathWatch). */
enum procwatch_death_watch {
    PROCWATCH_DEATH_WATCH_OFF = 0,
    PROCWATCH_DEATH_WATCH_WATCHING = 1,
    PROCWATCH_DEATH_WATCH_NO_WAITV = 2,  /* Linux < 5.16 */
    PROCWATCH_DEATH_WATCH_NO_ATOMICS = 3
};

/* Exit-detection backend the service runs (abi.Backend). */
enum procwatch_backend {
    PROCWATCH_BACKEND_NONE = 0,
    PROCWATCH_BACKEND_CONNECTOR = 1,
    PROCWATCH_BACKEND_PIDFD = 2
};

/* What the service does to a hung process (slot field heartbeat_action). */
enum procwatch_hangaction {
    PROCWATCH_HANGACTION_DEFAULT = 0,   /* the service's --hang-action */
    PROCWATCH_HANGACTION_KILL = 1,      /* send heartbeat_signal (0: the service's --hang-signal) */
    PROCWATCH_HANGACTION_LOG = 2        /* log only */
};

/* Why a hung process did not beat, as the kernel told the service (abi.Verdict). */
enum procwatch_verdict {
    PROCWATCH_VERDICT_NONE = 0,       /* not hung (yet) */
    PROCWATCH_VERDICT_STOPPED = 1,    /* state T/t: SIGSTOP, a debugger */
    PROCWATCH_VERDICT_STARVED = 2,    /* runnable, but (almost) no CPU: contention, its cgroup's limit */
    PROCWATCH_VERDICT_STUCK = 3,      /* uninterruptible (D) through the missed checks */
    PROCWATCH_VERDICT_BUSY = 4,       /* on a CPU without beating: a livelock */
    PROCWATCH_VERDICT_BLOCKED = 5,    /* asleep with no CPU: a deadlock */
    PROCWATCH_VERDICT_UNKNOWN = 6     /* /proc would not say */
};

/* The table header, at offset 0 of the segment. */
struct procwatch_header {
    char     magic[8];             /*  0 "PWTABLE\0"                                   */
    uint32_t version;              /*  8 PROCWATCH_VERSION                              */
    uint32_t header_size;          /* 12 PROCWATCH_HEADER_SIZE                          */
    uint32_t slot_size;            /* 16 PROCWATCH_SLOT_SIZE                            */
    uint32_t slot_count;           /* 20 number of slots                                */
    uint32_t service_pid;          /* 24 PID of the serving procwatch, 0 when none      */
    uint32_t generation;           /* 28 bumped on every registration change (futex)    */
    uint64_t service_heartbeat;    /* 32 bumped by the service every check period       */
    uint64_t service_start_time;   /* 40 start time of service_pid (clock ticks)        */
    uint32_t heartbeat_period_ms;  /* 48 how often the service bumps its heartbeat      */
    uint32_t backend;              /* 52 enum procwatch_backend                         */
    uint64_t exits;                /* 56 exits reported since the segment was made      */
    uint64_t pending_ends[8];      /* 64 service only: ends zeroed but not logged yet   */
    uint32_t death_watch;          /* 128 enum procwatch_death_watch                    */
    uint32_t used_end;             /* 132 slots from here on are EMPTY (under the lock)  */
    uint8_t  reserved[56];         /* 136 zero                                          */
};

/* One slot, at PROCWATCH_HEADER_SIZE + i * PROCWATCH_SLOT_SIZE. */
struct procwatch_slot {
    uint32_t pid;                  /*   0 tgid; 0 = empty or gone.  Futex word.            */
    uint32_t state;                /*   4 enum procwatch_state                              */
    uint64_t start_time;           /*   8 /proc/PID/stat field 22 (clock ticks since boot)  */
    char     name[32];             /*  16 UTF-8, NUL padded                                 */
    uint64_t heartbeat_seq;        /*  48 bumped by the client: procwatch_beat()            */
    uint32_t heartbeat_ms;         /*  56 expected beat interval, ms; 0 = no hang detection */
    uint32_t misses;               /*  60 consecutive checks without progress (service)     */
    int32_t  exit_status;          /*  64 wait(2) status of the exit; -1 unknown            */
    uint32_t cause;                /*  68 enum procwatch_cause                              */
    uint64_t exit_time_ns;         /*  72 CLOCK_REALTIME ns of the end                      */
    uint64_t registered_ns;        /*  80 CLOCK_REALTIME ns of the registration             */
    uint32_t latency_us;           /*  88 kernel event -> slot zeroed, us; LATENCY_UNKNOWN  */
    uint32_t owner_uid;            /*  92 real uid of the registering process               */
    uint64_t last_beat_ns;         /*  96 CLOCK_REALTIME ns the service last saw progress   */
    uint32_t heartbeat_action;     /* 104 hang action for this slot (0 = service default)  */
    uint32_t heartbeat_signal;     /* 108 signal for the kill action (0 = service default) */
    uint32_t verdict;              /* 112 why the last hang happened (service; 0 none)      */
    uint32_t death_arm;            /* 116 enum procwatch_arm                                */
    uint32_t death_tid;            /* 120 TID of the sentinel thread holding death_mutex    */
    uint32_t detected_by;          /* 124 enum procwatch_detection                          */
    uint32_t teardown_us;          /* 128 death word -> pidfd readable, us; LATENCY_UNKNOWN */
    uint8_t  reserved[4];          /* 132 zero                                              */
    uint64_t death_mutex[7];       /* 136 pthread_mutex_t, robust, process-shared; its first
                                    *     u32 is the death word.  Only the service waits on it. */
};

#define PROCWATCH__AT(type, field, off) \
    PROCWATCH__STATIC_ASSERT(offsetof(struct type, field) == (off), \
                             #type "." #field " must be at offset " #off " (procwatch/abi.py)")
PROCWATCH__AT(procwatch_header, magic, 0);
PROCWATCH__AT(procwatch_header, version, 8);
PROCWATCH__AT(procwatch_header, header_size, 12);
PROCWATCH__AT(procwatch_header, slot_size, 16);
PROCWATCH__AT(procwatch_header, slot_count, 20);
PROCWATCH__AT(procwatch_header, service_pid, 24);
PROCWATCH__AT(procwatch_header, generation, 28);
PROCWATCH__AT(procwatch_header, service_heartbeat, 32);
PROCWATCH__AT(procwatch_header, service_start_time, 40);
PROCWATCH__AT(procwatch_header, heartbeat_period_ms, 48);
PROCWATCH__AT(procwatch_header, backend, 52);
PROCWATCH__AT(procwatch_header, exits, 56);
PROCWATCH__AT(procwatch_header, pending_ends, 64);
PROCWATCH__AT(procwatch_header, death_watch, 128);
PROCWATCH__AT(procwatch_header, used_end, 132);
PROCWATCH__AT(procwatch_header, reserved, 136);
PROCWATCH__STATIC_ASSERT(sizeof(struct procwatch_header) == PROCWATCH_HEADER_SIZE,
                         "procwatch_header must be 192 bytes");
PROCWATCH__AT(procwatch_slot, pid, 0);
PROCWATCH__AT(procwatch_slot, state, 4);
PROCWATCH__AT(procwatch_slot, start_time, 8);
PROCWATCH__AT(procwatch_slot, name, 16);
PROCWATCH__AT(procwatch_slot, heartbeat_seq, 48);
PROCWATCH__AT(procwatch_slot, heartbeat_ms, 56);
PROCWATCH__AT(procwatch_slot, misses, 60);
PROCWATCH__AT(procwatch_slot, exit_status, 64);
PROCWATCH__AT(procwatch_slot, cause, 68);
PROCWATCH__AT(procwatch_slot, exit_time_ns, 72);
PROCWATCH__AT(procwatch_slot, registered_ns, 80);
PROCWATCH__AT(procwatch_slot, latency_us, 88);
PROCWATCH__AT(procwatch_slot, owner_uid, 92);
PROCWATCH__AT(procwatch_slot, last_beat_ns, 96);
PROCWATCH__AT(procwatch_slot, heartbeat_action, 104);
PROCWATCH__AT(procwatch_slot, heartbeat_signal, 108);
PROCWATCH__AT(procwatch_slot, verdict, 112);
PROCWATCH__AT(procwatch_slot, death_arm, 116);
PROCWATCH__AT(procwatch_slot, death_tid, 120);
PROCWATCH__AT(procwatch_slot, detected_by, 124);
PROCWATCH__AT(procwatch_slot, teardown_us, 128);
PROCWATCH__AT(procwatch_slot, reserved, 132);
PROCWATCH__AT(procwatch_slot, death_mutex, 136);
PROCWATCH__STATIC_ASSERT(sizeof(struct procwatch_slot) == PROCWATCH_SLOT_SIZE,
                         "procwatch_slot must be 192 bytes");
#ifdef PROCWATCH__DEATH_WORD
PROCWATCH__STATIC_ASSERT(sizeof(pthread_mutex_t) <= PROCWATCH_DEATH_MUTEX_SIZE,
                         "pthread_mutex_t must fit the slot's death_mutex");
#endif
PROCWATCH__STATIC_ASSERT(sizeof(((struct procwatch_slot *)0)->name) == PROCWATCH_NAME_SIZE,
                         "slot name must be 32 bytes");
/* The PID word is a futex: a naturally aligned 32-bit word. */
PROCWATCH__STATIC_ASSERT(sizeof(pid_t) == 4, "pid_t must be 32 bits");

/* A registration, filled by procwatch_register().  Treat as opaque. */
struct procwatch_reg {
    struct procwatch_header *table;  /* shmat() address; NULL when not registered */
    struct procwatch_slot *slot;     /* our slot inside the table                 */
    int key;                         /* SysV key of the table and its semaphore   */
    int shmid;
    int semid;
    unsigned index;                  /* slot number                               */
    pid_t pid;                       /* the registered PID (getpid() at register) */
    void *sentinel;                  /* the death word's sentinel thread, or NULL */
};

/* ------------------------------------------------------------------------
 * Internals (procwatch__*): not API, may change.
 * ------------------------------------------------------------------------ */

/* futex(2) on a word of the shared mapping.  Never FUTEX_PRIVATE_FLAG:
 * include/uapi/linux/futex.h, FUTEX_WAIT = 0, FUTEX_WAKE = 1. */
#define PROCWATCH__FUTEX_WAIT 0
#define PROCWATCH__FUTEX_WAKE 1

static inline long procwatch__futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, word, op, val, ts, (uint32_t *)NULL, 0);
}

static inline void procwatch__wake(uint32_t *word)
{
    (void)procwatch__futex(word, PROCWATCH__FUTEX_WAKE, (uint32_t)INT_MAX, NULL);
}

static inline uint64_t procwatch__clock_ns(clockid_t clock)
{
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The table key: key > 0 as given; 0: $PROCWATCH_KEY (hex with 0x, or
 * decimal), else PROCWATCH_DEFAULT_KEY.  Range 1..0x7fffffff. */
static inline int procwatch__resolve_key(int key, int *out)
{
    const char *env, *p;
    unsigned long v = 0;
    unsigned base = 10;

    if (key < 0)
        return -EINVAL;
    if (key > 0) {
        *out = key;
        return 0;
    }
    env = getenv("PROCWATCH_KEY");
    if (env == NULL || *env == '\0') {
        *out = PROCWATCH_DEFAULT_KEY;
        return 0;
    }
    p = env;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    if (*p == '\0')
        return -EINVAL;
    for (; *p; p++) {
        unsigned d;
        if (*p >= '0' && *p <= '9')
            d = (unsigned)(*p - '0');
        else if (base == 16 && *p >= 'a' && *p <= 'f')
            d = (unsigned)(*p - 'a' + 10);
        else if (base == 16 && *p >= 'A' && *p <= 'F')
            d = (unsigned)(*p - 'A' + 10);
        else
            return -EINVAL;
        v = v * base + d;
        if (v > 0x7FFFFFFFul)
            return -EINVAL;
    }
    if (v == 0)
        return -EINVAL;
    *out = (int)v;
    return 0;
}

/* Whether code point cp is whitespace that may not begin or end a name:
 * what Python's str.isspace() says, outside the control characters
 * (procwatch/abi.py NAME_EDGE_SPACES). */
static inline int procwatch__edge_space(uint32_t cp)
{
    return cp == 0x20 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A)
           || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* The one name rule (procwatch/abi.py encode_name): s (len bytes) is
 * well-formed UTF-8 (no overlongs, no surrogates: what Python's
 * str.encode('utf-8') can produce), holds no control character (U+0000 to
 * U+001F, U+007F to U+009F: TAB, LF, ESC ...), and neither begins nor ends
 * with whitespace. */
static inline int procwatch__utf8_ok(const unsigned char *s, size_t len)
{
    size_t i = 0;
    uint32_t cp = 0;
    while (i < len) {
        unsigned c = s[i];
        size_t n, k;
        if (c < 0x80) {
            n = 0; cp = c;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1; cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2; cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3; cp = c & 0x07;
        } else {
            return 0;
        }
        if (len - i <= n)
            return 0;
        for (k = 1; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (uint32_t)(s[i + k] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF))
            || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F))
            return 0;
        if (i == 0 && procwatch__edge_space(cp))
            return 0;
        i += n + 1;
    }
    return !procwatch__edge_space(cp);
}

/* name -> NUL-padded 32-byte field; -EINVAL unless 1..31 bytes that keep the
 * name rule (procwatch__utf8_ok). */
static inline int procwatch__encode_name(const char *name, char padded[PROCWATCH_NAME_SIZE])
{
    size_t len;
    if (name == NULL)
        return -EINVAL;
    for (len = 0; len <= PROCWATCH_NAME_MAX && name[len]; len++)
        ;
    if (len == 0 || len > PROCWATCH_NAME_MAX
        || !procwatch__utf8_ok((const unsigned char *)name, len))
        return -EINVAL;
    memset(padded, 0, PROCWATCH_NAME_SIZE);
    memcpy(padded, name, len);
    return 0;
}

/* Field 22 of /proc/PID/stat (start time, clock ticks since boot); -ESRCH if
 * the process is gone.  The comm field may hold spaces and ')': parse after
 * the last ')'. */
static inline int procwatch__start_time(pid_t pid, uint64_t *out)
{
    char path[40], buf[1024], *p, *end;
    ssize_t n;
    size_t got = 0;
    int fd, field;
    uint64_t v = 0;
    unsigned up = (unsigned)pid;
    size_t i = sizeof path - 1;

    /* "/proc/%d/stat" without stdio */
    path[i] = '\0';
    memcpy(path + (i -= 5), "/stat", 5);
    do {
        path[--i] = (char)('0' + up % 10);
        up /= 10;
    } while (up);
    memcpy(path + (i -= 6), "/proc/", 6);

    fd = open(path + i, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    while (got < sizeof buf - 1) {
        n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    p = strrchr(buf, ')');
    if (p == NULL)
        return -ESRCH;
    /* p -> ")", then " state(3) ppid(4) ... starttime(22)" */
    for (field = 2; field < 22 && *p; p++)
        if (*p == ' ')
            field++;
    if (field != 22)
        return -ESRCH;
    for (end = p; *end >= '0' && *end <= '9'; end++)
        v = v * 10 + (uint64_t)(*end - '0');
    if (end == p)
        return -ESRCH;
    *out = v;
    return 0;
}

/* Whether pid is a live process whose start time is start_time. */
static inline int procwatch__pid_alive(uint32_t pid, uint64_t start_time)
{
    uint64_t st;
    if (pid == 0 || pid > 4194304u)          /* PID_MAX_LIMIT, include/linux/threads.h */
        return 0;
    return procwatch__start_time((pid_t)pid, &st) == 0 && st == start_time;
}

static inline void procwatch__detach(struct procwatch_header *h)
{
    if (h != NULL)
        (void)shmdt((const void *)h);
}

/* Attach the table at a resolved key and validate its header (step 1 of the
 * registration protocol). */
static inline int procwatch__attach(int key, int rdonly, struct procwatch_header **out, int *shmid_out)
{
    struct shmid_ds ds;
    struct procwatch_header *h;
    void *addr;
    int shmid;

    shmid = shmget((key_t)key, 0, 0);
    if (shmid < 0)
        return -errno;
    if (shmctl(shmid, IPC_STAT, &ds) != 0)
        return -errno;
    addr = shmat(shmid, NULL, rdonly ? SHM_RDONLY : 0);
    if (addr == (void *)-1)
        return -errno;
    h = (struct procwatch_header *)addr;
    if (ds.shm_segsz < PROCWATCH_HEADER_SIZE
        || memcmp(h->magic, PROCWATCH_MAGIC, sizeof h->magic) != 0
        || h->version != PROCWATCH_VERSION
        || h->header_size != PROCWATCH_HEADER_SIZE
        || h->slot_size != PROCWATCH_SLOT_SIZE
        || h->slot_count < 1 || h->slot_count > PROCWATCH_MAX_SLOTS
        || PROCWATCH_HEADER_SIZE + (size_t)h->slot_count * PROCWATCH_SLOT_SIZE > (size_t)ds.shm_segsz) {
        procwatch__detach(h);
        return -EPROTO;
    }
    *out = h;
    if (shmid_out)
        *shmid_out = shmid;
    return 0;
}

static inline struct procwatch_slot *procwatch__slot(struct procwatch_header *h, unsigned i)
{
    return (struct procwatch_slot *)((char *)h + PROCWATCH_HEADER_SIZE + (size_t)i * PROCWATCH_SLOT_SIZE);
}

static inline uint32_t procwatch__load32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void procwatch__store32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Semaphore op on the table's semaphore set (same key, one semaphore), with
 * SEM_UNDO so that the kernel gives the lock back if we die holding it. */
static inline int procwatch__semop(int semid, short op)
{
    struct sembuf sb;
    struct timespec ts;
    uint64_t deadline = procwatch__clock_ns(CLOCK_MONOTONIC)
                        + (uint64_t)PROCWATCH_LOCK_TIMEOUT_MS * 1000000u;

    sb.sem_num = 0;
    sb.sem_op = op;
    sb.sem_flg = (short)SEM_UNDO;
    for (;;) {
        uint64_t now = procwatch__clock_ns(CLOCK_MONOTONIC);
        uint64_t left = now < deadline ? deadline - now : 0;
        ts.tv_sec = (time_t)(left / 1000000000u);
        ts.tv_nsec = (long)(left % 1000000000u);
        if (semtimedop(semid, &sb, 1, &ts) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            return -ETIMEDOUT;
        if (errno == EIDRM || errno == EINVAL)
            return -ENOENT;              /* removed under us (ipcrm) */
        return -errno;
    }
}

static inline int procwatch__lock(int semid)
{
    return procwatch__semop(semid, -1);
}

static inline void procwatch__unlock(int semid)
{
    (void)procwatch__semop(semid, 1);
}

/* generation += 1 and wake whoever sleeps on it (the service's pidfd backend
 * waits there for new registrations).  Call with the lock held. */
static inline void procwatch__bump_generation(struct procwatch_header *h)
{
    __atomic_add_fetch(&h->generation, 1u, __ATOMIC_SEQ_CST);
    procwatch__wake(&h->generation);
}

/* procwatch__death_word_dead - the one rule every reader of a death word uses
 * (abi.death_word_dead): an ARMED slot whose word has FUTEX_OWNER_DIED is dead. */
static inline int procwatch__death_word_dead(const struct procwatch_slot *s)
{
    return __atomic_load_n(&s->death_arm, __ATOMIC_ACQUIRE) == PROCWATCH_ARM_ARMED
           && (__atomic_load_n((const uint32_t *)s->death_mutex, __ATOMIC_ACQUIRE)
               & PROCWATCH_FUTEX_OWNER_DIED) != 0;
}

#ifdef PROCWATCH__DEATH_WORD
/* The sentinel: a thread that holds the slot's robust mutex while the process
 * is registered.  pthread_mutex_lock() puts it on this thread's robust list
 * (glibc), so the kernel marks the word when the process dies -- not when
 * another thread ends.  Every signal is blocked here: they go to the program. */
struct procwatch__sentinel {
    pthread_t thread;
    pthread_mutex_t *mutex;
    uint32_t ready;                  /* 1 locked, 2 failed (futex)  */
    uint32_t release;                /* 1: unlock and end (futex)   */
    uint32_t tid;
};

static inline void *procwatch__sentinel_main(void *arg)
{
    struct procwatch__sentinel *t = (struct procwatch__sentinel *)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    if (pthread_mutex_lock(t->mutex) != 0) {
        __atomic_store_n(&t->ready, 2u, __ATOMIC_RELEASE);
        procwatch__wake(&t->ready);
        return NULL;
    }
    t->tid = (uint32_t)syscall(SYS_gettid);
    __atomic_store_n(&t->ready, 1u, __ATOMIC_RELEASE);
    procwatch__wake(&t->ready);
    while (__atomic_load_n(&t->release, __ATOMIC_ACQUIRE) == 0)
        (void)procwatch__futex(&t->release, PROCWATCH__FUTEX_WAIT, 0, NULL);
    pthread_mutex_unlock(t->mutex);
    return NULL;
}

/* Initialise slot s's death mutex and start a sentinel that locks it; on
 * success s->death_tid and then s->death_arm := ARMED are written and *out
 * holds the sentinel.  Returns the procwatch_arm state written. */
static inline uint32_t procwatch__arm(struct procwatch_slot *s, void **out)
{
    pthread_mutexattr_t attr;
    struct procwatch__sentinel *t;
    pthread_mutex_t *m = (pthread_mutex_t *)(void *)s->death_mutex;
    uint32_t r;
    int ok;

    *out = NULL;
    if (pthread_mutexattr_init(&attr) != 0)
        goto unavailable;
    ok = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) == 0
         && pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) == 0
         && pthread_mutex_init(m, &attr) == 0;
    pthread_mutexattr_destroy(&attr);
    if (!ok || (t = (struct procwatch__sentinel *)calloc(1, sizeof *t)) == NULL)
        goto unavailable;
    t->mutex = m;
    if (pthread_create(&t->thread, NULL, procwatch__sentinel_main, t) != 0) {
        free(t);
        goto unavailable;
    }
    while ((r = __atomic_load_n(&t->ready, __ATOMIC_ACQUIRE)) == 0)
        (void)procwatch__futex(&t->ready, PROCWATCH__FUTEX_WAIT, 0, NULL);
    if (r != 1) {
        pthread_join(t->thread, NULL);
        free(t);
        goto unavailable;
    }
    __atomic_store_n(&s->death_tid, t->tid, __ATOMIC_RELEASE);
    __atomic_store_n(&s->death_arm, (uint32_t)PROCWATCH_ARM_ARMED, __ATOMIC_RELEASE);
    *out = t;
    return PROCWATCH_ARM_ARMED;
unavailable:
    __atomic_store_n(&s->death_arm, (uint32_t)PROCWATCH_ARM_UNAVAILABLE, __ATOMIC_RELEASE);
    return PROCWATCH_ARM_UNAVAILABLE;
}

/* Unlock and end the sentinel (the slot was marked DISARMED first, or is no
 * longer ours). */
static inline void procwatch__disarm(void *sentinel)
{
    struct procwatch__sentinel *t = (struct procwatch__sentinel *)sentinel;
    if (t == NULL)
        return;
    __atomic_store_n(&t->release, 1u, __ATOMIC_RELEASE);
    procwatch__wake(&t->release);
    pthread_join(t->thread, NULL);
    free(t);
}
#else
static inline uint32_t procwatch__arm(struct procwatch_slot *s, void **out)
{
    *out = NULL;
    (void)s;
    return PROCWATCH_ARM_NONE;
}

static inline void procwatch__disarm(void *sentinel)
{
    (void)sentinel;
}
#endif

/* used_end := end if that is more (hold the lock: every writer does). */
static inline void procwatch__raise_used_end(struct procwatch_header *h, unsigned end)
{
    if (end > __atomic_load_n(&h->used_end, __ATOMIC_RELAXED))
        __atomic_store_n(&h->used_end, (uint32_t)end, __ATOMIC_RELAXED);
}

/* Whether slot s may be given to another name: a stale claim (CLAIMING seen
 * under the lock: its client died mid-registration and SEM_UNDO released the
 * lock), an ended slot, or a live-looking slot whose process is gone. */
static inline int procwatch__reusable(struct procwatch_slot *s, uint32_t state)
{
    if (state == PROCWATCH_STATE_CLAIMING)
        return 1;
    if (state == PROCWATCH_STATE_ALIVE || state == PROCWATCH_STATE_HUNG)
        return !procwatch__pid_alive(procwatch__load32(&s->pid), s->start_time);
    return 1;
}

/* Step 3 of the protocol: the slot for name (NUL-padded), under the lock.
 * Same name first: 1 (adopt) when it already holds this very process (pid
 * and start time: `procwatch run` registered it before exec), -EEXIST if
 * another live process holds it, else that slot; then the first EMPTY slot,
 * then the reusable slot that ended longest ago (stale live-looking slots
 * count as ended at time 0).  Same order as procwatch/client.py.  The name
 * pass stops at the first EMPTY slot at or after the header's used_end
 * (clamped to the table: any group member can write it), so it reads the
 * used slots, not the whole table, and moves used_end past the used slots it
 * found beyond it. */
static inline int procwatch__choose_slot(struct procwatch_header *h, const char padded[PROCWATCH_NAME_SIZE],
                                         pid_t pid, uint64_t start, unsigned *out)
{
    unsigned i, n = h->slot_count, first_empty = UINT_MAX, reuse = UINT_MAX;
    unsigned hint = __atomic_load_n(&h->used_end, __ATOMIC_RELAXED);
    uint64_t reuse_key = 0;

    if (hint > n)
        hint = n;
    for (i = 0; i < n; i++) {
        struct procwatch_slot *s = procwatch__slot(h, i);
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state == PROCWATCH_STATE_EMPTY) {
            if (first_empty == UINT_MAX)
                first_empty = i;
            if (i >= hint)
                break;
        } else if (memcmp(s->name, padded, PROCWATCH_NAME_SIZE) == 0) {
            *out = i;
            if ((state == PROCWATCH_STATE_ALIVE || state == PROCWATCH_STATE_HUNG)
                && procwatch__load32(&s->pid) == (uint32_t)pid && s->start_time == start)
                return 1;
            if (!procwatch__reusable(s, state))
                return -EEXIST;
            return 0;
        }
    }
    procwatch__raise_used_end(h, i);
    if (first_empty != UINT_MAX) {
        *out = first_empty;
        return 0;
    }
    for (i = 0; i < n; i++) {
        struct procwatch_slot *s = procwatch__slot(h, i);
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        uint64_t k;
        if (!procwatch__reusable(s, state))
            continue;
        k = (state == PROCWATCH_STATE_EXITED || state == PROCWATCH_STATE_FOUND_DEAD
             || state == PROCWATCH_STATE_UNREGISTERED) ? s->exit_time_ns : 0;
        if (reuse == UINT_MAX || k < reuse_key) {
            reuse = i;
            reuse_key = k;
        }
    }
    if (reuse == UINT_MAX)
        return -ENOSPC;
    *out = reuse;
    return 0;
}

/* The slot a peer follows: the live one carrying name, else the ended one
 * registered last; -ESRCH if none carries it, -ENOTUNIQ if two live slots
 * (a set PID word, alive or hung) carry it: no honest registration does that,
 * so one was forged by a group member, and guessing could follow it. */
static inline int procwatch__find_slot(struct procwatch_header *h, const char padded[PROCWATCH_NAME_SIZE],
                                       unsigned *out)
{
    unsigned i, n = h->slot_count, best = UINT_MAX, live = UINT_MAX;
    uint64_t best_time = 0;
    uint32_t live_pid = 0;

    for (i = 0; i < n; i++) {
        struct procwatch_slot *s = procwatch__slot(h, i);
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state == PROCWATCH_STATE_EMPTY || memcmp(s->name, padded, PROCWATCH_NAME_SIZE) != 0)
            continue;
        if (state == PROCWATCH_STATE_CLAIMING || state == PROCWATCH_STATE_ALIVE
            || state == PROCWATCH_STATE_HUNG) {
            uint32_t pid = procwatch__load32(&s->pid);
            if (live != UINT_MAX && pid != 0 && live_pid != 0)
                return -ENOTUNIQ;
            if (live == UINT_MAX || (pid != 0 && live_pid == 0)) {
                live = i;
                live_pid = pid;
            }
            continue;
        }
        if (best == UINT_MAX || s->registered_ns > best_time) {
            best = i;
            best_time = s->registered_ns;
        }
    }
    if (live != UINT_MAX)
        best = live;
    if (best == UINT_MAX)
        return -ESRCH;
    *out = best;
    return 0;
}

/* ------------------------------------------------------------------------
 * API
 * ------------------------------------------------------------------------ */

/*
 * procwatch_register - register the calling process under name.
 * @reg:  filled in; always initialised, so procwatch_unregister(reg) is safe
 *        after a failed call.
 * @name: 1..31 bytes of UTF-8 (NUL-terminated), no control character, no
 *        whitespace at either end (the rule of procwatch/abi.py encode_name).
 * @key:  SysV key of the table; 0 means $PROCWATCH_KEY (0x-prefixed hex or
 *        decimal), else PROCWATCH_DEFAULT_KEY (0x70770001).
 *
 * Takes the table's semaphore (SEM_UNDO), picks a slot (a name whose process
 * is gone reuses its slot), fills it in and publishes getpid() in its PID
 * word last, then bumps the header's generation and wakes the service.
 * A name already registered for this very process (same PID and start time,
 * e.g. by `procwatch run --name NAME --heartbeat S -- CMD` before its exec)
 * is adopted: the slot and its heartbeat settings stay as they are, and
 * reg can beat it.
 * The registration follows the process across exec(2) (same PID, same start
 * time); a fork(2)ed child is not registered.  With glibc (and -pthread) it
 * also starts the death word's sentinel thread (see the top of this file).
 *
 * Returns 0, or -ENOENT (no service: go on without it), -EACCES, -EPROTO,
 * -EINVAL, -EEXIST (name held by another live process), -ENOSPC, -ETIMEDOUT, or
 * -EIO when /proc/self/stat cannot be read (no /proc mounted).
 */
static inline int procwatch_register(struct procwatch_reg *reg, const char *name, int key)
{
    char padded[PROCWATCH_NAME_SIZE];
    struct procwatch_header *h = NULL;
    struct procwatch_slot *s;
    uint64_t start, now;
    pid_t pid = getpid();
    unsigned i = 0;
    int rc, shmid = -1, semid;

    memset(reg, 0, sizeof *reg);
    reg->shmid = reg->semid = -1;
    if ((rc = procwatch__encode_name(name, padded)) < 0)
        return rc;
    if ((rc = procwatch__resolve_key(key, &key)) < 0)
        return rc;
    if ((rc = procwatch__start_time(pid, &start)) < 0)
        return rc == -ESRCH ? -EIO : rc;      /* our own /proc entry: /proc not mounted */
    if ((rc = procwatch__attach(key, 0, &h, &shmid)) < 0)
        return rc;
    semid = semget((key_t)key, 1, 0);
    if (semid < 0) {
        rc = -errno;
        procwatch__detach(h);
        return rc;
    }
    if ((rc = procwatch__lock(semid)) < 0) {
        procwatch__detach(h);
        return rc;
    }
    rc = procwatch__choose_slot(h, padded, pid, start, &i);
    if (rc == 1) {
        rc = 0;                                                  /* adopted: untouched */
    } else if (rc == 0) {
        s = procwatch__slot(h, i);
        now = procwatch__clock_ns(CLOCK_REALTIME);
        procwatch__raise_used_end(h, i + 1);                     /* no pass stops before it */
        procwatch__store32(&s->pid, 0);                          /* cleared first */
        __atomic_store_n(&s->state, (uint32_t)PROCWATCH_STATE_CLAIMING, __ATOMIC_SEQ_CST);
        /* everything after pid and state := 0 (heartbeat_seq, heartbeat_ms,
         * misses, cause, exit_time_ns, heartbeat_action/signal, reserved) */
        memset((char *)s + offsetof(struct procwatch_slot, start_time), 0,
               PROCWATCH_SLOT_SIZE - offsetof(struct procwatch_slot, start_time));
        s->start_time = start;
        memcpy(s->name, padded, PROCWATCH_NAME_SIZE);
        s->exit_status = PROCWATCH_EXIT_STATUS_UNKNOWN;
        s->registered_ns = now;
        s->latency_us = PROCWATCH_LATENCY_UNKNOWN;
        s->teardown_us = PROCWATCH_LATENCY_UNKNOWN;
        s->owner_uid = (uint32_t)getuid();
        s->last_beat_ns = now;
        (void)procwatch__arm(s, &reg->sentinel);                 /* armed before it is published */
        __atomic_store_n(&s->state, (uint32_t)PROCWATCH_STATE_ALIVE, __ATOMIC_RELEASE);
        procwatch__store32(&s->pid, (uint32_t)pid);              /* published last */
        procwatch__bump_generation(h);
    }
    procwatch__unlock(semid);
    if (rc < 0) {
        procwatch__detach(h);
        return rc;
    }
    reg->table = h;
    reg->slot = procwatch__slot(h, i);
    reg->key = key;
    reg->shmid = shmid;
    reg->semid = semid;
    reg->index = i;
    reg->pid = pid;
    return 0;
}

/*
 * procwatch_beat - count progress for hang detection.
 *
 * One aligned 8-byte atomic store to the slot's heartbeat_seq: no syscall, no
 * lock.  The service declares the process hung when heartbeat_ms is set and
 * the sequence stops moving.  Does nothing when reg is not registered or its
 * slot no longer holds this PID.
 */
static inline void procwatch_beat(struct procwatch_reg *reg)
{
    struct procwatch_slot *s = reg->slot;
    if (s == NULL || procwatch__load32(&s->pid) != (uint32_t)reg->pid)
        return;
    __atomic_store_n(&s->heartbeat_seq, __atomic_load_n(&s->heartbeat_seq, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELEASE);
}

/*
 * procwatch_set_heartbeat - expect a procwatch_beat() at least every ms
 * milliseconds (0 turns hang detection off for this process).
 *
 * Writes heartbeat_ms and restarts the service's clock (last_beat_ns := now),
 * so the new interval is counted from this call.  The service decides what a
 * hang costs (see the service's configuration).
 *
 * Returns 0, -EINVAL when reg is not registered, -ESRCH when its slot no
 * longer holds this PID.
 */
static inline int procwatch_set_heartbeat(struct procwatch_reg *reg, unsigned ms)
{
    struct procwatch_slot *s = reg->slot;
    if (s == NULL)
        return -EINVAL;
    if (procwatch__load32(&s->pid) != (uint32_t)reg->pid)
        return -ESRCH;
    __atomic_store_n(&s->heartbeat_ms, (uint32_t)ms, __ATOMIC_RELEASE);
    __atomic_store_n(&s->last_beat_ns, procwatch__clock_ns(CLOCK_REALTIME), __ATOMIC_RELEASE);
    /* The service's hang checker sleeps on the generation while no slot asks for beats. */
    procwatch__bump_generation(reg->table);
    return 0;
}

/*
 * procwatch_hang_signal_ok - whether sig may be a hang signal: a signal whose
 * default action ends the process.  signal(7) gives SIGCHLD, SIGURG and
 * SIGWINCH the action Ign, SIGSTOP, SIGTSTP, SIGTTIN and SIGTTOU Stop, and
 * SIGCONT Cont: sent to a hung process, each leaves it hung.  The Python
 * client, the service and its configuration refuse the same ones
 * (procwatch/signals.py; tests/test_cheader.py compares the two lists).
 */
static inline int procwatch_hang_signal_ok(int sig)
{
    if (sig < 1 || sig > SIGRTMAX || (sig > 31 && sig < SIGRTMIN))   /* glibc keeps 32, 33 */
        return 0;
    switch (sig) {
    case SIGCHLD: case SIGCONT: case SIGSTOP: case SIGTSTP: case SIGTTIN: case SIGTTOU:
#ifdef SIGURG
    case SIGURG:
#endif
#ifdef SIGWINCH
    case SIGWINCH:
#endif
        return 0;
    default:
        return 1;
    }
}

/*
 * procwatch_set_hang_action - what the service does when this process hangs.
 * @action: PROCWATCH_HANGACTION_DEFAULT (the service's), _KILL or _LOG.
 * @sig:    the signal for _KILL, e.g. SIGABRT for a core dump; 0 for the
 *          service's --hang-signal.  It must end the process by its default
 *          action (procwatch_hang_signal_ok()).
 *
 * Returns 0, -EINVAL for an unknown action, a signal that would not end the
 * process, or reg not registered; -ESRCH when its slot no longer holds this PID.
 */
static inline int procwatch_set_hang_action(struct procwatch_reg *reg, int action, int sig)
{
    struct procwatch_slot *s = reg->slot;
    if (action < PROCWATCH_HANGACTION_DEFAULT || action > PROCWATCH_HANGACTION_LOG
        || (sig != 0 && !procwatch_hang_signal_ok(sig)) || s == NULL)
        return -EINVAL;
    if (procwatch__load32(&s->pid) != (uint32_t)reg->pid)
        return -ESRCH;
    __atomic_store_n(&s->heartbeat_action, (uint32_t)action, __ATOMIC_RELEASE);
    __atomic_store_n(&s->heartbeat_signal, (uint32_t)sig, __ATOMIC_RELEASE);
    return 0;
}

/*
 * procwatch_unregister - leave the table cleanly.
 *
 * Under the table's semaphore, if the slot still holds this PID: PID word := 0
 * and FUTEX_WAKE (peers see the process gone), state := UNREGISTERED,
 * cause := UNREGISTERED, exit_time_ns := now, generation += 1 and wake.  Then
 * detaches the segment.  Idempotent: 0 when reg is not registered.
 *
 * Returns 0; -ESRCH when the slot no longer held this PID (the registration
 * was already ended by someone else; reg is released anyway); -ETIMEDOUT or
 * another lock error, in which case reg stays registered and may be retried.
 */
static inline int procwatch_unregister(struct procwatch_reg *reg)
{
    struct procwatch_slot *s = reg->slot;
    int rc;

    if (reg->table == NULL || s == NULL)
        return 0;
    if (reg->pid != getpid()) {            /* a fork(2)ed child: the slot is its parent's */
        procwatch__detach(reg->table);
        reg->table = NULL;
        reg->slot = NULL;
        reg->sentinel = NULL;
        return 0;
    }
    rc = procwatch__lock(reg->semid);
    if (rc == -ENOENT)
        goto out;                          /* the table went away: nothing to clean */
    if (rc < 0)
        return rc;
    if (procwatch__load32(&s->pid) == (uint32_t)reg->pid) {
        if (__atomic_load_n(&s->death_arm, __ATOMIC_ACQUIRE) == PROCWATCH_ARM_ARMED)
            __atomic_store_n(&s->death_arm, (uint32_t)PROCWATCH_ARM_DISARMED, __ATOMIC_SEQ_CST);
        procwatch__store32(&s->pid, 0);    /* cleared first (after the mark: no death) */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        procwatch__wake(&s->pid);
        s->cause = PROCWATCH_CAUSE_UNREGISTERED;
        s->exit_time_ns = procwatch__clock_ns(CLOCK_REALTIME);
        __atomic_store_n(&s->state, (uint32_t)PROCWATCH_STATE_UNREGISTERED, __ATOMIC_RELEASE);
        procwatch__bump_generation(reg->table);
    } else {
        rc = -ESRCH;
    }
    procwatch__unlock(reg->semid);
out:
    procwatch__disarm(reg->sentinel);      /* after the mark: the unlock is not a death */
    reg->sentinel = NULL;
    procwatch__detach(reg->table);
    reg->table = NULL;
    reg->slot = NULL;
    return rc == -ENOENT ? 0 : rc;
}

/* A peer handle: the name-based functions below open one for each call;
 * open your own to read the PID word with no syscall per read. */
struct procwatch_peer {
    struct procwatch_header *table;  /* attached read-only; NULL when closed */
    struct procwatch_slot *slot;     /* the slot carrying the name           */
    char name[PROCWATCH_NAME_SIZE];  /* NUL padded                           */
    int key;
};

/*
 * procwatch_peer_open - attach the table read-only and find name's slot: the
 * live one, else the one that ended most recently.
 *
 * Returns 0, -ESRCH when no slot carries the name, -ENOTUNIQ when two live
 * slots carry it, or an attach error (-ENOENT, -EACCES, -EPROTO, -EINVAL).
 * Close with procwatch_peer_close().
 */
static inline int procwatch_peer_open(struct procwatch_peer *peer, const char *name, int key)
{
    unsigned i;
    int rc;

    memset(peer, 0, sizeof *peer);
    if ((rc = procwatch__encode_name(name, peer->name)) < 0)
        return rc;
    if ((rc = procwatch__resolve_key(key, &peer->key)) < 0)
        return rc;
    if ((rc = procwatch__attach(peer->key, 1, &peer->table, NULL)) < 0) {
        peer->table = NULL;
        return rc;
    }
    if ((rc = procwatch__find_slot(peer->table, peer->name, &i)) < 0) {
        procwatch__detach(peer->table);
        peer->table = NULL;
        return rc;
    }
    peer->slot = procwatch__slot(peer->table, i);
    return 0;
}

/*
 * procwatch_peer_word - the peer's PID word itself, for readers that poll it
 * in a hot loop (load it with __atomic_load_n(w, __ATOMIC_ACQUIRE); non-zero
 * means alive) or sleep on it with their own FUTEX_WAIT.  NULL when closed.
 */
static inline const uint32_t *procwatch_peer_word(const struct procwatch_peer *peer)
{
    return peer->slot ? &peer->slot->pid : NULL;
}

/*
 * procwatch_peer_current - the PID registered under the peer's name now: one
 * atomic load and a 32-byte compare, no syscall.  0 when the peer is gone (or
 * the handle is closed), also the moment the kernel marks its armed death
 * word, before the service zeroes the PID word.  A process that registers the same name later is
 * followed; a slot given to another name (which happens only after the
 * peer's end) reads as 0.
 */
static inline pid_t procwatch_peer_current(const struct procwatch_peer *peer)
{
    uint32_t pid;
    if (peer->slot == NULL)
        return 0;
    pid = procwatch__load32(&peer->slot->pid);
    if (pid != 0 && memcmp(peer->slot->name, peer->name, PROCWATCH_NAME_SIZE) != 0)
        return 0;
    if (pid != 0 && procwatch__death_word_dead(peer->slot))
        return 0;                          /* the kernel marked its death word: no hop */
    return (pid_t)pid;
}

/*
 * procwatch_peer_wait - sleep until the PID the peer held when this call
 * began is gone: the PID word turns 0, or holds another PID or another name
 * (the slot was reused after its end).  Sleeps in FUTEX_WAIT on the word (shared futex),
 * woken by whoever zeroes it; no polling.
 * @timeout_ms: < 0 waits for ever; 0 only checks.
 *
 * Returns 1 when gone, 0 on timeout, -EINVAL when the handle is closed.
 */
static inline int procwatch_peer_wait(struct procwatch_peer *peer, int timeout_ms)
{
    uint32_t *word, first, v;
    uint64_t deadline = 0;
    struct timespec ts;

    if (peer->slot == NULL)
        return -EINVAL;
    word = &peer->slot->pid;
    if (timeout_ms >= 0)
        deadline = procwatch__clock_ns(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000000u;
    /* The PID word itself, not the death word: the wait ends once the service
     * zeroed it, so a supervisor that re-registers at once never takes the
     * slot before the old end is recorded. */
    first = procwatch__load32(word);
    if (memcmp(peer->slot->name, peer->name, PROCWATCH_NAME_SIZE) != 0)
        first = 0;
    for (;;) {
        v = procwatch__load32(word);
        if (v == 0 || v != first || memcmp(peer->slot->name, peer->name, PROCWATCH_NAME_SIZE) != 0)
            return 1;
        if (timeout_ms >= 0) {
            uint64_t now = procwatch__clock_ns(CLOCK_MONOTONIC);
            if (now >= deadline)
                return 0;
            ts.tv_sec = (time_t)((deadline - now) / 1000000000u);
            ts.tv_nsec = (long)((deadline - now) % 1000000000u);
        }
        /* Returns at once (EAGAIN) if the word no longer holds v; EINTR and
         * ETIMEDOUT loop back to the checks above. */
        (void)procwatch__futex(word, PROCWATCH__FUTEX_WAIT, v, timeout_ms >= 0 ? &ts : NULL);
    }
}

/*
 * procwatch_peer_close - detach the table.  Idempotent.
 */
static inline void procwatch_peer_close(struct procwatch_peer *peer)
{
    procwatch__detach(peer->table);
    peer->table = NULL;
    peer->slot = NULL;
}

/*
 * procwatch_peer_pid - the PID registered under name, or 0 when that process
 * is gone (its slot's PID word is 0).  Attaches and detaches the table on
 * each call; keep a struct procwatch_peer for repeated reads.
 * @key: as for procwatch_register().
 *
 * Returns the PID, 0 when gone, -ESRCH when no slot carries the name, or an
 * attach error (-ENOENT: no service; -EACCES; -EPROTO; -EINVAL).
 */
static inline pid_t procwatch_peer_pid(const char *name, int key)
{
    struct procwatch_peer peer;
    pid_t pid;
    int rc = procwatch_peer_open(&peer, name, key);
    if (rc < 0)
        return (pid_t)rc;
    pid = procwatch_peer_current(&peer);
    procwatch_peer_close(&peer);
    return pid;
}

/*
 * procwatch_wait_exit - block until the process registered under name is
 * gone, or timeout_ms passes (< 0: no timeout).  Sleeps on the slot's PID
 * word as a shared futex; the service (or procwatch_unregister) wakes it.
 * "Gone" means the PID seen at the start of the call left the slot, so a
 * successor registering the same name does not extend the wait.
 *
 * Returns 1 when gone (at once if already gone), 0 on timeout, -ESRCH when no
 * slot carries the name, or an attach error (-ENOENT, -EACCES, -EPROTO,
 * -EINVAL).
 */
static inline int procwatch_wait_exit(const char *name, int key, int timeout_ms)
{
    struct procwatch_peer peer;
    int rc = procwatch_peer_open(&peer, name, key);
    if (rc < 0)
        return rc;
    rc = procwatch_peer_wait(&peer, timeout_ms);
    procwatch_peer_close(&peer);
    return rc;
}

#endif /* PROCWATCH_H */
