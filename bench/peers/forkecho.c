/* The floor of fork-per-connection on this machine: a minimal C echo server.
 *
 * accept, fork, the child echoes until EOF and _exits, the parent closes its
 * copy and reaps on SIGCHLD. No Python anywhere, so what a load generator
 * measures against it is the kernel's fork/exit cost plus the generator's.
 * bench.compare runs it as "c-floor", built at run time (bench/build.py):
 *
 *   gcc -O2 -o /tmp/forkecho bench/peers/forkecho.c
 *   /tmp/forkecho [BACKLOG] &   # prints "listening on 127.0.0.1:PORT" (port 0)
 *   python -m bench.load --port PORT -c 8 -d 5 --payload 64
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(int argc, char **argv) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(l, (void *)&a, sizeof a) || listen(l, argc > 1 ? atoi(argv[1]) : 128)) return 1;
    socklen_t n = sizeof a; getsockname(l, (void *)&a, &n);
    fprintf(stderr, "listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
    struct sigaction sa = {.sa_handler = reap, .sa_flags = SA_RESTART};
    sigaction(SIGCHLD, &sa, NULL);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) {
            close(l); char buf[65536]; ssize_t r;
            while ((r = read(c, buf, sizeof buf)) > 0) write(c, buf, r);
            _exit(0);
        }
        close(c);
    }
}
