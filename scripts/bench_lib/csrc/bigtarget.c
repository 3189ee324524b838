/* bigtarget.c: a kill target that touches MIB MiB of anonymous memory first,
 * so that its address-space teardown takes as long as a real big process's.
 *
 *   bigtarget MIB               touch, print "ready", pause until killed
 *   bigtarget MIB NAME KEY      the same, registered under NAME with procwatch.h
 *                               (built twice: armed with -pthread, and
 *                               -DPROCWATCH_NO_DEATH_WORD: connector-only)
 */
#include "procwatch.h"

#include <stdio.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    size_t mib, i;
    char *p;
    if (argc != 2 && argc != 4) {
        fprintf(stderr, "usage: bigtarget MIB [NAME KEY]\n");
        return 2;
    }
    mib = strtoul(argv[1], NULL, 10);
    p = mmap(NULL, mib ? mib << 20 : 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (i = 0; i < (mib << 20); i += 4096)
        p[i] = 1;
    if (argc == 4) {
        struct procwatch_reg reg;
        int rc = procwatch_register(&reg, argv[2], (int)strtol(argv[3], NULL, 0));
        if (rc < 0) {
            printf("error %d\n", rc);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
