/* forker.c: the exit storm.  WORKERS processes each fork a child that
 * _exit(0)s at once and reap it, at RATE exits/s in total (0 = as fast as
 * they can), for at most SECONDS, at most MAX exits each.  At most
 * 2 * WORKERS + 1 processes exist at any time.
 *
 *   forker [-r RATE] [-d SECONDS] [-j WORKERS] [-n MAX] [-v]
 *     -v  vfork() instead of fork()
 *
 * stdout: "started workers=N" once the workers run, and at the end
 *         "storm exits=N seconds=S rate=R workers=N".
 * Ends early on SIGTERM/SIGINT; workers die with it (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long worker(double rate, double seconds, unsigned long max, int use_vfork)
{
    double t0 = now(), end = t0 + seconds;
    double gap = rate > 0 ? 1.0 / rate : 0;
    double next = t0;
    unsigned long n = 0, iter = 0;
    while (!stop && n < max) {
        if ((iter++ & 63) == 0 && now() >= end) break;
        pid_t c = use_vfork ? vfork() : fork();
        if (c == 0) _exit(0);
        if (c < 0) { usleep(1000); continue; }
        while (waitpid(c, NULL, 0) < 0 && errno == EINTR) {}
        n++;
        if (gap > 0) {
            next += gap;
            double d = next - now();
            if (d > 0) {
                struct timespec ts = { (time_t)d, (long)((d - (time_t)d) * 1e9) };
                nanosleep(&ts, NULL);
            } else if (d < -0.1) {
                next = now(); /* fell behind: don't burst to catch up */
            }
        }
    }
    return n;
}

int main(int argc, char **argv)
{
    double rate = 0, seconds = 10;
    int workers = 1, use_vfork = 0;
    unsigned long max = 10000000;
    int opt;
    while ((opt = getopt(argc, argv, "r:d:j:n:v")) != -1) {
        switch (opt) {
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'j': workers = atoi(optarg); break;
        case 'n': max = strtoul(optarg, NULL, 10); break;
        case 'v': use_vfork = 1; break;
        default: return 2;
        }
    }
    if (workers < 1 || workers > 64 || seconds <= 0 || seconds > 600) {
        fprintf(stderr, "forker: need 1 <= workers <= 64 and 0 < seconds <= 600\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fds[2];
    if (pipe(fds) < 0) { perror("forker: pipe"); return 1; }
    pid_t kids[64];
    double t0 = now();
    for (int i = 0; i < workers; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            close(fds[0]);
            unsigned long n = worker(rate / workers, seconds, max, use_vfork);
            if (write(fds[1], &n, sizeof n) != sizeof n) _exit(1);
            _exit(0);
        }
        if (kids[i] < 0) { perror("forker: fork"); stop = 1; workers = i; break; }
    }
    close(fds[1]);
    printf("started workers=%d\n", workers);
    fflush(stdout);
    unsigned long total = 0, n;
    int done = 0;
    while (done < workers) {
        ssize_t r = read(fds[0], &n, sizeof n);
        if (r == sizeof n) { total += n; done++; continue; }
        if (r < 0 && errno == EINTR) {
            for (int i = 0; i < workers; i++) kill(kids[i], SIGTERM);
            continue;
        }
        break; /* EOF: a worker died without reporting */
    }
    for (int i = 0; i < workers; i++) waitpid(kids[i], NULL, 0);
    double el = now() - t0;
    printf("storm exits=%lu seconds=%.3f rate=%.0f workers=%d\n", total, el, total / el, workers);
    fflush(stdout);
    return 0;
}
