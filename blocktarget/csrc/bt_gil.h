/* blocktarget C data plane: a sampler of the GIL's state on a reactor thread (gil.c);
 * the cdef section between the marker lines, as in bt_lane.h.
 *
 * Why: a reactor's CPU time is (a) Python, holding the GIL, (b) the C data plane's
 * calls, which release it (measured around each call), and (c) the rest without the
 * GIL: the event loop waiting in epoll, the kernel's work on the thread (io_uring task
 * work, softirqs) outside our calls. Only (a) serializes reactors. (a) and (c) cannot be
 * told apart by timing our own calls, and the kernel keeps no precise per-thread
 * user/system split here (tick accounting), so the thread is sampled instead: a timer on
 * its CPU clock (it fires only while the thread runs, so samples are proportional to its
 * CPU time) raises a signal on that thread, whose handler asks CPython whether this
 * thread holds the GIL at that instant: py-spy --gil's question, asked from inside.
 */
#ifndef BT_GIL_H
#define BT_GIL_H

#include <stdint.h>

/* ---- cdef begin ---- */

struct bt_gil_sampler {
    /* cumulative, written by the signal handler on the sampled thread only: samples
       (each weighted by the timer periods it stands for), and those taken while the
       thread held the GIL */
    uint64_t samples, held;
    uint32_t period_us;
    uint8_t running;
    /* private to gil.c */
    uint32_t magic;
    unsigned char timer[16];
};

/* Sample the calling thread's GIL state every period_us of its CPU time (rounded up to
   the kernel's tick). A sampler, or NULL with *err (-errno; -EBUSY: the signal is
   someone else's). */
struct bt_gil_sampler *bt_gil_sampler_start(uint32_t period_us, int *err);
/* Stop sampling (the counts stay readable; the memory is never freed: a signal already
   queued may still arrive and must find it). */
void bt_gil_sampler_stop(struct bt_gil_sampler *s);

/* ---- cdef end ---- */

#endif
