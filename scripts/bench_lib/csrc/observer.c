/* observer.c: the two non-connector baselines for "a peer sees the kill".
 *
 *   observer pidfd                 pidfd_open(2) each target, poll(2) them all
 *   observer procpoll [INTERVAL_MS]  read /proc/PID/stat every INTERVAL_MS (100):
 *                                  what a supervisor of processes that are not
 *                                  its children does; gone, 'Z' or 'X' = dead
 *
 * stdin, one command a line:  watch <pid>   (reply: ok <pid>, or gone <pid>)
 * stdout, flushed:            exit <pid> <t1_ns>      (CLOCK_MONOTONIC)
 *                             stats seen=N cpu_us=N    (on EOF / SIGTERM)
 * A pidfd is readable once the whole thread group has exited (pidfd_open(2)),
 * i.e. before the parent reaps it; a /proc poller sees the zombie as 'Z'.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAXW 1024

static int wpid[MAXW];
static int wfd[MAXW];
static int nw;
static unsigned long seen;
static char inbuf[65536];
static size_t inlen;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void report(int i, long long t1)
{
    printf("exit %d %lld\n", wpid[i], t1);
    fflush(stdout);
    seen++;
    if (wfd[i] >= 0) close(wfd[i]);
    wpid[i] = wpid[nw - 1];
    wfd[i] = wfd[nw - 1];
    nw--;
}

/* 1 = dead (gone, zombie, dead), 0 = alive. */
static int proc_dead(int pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    char *rp = strrchr(buf, ')'); /* comm may hold spaces and ')' */
    if (!rp || rp[1] != ' ') return 0;
    return rp[2] == 'Z' || rp[2] == 'X';
}

/* Read stdin; 0 on EOF. */
static int handle_stdin(int pidfd_mode)
{
    ssize_t n = read(0, inbuf + inlen, sizeof inbuf - 1 - inlen);
    if (n <= 0) return n < 0 && errno == EINTR;
    inlen += n;
    char *line = inbuf, *nl;
    while ((nl = memchr(line, '\n', inbuf + inlen - line))) {
        *nl = 0;
        int pid;
        if (sscanf(line, "watch %d", &pid) == 1) {
            if (nw >= MAXW) { fprintf(stderr, "observer: too many watches\n"); exit(1); }
            int fd = -1;
            if (pidfd_mode) {
                fd = syscall(SYS_pidfd_open, pid, 0);
                if (fd < 0) { printf("gone %d\n", pid); fflush(stdout); line = nl + 1; continue; }
            }
            wpid[nw] = pid;
            wfd[nw] = fd;
            nw++;
            printf("ok %d\n", pid);
            fflush(stdout);
        }
        line = nl + 1;
    }
    inlen = inbuf + inlen - line;
    memmove(inbuf, line, inlen);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: observer pidfd|procpoll [INTERVAL_MS]\n"); return 2; }
    int pidfd_mode = !strcmp(argv[1], "pidfd");
    if (!pidfd_mode && strcmp(argv[1], "procpoll")) { fprintf(stderr, "observer: bad mode\n"); return 2; }
    long interval_ms = argc > 2 ? atol(argv[2]) : 100;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    alarm(600); /* bound: no observer outlives a bench run */

    struct pollfd pfd[MAXW + 1];
    long long next_tick = now_ns() + interval_ms * 1000000LL;
    for (;;) {
        pfd[0].fd = 0;
        pfd[0].events = POLLIN;
        int nfds = 1, timeout = -1;
        if (pidfd_mode) {
            for (int i = 0; i < nw; i++) { pfd[1 + i].fd = wfd[i]; pfd[1 + i].events = POLLIN; }
            nfds += nw;
        } else {
            long long left = next_tick - now_ns();
            timeout = left <= 0 ? 0 : (int)((left + 999999) / 1000000);
        }
        int r = poll(pfd, nfds, timeout);
        if (r < 0 && errno != EINTR) { perror("observer: poll"); return 1; }
        if (pidfd_mode && r > 0) {
            long long t1 = now_ns();
            for (int i = nw - 1; i >= 0; i--) /* backwards: report() moves the last entry into i */
                if (pfd[1 + i].revents) report(i, t1);
        }
        if (!pidfd_mode && now_ns() >= next_tick) {
            for (int i = nw - 1; i >= 0; i--)
                if (proc_dead(wpid[i])) report(i, now_ns());
            next_tick += interval_ms * 1000000LL;
            if (next_tick < now_ns()) next_tick = now_ns() + interval_ms * 1000000LL;
        }
        if (r > 0 && pfd[0].revents && !handle_stdin(pidfd_mode)) break;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long long cpu = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
    printf("stats seen=%lu cpu_us=%lld\n", seen, cpu);
    fflush(stdout);
    return 0;
}
