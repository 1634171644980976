/*
 * ticker: a tiny static line printer for the `tasks` bench (tests/benches/tasks.rs).
 *
 * Whatever its arguments, it writes `<CLOCK_REALTIME ns> <i>\n` lines to stdout, one every
 * TICKER_INTERVAL_US microseconds (default 5000), TICKER_LINES of them (default 300), after an
 * initial pause of TICKER_DELAY_MS milliseconds (default 0), and exits 0. Each line is one
 * write(2), so it leaves the process the moment it is stamped (no stdio buffering).
 *
 * `ticker version` answers like OpenTofu does, so `delegate sandbox build-image --from-binary`
 * accepts it and labels the image with the binary name `tofu`.
 *
 * Built at bench time with `cc -static -O2 -o ticker ticker.c`: a static binary runs in a
 * FROM scratch image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long env_long(const char *name, long fallback, long min, long max) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        return fallback;
    }
    char *end = NULL;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || n < min || n > max) {
        return fallback;
    }
    return n;
}

static int write_all(const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, buf, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void add_ns(struct timespec *t, long ns) {
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec += 1;
    }
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "version") == 0) {
        static const char v[] = "OpenTofu v0.0.0-ticker\non linux_amd64\n";
        return write_all(v, sizeof v - 1) == 0 ? 0 : 1;
    }
    long lines = env_long("TICKER_LINES", 300, 0, 10000000);
    long interval_us = env_long("TICKER_INTERVAL_US", 5000, 0, 10000000);
    long delay_ms = env_long("TICKER_DELAY_MS", 0, 0, 600000);

    /* Deadlines on the monotonic clock keep the cadence whatever a write costs. */
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    add_ns(&next, delay_ms * 1000000L);
    for (long i = 0; i < lines; i++) {
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        char buf[64];
        int len = snprintf(buf, sizeof buf, "%lld%09ld %ld\n", (long long)now.tv_sec,
                           now.tv_nsec, i);
        if (len <= 0 || (size_t)len >= sizeof buf || write_all(buf, (size_t)len) != 0) {
            return 1;
        }
        add_ns(&next, interval_us * 1000L);
    }
    return 0;
}
