/* A team of threads working through one native call (decode_block.c): one OpenMP region for all
 * of a call's blocks instead of one per product, so threads are woken once per call, not ~10 times
 * per block.
 *
 * A call is a fixed sequence of phases (a block's rows, a product's ranges of output features,
 * (row, KV head) pairs, ...), each a number of items. Items are claimed first come, first served
 * from one counter that runs through every phase in turn, and a phase ends when its items are done,
 * not when every thread has arrived: a thread the OS has descheduled holds the others up only if it
 * holds an item, and a thread that starts late skips the phases already done. Waits spin up to
 * ~200 us (longer than a phase's last item takes), then yield the core: yielding sooner on a busy
 * machine lost the core to another process for a time slice at almost every phase. Which thread runs an item never changes its numbers: every item is computed
 * whole by one thread in a fixed order.
 */
#ifndef BITSKIP_TEAM_H
#define BITSKIP_TEAM_H
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct {
    atomic_llong next;            /* items claimed, over all phases so far */
    atomic_llong done;            /* items finished */
} Team;

typedef struct {
    Team *team;
    int id;                       /* this thread's scratch */
    int64_t begin, end;           /* the current phase's items in the team's count */
    const char *ahead, *ahead_end;  /* bytes to ask the cache for while waiting (team_ahead) */
} Member;

/* Bytes the team reads soon (the next product's weights): a member that waits prefetches them,
 * 64-byte line by line, instead of only spinning, so memory keeps streaming while the phases
 * that do not read weights (norms, attention) run on the other thread. */
static inline void team_ahead(Member *m, const void *p, int64_t bytes) {
    m->ahead = (const char *)p;
    m->ahead_end = m->ahead + bytes;
}

extern int team_prefetch;  /* decode_block.c: team_ahead on (1) or off (0, for comparisons) */

static inline void team_init(Team *t) {
    atomic_init(&t->next, 0);
    atomic_init(&t->done, 0);
}

/* Enter the next phase, of n items. */
static inline void team_phase(Member *m, int64_t n) {
    m->begin = m->end;
    m->end += n;
}

/* The next unclaimed item of the phase (0..n-1), or -1 when none is left. */
static inline int64_t team_claim(Member *m) {
    long long cur = atomic_load(&m->team->next);
    while (cur < m->end)
        if (atomic_compare_exchange_weak(&m->team->next, &cur, cur + 1)) return cur - m->begin;
    return -1;
}

/* An item is finished (its results written). */
static inline void team_done(Member *m) { atomic_fetch_add(&m->team->done, 1); }

/* Wait until every item of the phase is finished. */
static inline void team_wait(Member *m) {
    for (int spins = 0; atomic_load(&m->team->done) < m->end; spins++) {
        if (team_prefetch && m->ahead < m->ahead_end) {
            for (int i = 0; i < 4; i++) __builtin_prefetch(m->ahead + 64 * i);
            m->ahead += 256;
            continue;
        }
#if defined(__x86_64__)
        if (spins < 8000) {  /* ~200 us of pauses (~27 ns each on this EPYC) */
            __builtin_ia32_pause();
            continue;
        }
#endif
        sched_yield();
    }
}

#endif
