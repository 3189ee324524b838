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
 *   pwtest sysno               print SYS_futex
 *
 * KEY is parsed with strtol(..., 0): 0 means PROCWATCH_KEY / the default.
 * Built with -std=c99 -Wall -Wextra -Werror: procwatch.h comes first.
 */
#include "procwatch.h"

#include <stdio.h>

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
    if (argc == 2 && strcmp(argv[1], "sysno") == 0) {
        printf("%ld\n", (long)SYS_futex);
        return 0;
    }
    fprintf(stderr, "usage: pwtest register|peer|wait|watch|lockhang|sysno ...\n");
    return 2;
}
