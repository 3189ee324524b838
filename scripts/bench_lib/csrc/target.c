/* target.c: the process the bench kills.  Says "r" on fd 1 once it runs,
 * then sleeps.  Bounded: dies with its parent (PR_SET_PDEATHSIG) and after
 * 300 s whatever happens (alarm). */
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm(300);
    if (write(1, "r", 1) != 1) return 1;
    close(1);
    for (;;) pause();
}
