/* A second thread for work that runs beside the calling thread's (worker.c): a pipelined
 * speculative round's verify (draft_loop.c). */
#ifndef BITSKIP_WORKER_H
#define BITSKIP_WORKER_H
#include <stdint.h>

/* Start fn(arg) on the worker thread. Returns a ticket for worker_wait, or -1 when the worker is
 * busy (another caller holds it) or cannot be started: the caller then runs fn itself. */
int64_t worker_start(void (*fn)(void *), void *arg);

/* Wait until the job of `ticket` has finished, spinning, then yielding the core. */
void worker_wait(int64_t ticket);

#endif
