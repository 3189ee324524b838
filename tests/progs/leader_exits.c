/* A process whose main thread exits first (pthread_exit) while a second
 * thread runs on; that thread exits the process with code 7 once a line
 * (or EOF) arrives on stdin.  Prints "READY <pid>" when the leader is about
 * to exit. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *worker(void *arg)
{
    char buf[64];
    (void)arg;
    if (read(0, buf, sizeof buf) < 0)
        perror("read");
    exit(7);
}

int main(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 1;
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    pthread_exit(NULL);
}
