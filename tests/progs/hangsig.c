/* procwatch.h's hang-signal policy, for tests/test_signals.py: prints the
 * signals procwatch_hang_signal_ok() accepts, then (with a key) registers and
 * tries procwatch_set_hang_action() with SIGCHLD and with SIGABRT. */
#include "procwatch.h"
#include <stdio.h>

int main(int argc, char **argv)
{
    struct procwatch_reg reg;
    int sig, rc;

    printf("ok");
    for (sig = 1; sig <= 64; sig++)
        if (procwatch_hang_signal_ok(sig))
            printf(" %d", sig);
    printf("\n");
    if (argc < 2)
        return 0;
    rc = procwatch_register(&reg, "hangsig", (int)strtol(argv[1], NULL, 0));
    printf("register %d slot %u\n", rc, reg.index);
    printf("sigchld %d\n", procwatch_set_hang_action(&reg, PROCWATCH_HANGACTION_KILL, SIGCHLD));
    printf("sigabrt %d\n", procwatch_set_hang_action(&reg, PROCWATCH_HANGACTION_KILL, SIGABRT));
    fflush(stdout);
    return procwatch_unregister(&reg) == 0 ? 0 : 1;
}
