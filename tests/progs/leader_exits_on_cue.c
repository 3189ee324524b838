/* A process whose main thread exits first (pthread_exit) and whose second
 * thread then exits the process with code 7, each on its own cue: main
 * waits for one line on stdin; the worker joins main, then waits for the
 * next line (or EOF).  Prints "READY <pid>" at start.  The test can so hold
 * the leader's exit event and the group's in the service's socket, unread. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static pthread_t leader;

static void cue(void)
{
    char c;
    while (read(0, &c, 1) == 1 && c != '\n')
        ;
}

static void *worker(void *arg)
{
    (void)arg;
    pthread_join(leader, NULL);
    cue();
    exit(7);
}

int main(void)
{
    pthread_t t;
    leader = pthread_self();
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 1;
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    cue();
    pthread_exit(NULL);
}
