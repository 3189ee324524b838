/*
 * pwtest - drives procwatch.h from tests/test_abi.py.
 *
 *   pwtest register NAME KEY   register, print "rc=R slot=S pid=P", then obey
 *                              stdin lines: "beat N", "hb MS", "unreg", "peer
 *                              NAME"; print "rc=R" after each.  Exits at EOF
 *                              without unregistering (like a crash would).
 *   pwtest peer NAME KEY       print procwatch_peer_pid()
 *   pwtest wait NAME KEY MS    print "waiting", then procwatch_wait_exit()
 *   pwtest watch NAME KEY      open a struct procwatch_peer, print "rc=R"; then
 *                              on each stdin line print "rc=<current PID>"
 *   pwtest lockhang KEY        take the table's semaphore, print "locked",
 *                              hold it until stdin reaches EOF
 *   pwtest race NAME KEY FILE I N ROUNDS
 *                              racer I of N: each round, meet the others at a
 *                              spinning barrier in FILE (N u64 words, mapped
 *                              shared), register NAME, meet again, unregister
 *                              if registered; then print per round
 *                              "ROUND RC SLOT T0 T1" (CLOCK_MONOTONIC ns
 *                              around the call); a "%d" in NAME is the round
 *   pwtest sysno               print SYS_futex
 *
 * KEY is parsed with strtol(..., 0): 0 means PROCWATCH_KEY / the default.
 * Built with -std=c99 -Wall -Wextra -Werror: procwatch.h comes first.
 */
#include "procwatch.h"

#include <sched.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/resource.h>

static int key_arg(const char *s)
{
    return (int)strtol(s, NULL, 0);
}

static int cmd_register(const char *name, int key)
{
    struct procwatch_reg reg;
    char line[128];
    int rc = procwatch_register(&reg, name, key);

    printf("rc=%d slot=%u pid=%d\n", rc, reg.index, (int)reg.pid);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL) {
        char arg[64] = "";
        unsigned long n = 0;
        if (sscanf(line, "beat %lu", &n) == 1) {
            while (n--)
                procwatch_beat(&reg);
            rc = 0;
        } else if (sscanf(line, "hb %lu", &n) == 1) {
            rc = procwatch_set_heartbeat(&reg, (unsigned)n);
        } else if (strncmp(line, "unreg", 5) == 0) {
            rc = procwatch_unregister(&reg);
        } else if (sscanf(line, "peer %63s", arg) == 1) {
            rc = (int)procwatch_peer_pid(arg, key);
        } else {
            rc = -EINVAL;
        }
        printf("rc=%d\n", rc);
        fflush(stdout);
    }
    return 0;
}

static int cmd_watch(const char *name, int key)
{
    struct procwatch_peer peer;
    char line[64];
    int rc = procwatch_peer_open(&peer, name, key);

    printf("rc=%d\n", rc);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL) {
        printf("rc=%d\n", (int)procwatch_peer_current(&peer));
        fflush(stdout);
    }
    procwatch_peer_close(&peer);
    return 0;
}

static int cmd_lockhang(int key)
{
    char buf[64];
    int rc, semid;

    if ((rc = procwatch__resolve_key(key, &key)) < 0)
        return printf("rc=%d\n", rc), 1;
    semid = semget((key_t)key, 1, 0);
    if (semid < 0)
        return printf("rc=%d\n", -errno), 1;
    rc = procwatch__lock(semid);
    printf(rc == 0 ? "locked\n" : "rc=%d\n", rc);
    fflush(stdout);
    while (fgets(buf, sizeof buf, stdin) != NULL)
        ;
    if (rc == 0)
        procwatch__unlock(semid);
    return 0;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Store our phase, then spin until every racer has reached it; 0, or -1
 * after 10 s (a racer that never comes has died: stop spinning). */
static int barrier(uint64_t *words, int index, int n, uint64_t phase)
{
    long long deadline = now_ns() + 10 * 1000000000LL;
    unsigned long spins = 0;
    int j;

    __atomic_store_n(&words[index], phase, __ATOMIC_SEQ_CST);
    for (j = 0; j < n; j++)
        while (__atomic_load_n(&words[j], __ATOMIC_SEQ_CST) < phase)
            if ((++spins & 0xFFFFF) == 0 && now_ns() > deadline)
                return -1;
    return 0;
}

/* A CPU of its own for racer ``index``, and nice -20 where allowed (root): on a
 * busy machine, spinning racers sharing CPUs with everything else would take
 * turns instead of racing (tests/progs/racer.py does the same). */
static void contend(int index)
{
    cpu_set_t have, mine;
    int cpu, seen = 0;

    if (sched_getaffinity(0, sizeof have, &have) == 0) {
        for (cpu = 0; cpu < CPU_SETSIZE; cpu++) {
            if (!CPU_ISSET(cpu, &have))
                continue;
            if (seen++ == index % CPU_COUNT(&have)) {
                CPU_ZERO(&mine);
                CPU_SET(cpu, &mine);
                (void)sched_setaffinity(0, sizeof mine, &mine);
                break;
            }
        }
    }
    (void)setpriority(PRIO_PROCESS, 0, -20);
}

static int cmd_race(const char *name, int key, const char *path, int index, int n, int rounds)
{
    struct procwatch_reg reg;
    char round_name[64];
    const char *fresh = strstr(name, "%d");
    long long (*times)[2];
    int *rcs, *slots;
    uint64_t *words;
    int fd, r;

    fd = open(path, O_RDWR);
    if (fd < 0 || n < 1 || index < 0 || index >= n || rounds < 1)
        return fprintf(stderr, "pwtest race: bad arguments\n"), 2;
    words = mmap(NULL, sizeof *words * (size_t)n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    times = calloc((size_t)rounds, sizeof *times);
    rcs = calloc((size_t)rounds, sizeof *rcs);
    slots = calloc((size_t)rounds, sizeof *slots);
    if (words == MAP_FAILED || !times || !rcs || !slots)
        return fprintf(stderr, "pwtest race: out of memory\n"), 1;
    contend(index);
    for (r = 0; r < rounds; r++) {
        if (barrier(words, index, n, 2 * (uint64_t)r + 1) < 0)
            return fprintf(stderr, "pwtest race: the others never came\n"), 1;
        if (fresh)
            snprintf(round_name, sizeof round_name, "%.*s%d%s", (int)(fresh - name), name, r + 1, fresh + 2);
        times[r][0] = now_ns();
        rcs[r] = procwatch_register(&reg, fresh ? round_name : name, key);
        times[r][1] = now_ns();
        slots[r] = rcs[r] == 0 ? (int)reg.index : -1;
        if (barrier(words, index, n, 2 * (uint64_t)r + 2) < 0)
            return fprintf(stderr, "pwtest race: the others never came\n"), 1;
        if (rcs[r] == 0)
            procwatch_unregister(&reg);
    }
    for (r = 0; r < rounds; r++)
        printf("%d %d %d %lld %lld\n", r + 1, rcs[r], slots[r], times[r][0], times[r][1]);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "register") == 0)
        return cmd_register(argv[2], key_arg(argv[3]));
    if (argc == 4 && strcmp(argv[1], "peer") == 0) {
        printf("%d\n", (int)procwatch_peer_pid(argv[2], key_arg(argv[3])));
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "wait") == 0) {
        printf("waiting\n");
        fflush(stdout);
        printf("%d\n", procwatch_wait_exit(argv[2], key_arg(argv[3]), atoi(argv[4])));
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "watch") == 0)
        return cmd_watch(argv[2], key_arg(argv[3]));
    if (argc == 3 && strcmp(argv[1], "lockhang") == 0)
        return cmd_lockhang(key_arg(argv[2]));
    if (argc == 8 && strcmp(argv[1], "race") == 0)
        return cmd_race(argv[2], key_arg(argv[3]), argv[4], atoi(argv[5]), atoi(argv[6]), atoi(argv[7]));
    if (argc == 2 && strcmp(argv[1], "sysno") == 0) {
        printf("%ld\n", (long)SYS_futex);
        return 0;
    }
    fprintf(stderr, "usage: pwtest register|peer|wait|watch|lockhang|race|sysno ...\n");
    return 2;
}
