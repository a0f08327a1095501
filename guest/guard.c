/*
 * Timeouts that survive a snapshot. Under PVM a restored guest's TSC is the new host's: it jumps by the
 * downtime (forwards, or across hosts even backwards), so a wait written as `now - start > limit` could
 * expire at once after a restore. A guard instead adds up the TSC deltas between successive polls, each
 * counted as at most GUARD_STEP_MAX cycles (50 ms at 4 GHz) and a backward step as nothing, so a jump
 * costs at most one step. The TSC is assumed to run at no more than 4 GHz (as the virtio waits assume),
 * so N seconds last from N to 4N seconds, longer if the polls are further apart than a step. Only
 * timeouts use it: no output depends on it.
 */
#include "guest.h"

#define GUARD_TSC_PER_S 4000000000ULL
#define GUARD_STEP_MAX (GUARD_TSC_PER_S / 20)

static inline uint64_t tsc_read(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

void guard_start(struct time_guard *g, uint64_t seconds)
{
    g->last = tsc_read();
    g->elapsed = 0;
    g->limit = seconds * GUARD_TSC_PER_S;
}

bool guard_expired(struct time_guard *g)
{
    uint64_t now = tsc_read(), step = now - g->last;
    g->last = now;
    if ((int64_t)step < 0)
        step = 0;
    else if (step > GUARD_STEP_MAX)
        step = GUARD_STEP_MAX;
    g->elapsed += step;
    return g->limit && g->elapsed >= g->limit;
}
