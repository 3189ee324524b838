/* cnrelay.c: the minimal relay, the floor of procwatch's design.
 *
 * It does what procwatch's detector does and nothing else: one blocking
 * recv() per exit event, and when the event's tgid is the PID held in a
 * shared word, zero the word and FUTEX_WAKE it.  No pidfd check, no
 * bookkeeping, no logging.  A peer (csrc/pwwait.c) sleeps on the word.
 *
 *   cnrelay --key KEY [--rcvbuf BYTES] [--duration S]
 *
 * KEY: a SysV segment made by the harness; the word is its first 4 bytes
 * (the harness writes the target's PID there before each kill).
 * stdout: "ready filter|legacy rcvbuf=N cpu_us=N", then on SIGTERM
 *         "stats events=N relayed=N enobufs=N cpu_us=N".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <linux/connector.h>
#include <linux/futex.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <linux/netlink.h>

/* include/uapi/linux/cn_proc.h (spelled out: Debian 12's headers predate
 * struct proc_input, which arrived with the event filter in 6.6). */
#define PROC_CN_MCAST_LISTEN 1
#define PROC_CN_MCAST_IGNORE 2
#define PROC_EVENT_NONE 0x00000000u
#define PROC_EVENT_EXIT 0x80000000u

/* Offsets in a received datagram: nlmsghdr (16) + cn_msg (20) = 36, then
 * struct proc_event {what, cpu, timestamp_ns (aligned(8) inside the
 * struct), event_data}.  The exit member is
 * {process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid}. */
#define OFF_EV 36
#define OFF_WHAT (OFF_EV + 0)
#define OFF_TS (OFF_EV + 8)
#define OFF_DATA (OFF_EV + 16)
#define OFF_EXIT_PID (OFF_DATA + 0)
#define OFF_EXIT_TGID (OFF_DATA + 4)
#define OFF_EXIT_CODE (OFF_DATA + 8)
#define OFF_ACK_ERR (OFF_DATA + 0)
#define OFF_EXIT_PARENT_TGID (OFF_DATA + 20)
#define EXIT_END (OFF_DATA + 24)

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint32_t rd32(const unsigned char *b, size_t off) { uint32_t v; memcpy(&v, b + off, 4); return v; }

static long long cpu_us(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static int kernel_has_filter(void)
{
    /* The {mcast_op, event_type} filter is kernel >= 6.6; older kernels
     * silently drop an 8-byte request (no ack), so ask by version. */
    struct utsname u;
    int maj = 0, min = 0;
    if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &maj, &min) != 2)
        return 0;
    return maj > 6 || (maj == 6 && min >= 6);
}

static int subscribe(int fd, uint32_t op, int filtered)
{
    struct {
        struct nlmsghdr nl;
        struct cn_msg cn;
        uint32_t input[2]; /* struct proc_input {mcast_op, event_type} */
    } __attribute__((packed)) req;
    size_t payload = filtered ? 8 : 4;
    memset(&req, 0, sizeof req);
    req.nl.nlmsg_len = sizeof(struct nlmsghdr) + sizeof(struct cn_msg) + payload;
    req.nl.nlmsg_type = NLMSG_DONE;
    req.nl.nlmsg_pid = getpid();
    req.cn.id.idx = CN_IDX_PROC;
    req.cn.id.val = CN_VAL_PROC;
    req.cn.len = payload;
    req.input[0] = op;
    req.input[1] = PROC_EVENT_EXIT;
    return send(fd, &req, req.nl.nlmsg_len, 0) < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    long key = -1, rcvbuf = 0, duration = 600;
    int filtered = kernel_has_filter();
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--key") && i + 1 < argc) key = strtol(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--rcvbuf") && i + 1 < argc) rcvbuf = atol(argv[++i]);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc) duration = atol(argv[++i]);
        else { fprintf(stderr, "cnrelay: bad argument %s\n", argv[i]); return 2; }
    }
    if (key < 0) { fprintf(stderr, "cnrelay: --key is required\n"); return 2; }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal; /* no SA_RESTART: recv() returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    alarm(duration);

    int id = shmget((key_t)key, 0, 0);
    if (id < 0) { perror("cnrelay: shmget"); return 1; }
    uint32_t *word = shmat(id, NULL, 0);
    if (word == (void *)-1) { perror("cnrelay: shmat"); return 1; }

    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_CONNECTOR);
    if (fd < 0) { perror("cnrelay: socket"); return 1; }
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_nl sa_nl = { .nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC, .nl_pid = getpid() };
    if (bind(fd, (struct sockaddr *)&sa_nl, sizeof sa_nl) < 0) { perror("cnrelay: bind"); return 1; }
    if (subscribe(fd, PROC_CN_MCAST_LISTEN, filtered) < 0) { perror("cnrelay: send"); return 1; }
    int got = 0;
    socklen_t gl = sizeof got;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &got, &gl);
    printf("ready %s rcvbuf=%d cpu_us=%lld\n", filtered ? "filter" : "legacy", got, cpu_us());
    fflush(stdout);

    unsigned char buf[4096] __attribute__((aligned(8)));
    unsigned long events = 0, relayed = 0, enobufs = 0;
    while (!stop) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == ENOBUFS) { enobufs++; continue; }
            perror("cnrelay: recv");
            break;
        }
        if ((size_t)n < EXIT_END || rd32(buf, OFF_WHAT) != PROC_EVENT_EXIT) continue;
        events++;
        uint32_t tgid = rd32(buf, OFF_EXIT_TGID);
        if (tgid && __atomic_load_n(word, __ATOMIC_ACQUIRE) == tgid) {
            __atomic_store_n(word, 0, __ATOMIC_RELEASE);
            syscall(SYS_futex, word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
            relayed++;
        }
    }
    subscribe(fd, PROC_CN_MCAST_IGNORE, filtered);
    close(fd);
    printf("stats events=%lu relayed=%lu enobufs=%lu cpu_us=%lld\n", events, relayed, enobufs, cpu_us());
    fflush(stdout);
    return 0;
}
