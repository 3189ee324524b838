/* A supervisor as fast as one can be: N times, fork a child that registers
 * NAME, kill it, sleep on its PID word until the service zeroes it, and at
 * once fork the next child, which registers NAME again (into the same slot).
 * Prints "DONE <killed> <timeouts>" (it stops after 3 timeouts of 2 s).
 *
 *   reregister NAME KEY N
 *
 * Built with -std=c99 -Wall -Wextra -Werror: procwatch.h comes first.
 */
#include "procwatch.h"

#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
    int key, n, i, killed = 0, timeouts = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: reregister NAME KEY N\n");
        return 2;
    }
    key = (int)strtol(argv[2], NULL, 0);
    n = atoi(argv[3]);
    for (i = 0; i < n; i++) {
        struct procwatch_peer peer;
        int fds[2];
        char c;
        pid_t pid;

        if (pipe(fds) != 0)
            return 1;
        pid = fork();
        if (pid == 0) {
            struct procwatch_reg reg;
            close(fds[0]);
            if (procwatch_register(&reg, argv[1], key) < 0 || write(fds[1], "r", 1) != 1)
                _exit(9);
            for (;;)
                pause();
        }
        close(fds[1]);
        if (read(fds[0], &c, 1) != 1) {
            fprintf(stderr, "child %d could not register\n", (int)pid);
            return 1;
        }
        close(fds[0]);
        if (procwatch_peer_open(&peer, argv[1], key) != 0 || procwatch_peer_current(&peer) != pid)
            return 1;
        kill(pid, SIGKILL);
        killed++;
        if (procwatch_peer_wait(&peer, 2000) != 1)
            timeouts++;
        procwatch_peer_close(&peer);
        waitpid(pid, NULL, 0);
        if (timeouts == 3)
            break;                  /* the service has lost track: no need to go on */
    }
    printf("DONE %d %d\n", killed, timeouts);
    return 0;
}
