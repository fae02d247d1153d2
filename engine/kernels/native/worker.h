/* A second thread for work that runs beside the calling thread's (worker.c): a pipelined
 * speculative round's verify (draft_loop.c). */
#ifndef BITSKIP_WORKER_H
#define BITSKIP_WORKER_H
#include <sched.h>
#include <stdint.h>

/* Start fn(arg) on the worker thread. Returns a ticket for worker_wait, or -1 when the worker is
 * busy (another caller holds it) or cannot be started: the caller then runs fn itself. */
int64_t worker_start(void (*fn)(void *), void *arg);

/* Wait until the job of `ticket` has finished (worker_relax). */
void worker_wait(int64_t ticket);

/* One turn of a wait loop whose waits are short (well under a millisecond): ~200 us of pauses,
 * then yielding the core, which keeps it busy (an idle core is slow to wake on a VM) and lets any
 * other thread that wants it have it. */
static inline void worker_relax(int spins) {
#if defined(__x86_64__)
    if (spins < 8000) {
        __builtin_ia32_pause();
        return;
    }
#endif
    sched_yield();
}

#endif
