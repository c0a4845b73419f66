/* Preloaded into a process (LD_PRELOAD), writes the native backtrace of the thread that raises SIGABRT
 * to $ABRT_DIR/<pid>-<tid>.txt, then lets the signal end the process as before. Used by
 * scripts/torchrun_abort_rate.py --backtraces DIR to see where a rank aborts (docs/reliability.md).
 *
 *   cc -shared -fPIC -O1 -o sigabrt_backtrace.so scripts/sigabrt_backtrace.c
 *   ABRT_DIR=/tmp/stacks LD_PRELOAD=$PWD/sigabrt_backtrace.so python ...
 *   c++filt < /tmp/stacks/<pid>-<tid>.txt
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static char directory[512];

static void on_abort(int sig) {
    char path[600], head[160];
    pid_t pid = getpid(), tid = (pid_t)syscall(SYS_gettid);
    snprintf(path, sizeof path, "%s/%d-%d.txt", directory, (int)pid, (int)tid);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        int n = snprintf(head, sizeof head, "SIGABRT in process %d, thread %d (%s)\n", (int)pid, (int)tid,
                         pid == tid ? "the main thread" : "another thread");
        if (write(fd, head, n) < 0) { /* nothing better to do in a signal handler */ }
        void *frames[128];
        backtrace_symbols_fd(frames, backtrace(frames, 128), fd);
        close(fd);
    }
    signal(sig, SIG_DFL);  /* then the abort goes on: same exit status, same core */
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    const char *d = getenv("ABRT_DIR");
    if (d == NULL || strlen(d) >= sizeof directory) return;
    strcpy(directory, d);
    void *warm[2];
    backtrace(warm, 2);  /* loads the unwinder now rather than inside the handler */
    signal(SIGABRT, on_abort);
}
