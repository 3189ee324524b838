/* storm: a bounded exit storm of unrelated processes.
 *
 *   storm [-n MAX] [-r RATE] [-d SECONDS]
 *
 * Forks children that _exit(0) at once and reaps each one, at most RATE a
 * second (0: as fast as it can), until MAX exits or SECONDS have passed or
 * SIGTERM arrives.  At most two processes exist at any time (the storm and
 * one child), and it dies with its parent (PR_SET_PDEATHSIG).
 * stdout: "STORM started" once running, "STORM exits=N" at the end. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned long max = 1000, n = 0;
    double rate = 0, seconds = 10;
    int opt;
    while ((opt = getopt(argc, argv, "n:r:d:")) != -1) {
        switch (opt) {
        case 'n': max = strtoul(optarg, NULL, 10); break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        default:
            fprintf(stderr, "usage: storm [-n MAX] [-r RATE] [-d SECONDS]\n");
            return 2;
        }
    }
    if (seconds <= 0 || seconds > 600 || max > 10000000) {
        fprintf(stderr, "storm: need 0 < SECONDS <= 600 and MAX <= 10000000\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    printf("STORM started\n");
    fflush(stdout);
    double t0 = now(), end = t0 + seconds, gap = rate > 0 ? 1.0 / rate : 0, next = t0;
    while (!stop && n < max && now() < end) {
        pid_t c = fork();
        if (c == 0)
            _exit(0);
        if (c < 0) {
            usleep(1000);
            continue;
        }
        while (waitpid(c, NULL, 0) < 0 && errno == EINTR) {}
        n++;
        if (gap > 0) {
            next += gap;
            double d = next - now();
            if (d > 0) {
                struct timespec ts = { (time_t)d, (long)((d - (time_t)d) * 1e9) };
                nanosleep(&ts, NULL);
            }
        }
    }
    printf("STORM exits=%lu seconds=%.3f\n", n, now() - t0);
    return 0;
}
