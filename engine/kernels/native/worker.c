/* The worker thread (worker.h): started at its first job and kept. Between jobs it spins for a
 * while before it sleeps, because the jobs of a stream come in quick succession (a speculative
 * round every few milliseconds, the engine's Python between them ~0.3 ms) and a core that has
 * gone idle is slow to get back: on this repository's 2-core VM, an OpenMP team under
 * OMP_WAIT_POLICY=PASSIVE (how the server runs), which sleeps between rounds, gave a stream
 * 1.34-1.46x full depth's tokens/s against 1.48-1.58x spinning (default model, E=14/16, k=12/16,
 * alternated runs). After SPIN_SECONDS without work it sleeps on a condition variable, so an idle
 * server keeps no core busy.
 *
 * One job at a time: a second caller while a job runs is told to do its work itself. A child
 * process (fork) starts its own worker.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "worker.h"

#define SPIN_SECONDS 0.002

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_flag busy;            /* a caller holds the worker */
    atomic_llong posted, done;   /* jobs posted, jobs finished */
    int sleeping, started;       /* under lock */
    void (*fn)(void *);
    void *arg;
} W = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, ATOMIC_FLAG_INIT};

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *worker_main(void *unused) {
    (void)unused;
    for (long long seen = 0;; ) {
        double idle = seconds();
        for (int spins = 1; atomic_load_explicit(&W.posted, memory_order_acquire) == seen; spins++) {
            worker_relax(spins);
            if (spins % 256 || seconds() - idle < SPIN_SECONDS) continue;
            pthread_mutex_lock(&W.lock);
            W.sleeping = 1;
            while (atomic_load_explicit(&W.posted, memory_order_acquire) == seen) pthread_cond_wait(&W.wake, &W.lock);
            W.sleeping = 0;
            pthread_mutex_unlock(&W.lock);
        }
        seen++;
        W.fn(W.arg);
        atomic_store_explicit(&W.done, seen, memory_order_release);
    }
    return NULL;
}

static void forked_child(void) {
    pthread_mutex_init(&W.lock, NULL);
    pthread_cond_init(&W.wake, NULL);
    atomic_flag_clear(&W.busy);
    atomic_store(&W.posted, 0);
    atomic_store(&W.done, 0);
    W.sleeping = W.started = 0;
}

int64_t worker_start(void (*fn)(void *), void *arg) {
    if (atomic_flag_test_and_set(&W.busy)) return -1;
    pthread_mutex_lock(&W.lock);
    if (!W.started) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        W.started = pthread_create(&t, &attr, worker_main, NULL) == 0;
        pthread_attr_destroy(&attr);
        static int registered;
        if (W.started && !registered) registered = pthread_atfork(NULL, NULL, forked_child) == 0;
    }
    if (!W.started) {
        pthread_mutex_unlock(&W.lock);
        atomic_flag_clear(&W.busy);
        return -1;
    }
    W.fn = fn, W.arg = arg;
    long long ticket = atomic_fetch_add_explicit(&W.posted, 1, memory_order_release) + 1;
    if (W.sleeping) pthread_cond_signal(&W.wake);
    pthread_mutex_unlock(&W.lock);
    return ticket;
}

void worker_wait(int64_t ticket) {
    for (int spins = 0; atomic_load_explicit(&W.done, memory_order_acquire) < ticket; spins++) worker_relax(spins);
    atomic_flag_clear(&W.busy);
}
