/* A C client of procwatch.h for the service tests: the counterpart of
 * tests/progs/client.py.
 *
 *   cclient NAME KEY             register, print "READY <slot> <pid>", then
 *                                obey stdin: "exit CODE" exits with CODE;
 *                                EOF exits 0 (the test's teardown)
 *   cclient NAME KEY exit-now N  register, print READY, exit with N at once
 *
 * On a registration error it prints "ERROR <negative errno>" and exits 3.
 * Built with -std=c99 -Wall -Wextra -Werror: procwatch.h comes first.
 */
#include "procwatch.h"

#include <stdio.h>

int main(int argc, char **argv)
{
    struct procwatch_reg reg;
    char line[64];
    int rc;

    if (argc != 3 && !(argc == 5 && strcmp(argv[3], "exit-now") == 0)) {
        fprintf(stderr, "usage: cclient NAME KEY [exit-now CODE]\n");
        return 2;
    }
    rc = procwatch_register(&reg, argv[1], (int)strtol(argv[2], NULL, 0));
    if (rc < 0) {
        printf("ERROR %d\n", rc);
        return 3;
    }
    printf("READY %u %d\n", reg.index, (int)reg.pid);
    fflush(stdout);
    if (argc == 5)
        _exit(atoi(argv[4]));
    while (fgets(line, sizeof line, stdin) != NULL)
        if (strncmp(line, "exit ", 5) == 0)
            _exit(atoi(line + 5));
    return 0;
}
