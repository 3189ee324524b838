/* An armed C client (procwatch.h) whose main thread calls pthread_exit() while a
 * worker thread and the death word's sentinel run on.  Prints "READY <pid>"
 * just before the main thread exits; the worker exits the process with code 5
 * once a line (or EOF) arrives on stdin.  argv: name key */
#include "procwatch.h"
#include <pthread.h>
#include <stdio.h>

static void *worker(void *arg)
{
    char buf[64];
    (void)arg;
    if (read(0, buf, sizeof buf) < 0)
        perror("read");
    exit(5);
}

int main(int argc, char **argv)
{
    struct procwatch_reg reg;
    pthread_t t;
    int rc;
    if (argc != 3)
        return 2;
    rc = procwatch_register(&reg, argv[1], (int)strtol(argv[2], NULL, 0));
    if (rc < 0) {
        printf("ERROR %d\n", rc);
        return 1;
    }
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 1;
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    pthread_exit(NULL);
}
