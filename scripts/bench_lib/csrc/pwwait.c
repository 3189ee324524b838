/* pwwait.c: a procwatch peer in C, the fairest "a peer sees the PID word
 * turn 0": it sleeps in FUTEX_WAIT on the slot's PID word and is woken by
 * the service's FUTEX_WAKE right after the word is zeroed.
 *
 *   pwwait KEY        (the SysV key of the slot table, e.g. 0x7b000001)
 *
 * stdin, one command a line:  watch <pid> <offset>
 *   offset: byte offset of the slot's PID word in the segment (the harness
 *   takes it from procwatch/abi.py, so this file knows no layout).
 * stdout, flushed:
 *   ok <pid>            the word holds <pid>; about to sleep on it
 *   gone <pid>          the word does not hold <pid> (not registered, or over)
 *   exit <pid> <t1_ns>  the word left <pid>; t1 is CLOCK_MONOTONIC
 *   stats seen=N        on EOF
 * One watch at a time: it does not read stdin while it sleeps, which is
 * all a kill-at-a-time harness needs.  The futex is shared (no
 * FUTEX_PRIVATE_FLAG): waker and waiter are different processes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: pwwait KEY\n"); return 2; }
    key_t key = (key_t)strtol(argv[1], NULL, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    alarm(600); /* bound: no waiter outlives a bench run */
    int id = shmget(key, 0, 0);
    if (id < 0) { perror("pwwait: shmget"); return 1; }
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) < 0) { perror("pwwait: shmctl"); return 1; }
    unsigned char *base = shmat(id, NULL, 0);
    if (base == (void *)-1) { perror("pwwait: shmat"); return 1; }
    printf("ready size=%zu\n", (size_t)ds.shm_segsz);
    fflush(stdout);

    char line[256];
    unsigned long seen = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned pid;
        unsigned long off;
        if (sscanf(line, "watch %u %lu", &pid, &off) != 2)
            continue;
        if (off % 4 || off + 4 > (size_t)ds.shm_segsz) { printf("gone %u\n", pid); fflush(stdout); continue; }
        uint32_t *word = (uint32_t *)(base + off);
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != pid) { printf("gone %u\n", pid); fflush(stdout); continue; }
        printf("ok %u\n", pid);
        fflush(stdout);
        while (__atomic_load_n(word, __ATOMIC_ACQUIRE) == pid)
            if (syscall(SYS_futex, word, FUTEX_WAIT, pid, NULL, NULL, 0) < 0 && errno != EAGAIN && errno != EINTR) {
                perror("pwwait: futex");
                return 1;
            }
        long long t1 = now_ns();
        seen++;
        printf("exit %u %lld\n", pid, t1);
        fflush(stdout);
    }
    printf("stats seen=%lu\n", seen);
    fflush(stdout);
    return 0;
}
