/* A closed-loop churn client in C: the load generator bench.compare uses, so
 * that the generator costs far less CPU per connection than the fork servers
 * it measures (bench/load.py, in Python, costs about as much as they do).
 * bench.compare builds it at run time (bench/build.py).
 *
 *   churn [-c CLIENTS] [-d SECONDS] [-p PAYLOAD] [-t TIMEOUT] HOST PORT
 *
 * HOST is a numeric address.  CLIENTS threads (8), each in a loop for SECONDS
 * (5): connect, send PAYLOAD (64) bytes, half-close, read to EOF, check that
 * the reply is the echo, close.  A connection taking longer than TIMEOUT (10)
 * seconds fails with "timeout".  Prints one JSON object on stdout, with the
 * keys bench/load.py --json uses for the same things: connections, conn_per_s,
 * latency_ms (connect to EOF; min, p50, p90, p99, p99.9, max, mean; nearest
 * rank), cdf_ms, errors by kind, errors_total, and generator_cpu (this
 * process's own CPU, getrusage).  Exit 0 when every connection succeeded, 1
 * when some failed, 2 on a usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum kind { REFUSED, RESET, BROKEN_PIPE, TIMEOUT, NO_LOCAL_PORT, FD_LIMIT, SHORT_REPLY,
            LONG_REPLY, MISMATCH, OTHER, NKINDS };
static const char *kind_names[NKINDS] = {"refused", "reset", "broken_pipe", "timeout",
    "no_local_port", "fd_limit", "short_reply", "long_reply", "mismatch", "oserror"};

struct client {
    pthread_t tid;
    double *lat;
    size_t n, cap;
    long errors[NKINDS];
    double end;
};

static struct sockaddr_storage addr;
static socklen_t addrlen;
static unsigned char *payload;
static size_t plen = 64;
static double duration = 5.0, timeout_s = 10.0, start;
static pthread_barrier_t go;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static enum kind kind_of(int err) {
    switch (err) {
    case ECONNREFUSED: return REFUSED;
    case ECONNRESET: return RESET;
    case EPIPE: return BROKEN_PIPE;
    case EAGAIN: case EINPROGRESS: case ETIMEDOUT: return TIMEOUT;  /* SO_*TIMEO expired */
    case EADDRNOTAVAIL: return NO_LOCAL_PORT;
    case EMFILE: case ENFILE: return FD_LIMIT;
    default: return OTHER;
    }
}

/* One connection; -1 when it succeeded, else the kind of failure. */
static int one(void) {
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return kind_of(errno);
    struct timeval tv = {.tv_sec = (time_t)timeout_s,
                         .tv_usec = (suseconds_t)((timeout_s - (time_t)timeout_s) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int result = -1;
    unsigned char buf[65536];
    size_t sent = 0, got = 0;
    ssize_t r;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0) { result = kind_of(errno); goto out; }
    while (sent < plen) {
        r = send(fd, payload + sent, plen - sent, MSG_NOSIGNAL);
        if (r < 0) { if (errno == EINTR) continue; result = kind_of(errno); goto out; }
        sent += (size_t)r;
    }
    shutdown(fd, SHUT_WR);
    while ((r = recv(fd, buf, sizeof buf, 0)) != 0) {
        if (r < 0) { if (errno == EINTR) continue; result = kind_of(errno); goto out; }
        if (got + (size_t)r > plen) { result = LONG_REPLY; goto out; }
        if (memcmp(buf, payload + got, (size_t)r)) { result = MISMATCH; goto out; }
        got += (size_t)r;
    }
    if (got != plen) result = SHORT_REPLY;
out:
    close(fd);
    return result;
}

static void *run(void *arg) {
    struct client *c = arg;
    pthread_barrier_wait(&go);
    double stop = start + duration, t0;
    while ((t0 = now()) < stop) {
        int kind = one();
        if (kind >= 0) { c->errors[kind]++; continue; }
        if (c->n == c->cap) {
            c->cap = c->cap ? 2 * c->cap : 4096;
            if (!(c->lat = realloc(c->lat, c->cap * sizeof *c->lat))) abort();
        }
        c->lat[c->n++] = now() - t0;
    }
    c->end = now();
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of an ascending array, in ms (as bench/load.py). */
static double pct(const double *v, size_t n, double q) {
    if (q <= 0) return v[0] * 1e3;
    size_t rank = (size_t)ceil(q / 100.0 * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return v[rank - 1] * 1e3;
}

static double cpu(const struct timeval *t) { return t->tv_sec + t->tv_usec / 1e6; }

static int usage(void) {
    fprintf(stderr, "usage: churn [-c CLIENTS] [-d SECONDS] [-p PAYLOAD] [-t TIMEOUT] HOST PORT\n");
    return 2;
}

int main(int argc, char **argv) {
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    long clients = 8;
    int opt;
    while ((opt = getopt(argc, argv, "c:d:p:t:")) != -1) {
        switch (opt) {
        case 'c': clients = strtol(optarg, NULL, 10); break;
        case 'd': duration = strtod(optarg, NULL); break;
        case 'p': plen = (size_t)strtoul(optarg, NULL, 10); break;
        case 't': timeout_s = strtod(optarg, NULL); break;
        default: return usage();
        }
    }
    if (argc - optind != 2 || clients < 1 || clients > 4096 || !(duration > 0) ||
        !(timeout_s > 0) || plen > (1 << 24))
        return usage();
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *ai;
    if (getaddrinfo(argv[optind], argv[optind + 1], &hints, &ai) != 0) {
        fprintf(stderr, "churn: %s is not a numeric address\n", argv[optind]);
        return 2;
    }
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);
    signal(SIGPIPE, SIG_IGN);
    payload = malloc(plen + 1);
    srand((unsigned)getpid() ^ (unsigned)time(NULL));
    for (size_t i = 0; i < plen; i++) payload[i] = (unsigned char)rand();

    struct client *cs = calloc((size_t)clients, sizeof *cs);
    pthread_barrier_init(&go, NULL, (unsigned)clients + 1);
    for (long i = 0; i < clients; i++)
        if (pthread_create(&cs[i].tid, NULL, run, &cs[i])) { perror("churn: pthread_create"); return 2; }
    start = now();
    pthread_barrier_wait(&go);
    size_t total = 0;
    long errors[NKINDS] = {0}, errors_total = 0;
    double end = start;
    for (long i = 0; i < clients; i++) {
        pthread_join(cs[i].tid, NULL);
        total += cs[i].n;
        if (cs[i].end > end) end = cs[i].end;
        for (int k = 0; k < NKINDS; k++) { errors[k] += cs[i].errors[k]; errors_total += cs[i].errors[k]; }
    }
    double *all = malloc((total + 1) * sizeof *all), sum = 0;
    size_t at = 0;
    for (long i = 0; i < clients; i++) {
        memcpy(all + at, cs[i].lat, cs[i].n * sizeof *all);
        at += cs[i].n;
        free(cs[i].lat);
    }
    qsort(all, total, sizeof *all, by_value);
    for (size_t i = 0; i < total; i++) sum += all[i];
    getrusage(RUSAGE_SELF, &ru1);
    double elapsed = end - start > 1e-9 ? end - start : 1e-9;
    double user = cpu(&ru1.ru_utime) - cpu(&ru0.ru_utime);
    double sys = cpu(&ru1.ru_stime) - cpu(&ru0.ru_stime);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);

    printf("{\"tool\": \"churn\", \"target\": \"%s:%s\", ", argv[optind], argv[optind + 1]);
    printf("\"config\": {\"mode\": \"churn\", \"concurrency\": %ld, \"duration\": %g, "
           "\"payload\": %zu, \"timeout\": %g}, ", clients, duration, plen, timeout_s);
    printf("\"procs\": 1, \"elapsed_s\": %.6f, \"connections\": %zu, \"requests\": %zu, "
           "\"conn_per_s\": %.3f, \"req_per_s\": %.3f, \"latency_of\": \"connection\", ",
           elapsed, total, total, total / elapsed, total / elapsed);
    if (total) {
        printf("\"latency_ms\": {\"min\": %.6f, \"p50\": %.6f, \"p90\": %.6f, \"p99\": %.6f, "
               "\"p99.9\": %.6f, \"max\": %.6f, \"mean\": %.6f}, \"cdf_ms\": [",
               all[0] * 1e3, pct(all, total, 50), pct(all, total, 90), pct(all, total, 99),
               pct(all, total, 99.9), all[total - 1] * 1e3, sum / total * 1e3);
        static const double tail[] = {99.5, 99.9, 99.99, 100};
        for (int q = 0; q < 100; q++) printf("[%d, %.6f], ", q, pct(all, total, q));
        for (int i = 0; i < 4; i++) printf("[%g, %.6f]%s", tail[i], pct(all, total, tail[i]), i < 3 ? ", " : "");
        printf("], ");
    } else {
        printf("\"latency_ms\": {\"min\": null, \"p50\": null, \"p90\": null, \"p99\": null, "
               "\"p99.9\": null, \"max\": null, \"mean\": null}, \"cdf_ms\": [], ");
    }
    printf("\"errors\": {");
    for (int k = 0, first = 1; k < NKINDS; k++)
        if (errors[k]) { printf("%s\"%s\": %ld", first ? "" : ", ", kind_names[k], errors[k]); first = 0; }
    printf("}, \"errors_total\": %ld, ", errors_total);
    printf("\"generator_cpu\": {\"user_s\": %.4f, \"system_s\": %.4f, \"total_s\": %.4f, "
           "\"cores_used\": %.4f, \"fraction_of_machine\": %.4f, \"cores\": %ld}, "
           "\"interrupted\": false}\n",
           user, sys, user + sys, (user + sys) / elapsed, (user + sys) / elapsed / cores, cores);
    return errors_total ? 1 : 0;
}
