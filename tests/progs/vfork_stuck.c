/* A client that gets stuck in the kernel for the hang-verdict tests (issue 15).
 *
 *   vfork_stuck NAME KEY HEARTBEAT_MS   register with that heartbeat, print
 *                                       "READY <slot> <pid>", beat every 10 ms
 *                                       until stdin gives a line, then vfork()
 *                                       (no table at KEY: "READY - <pid>", no beats)
 *
 * The vfork child does not exec: it sleeps until its parent dies
 * (PR_SET_PDEATHSIG), so the parent sleeps in the kernel waiting for it
 * (wait_for_vfork_done(), TASK_KILLABLE: state D) and never beats again.
 * TASK_KILLABLE means SIGKILL still ends it, so the test stays bounded; the
 * child then gets SIGKILL from the kernel too.
 */
#include "procwatch.h"

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>

int main(int argc, char **argv)
{
    struct procwatch_reg reg;
    struct pollfd in = {.fd = 0, .events = POLLIN};
    int rc;

    if (argc != 4) {
        fprintf(stderr, "usage: vfork_stuck NAME KEY HEARTBEAT_MS\n");
        return 2;
    }
    rc = procwatch_register(&reg, argv[1], (int)strtol(argv[2], NULL, 0));
    if (rc == 0)
        rc = procwatch_set_heartbeat(&reg, (unsigned)atoi(argv[3]));
    if (rc == -ENOENT) {                /* no service: carry on, as a client must */
        printf("READY - %d\n", (int)getpid());
    } else if (rc < 0) {
        printf("ERROR %d\n", rc);
        return 3;
    } else {
        printf("READY %u %d\n", reg.index, (int)reg.pid);
    }
    fflush(stdout);
    while (poll(&in, 1, 10) == 0)
        if (rc == 0)
            procwatch_beat(&reg);
    printf("OK vfork\n");
    fflush(stdout);
    if (vfork() == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1)
            _exit(0);
        for (;;)
            pause();
    }
    return 0;
}
