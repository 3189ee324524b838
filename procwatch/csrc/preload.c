/*
 * procwatch/_preload.so - the LD_PRELOAD library of 'procwatch run'.
 *
 * 'procwatch run' registers its own PID and then execs the command, and
 * execve(2) releases every robust mutex of the old image (exec_mm_release()):
 * a sentinel thread started before the exec would fire the death word and be
 * gone.  So run leaves the slot PRELOAD, puts this library in LD_PRELOAD and
 * PROCWATCH_ARM=key:slot:pid:start_time in the environment, and this
 * constructor arms the slot from inside the new image (procwatch.h's own
 * sentinel).  Only in the registered process itself: the children it starts
 * inherit the environment and load this library too, but their PID differs,
 * and they return at once.  A static program never loads it; glibc ignores
 * it for setuid programs (secure execution): 'run' marks those slots
 * NOT_PRELOADABLE instead.
 *
 * Built by setup.py as an optional extension module (it is not one: it has
 * no PyInit function and uses nothing from Python).
 */
#define _GNU_SOURCE 1
#include "procwatch.h"

static void *procwatch_preload_sentinel;   /* held for the life of the process */

static int parse_u64(const char **p, uint64_t *out)
{
    uint64_t v = 0;
    const char *s = *p;
    if (*s < '0' || *s > '9')
        return -1;
    for (; *s >= '0' && *s <= '9'; s++)
        v = v * 10 + (uint64_t)(*s - '0');
    *out = v;
    *p = s;
    return 0;
}

__attribute__((constructor)) static void procwatch_preload_arm(void)
{
#ifdef PROCWATCH__DEATH_WORD
    const char *env = getenv("PROCWATCH_ARM"), *p = env;
    uint64_t key, index, pid, start, now_start;
    struct procwatch_header *h = NULL;
    struct procwatch_slot *s;
    int semid;
    uint32_t arm;

    if (env == NULL || parse_u64(&p, &key) || *p++ != ':' || parse_u64(&p, &index) || *p++ != ':'
        || parse_u64(&p, &pid) || *p++ != ':' || parse_u64(&p, &start) || *p != '\0')
        return;
    if (pid != (uint64_t)getpid())
        return;                                      /* a child of the registered process */
    if (key == 0 || key > 0x7FFFFFFF || procwatch__start_time(getpid(), &now_start) < 0
        || now_start != start)
        return;
    if (procwatch__attach((int)key, 0, &h, NULL) < 0)
        return;
    if (index >= h->slot_count)
        goto out;
    s = procwatch__slot(h, (unsigned)index);
    semid = semget((key_t)key, 1, 0);
    if (semid < 0 || procwatch__lock(semid) < 0)
        goto out;
    arm = __atomic_load_n(&s->death_arm, __ATOMIC_ACQUIRE);
    if (procwatch__load32(&s->pid) == (uint32_t)pid && s->start_time == start
        && (arm == PROCWATCH_ARM_PRELOAD || arm == PROCWATCH_ARM_LOST || arm == PROCWATCH_ARM_ARMED)) {
        /* ARMED or LOST: this same process exec'd again; the old sentinel is gone. */
        if (procwatch__arm(s, &procwatch_preload_sentinel) == PROCWATCH_ARM_ARMED)
            procwatch__bump_generation(h);           /* the service adds the word at once */
        procwatch__unlock(semid);
        if (procwatch_preload_sentinel != NULL)
            return;                                  /* keep the mapping: the sentinel's mutex is in it */
        goto out;
    }
    procwatch__unlock(semid);
out:
    procwatch__detach(h);
#endif
}
