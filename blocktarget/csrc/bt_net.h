/* blocktarget C data plane: a reactor's socket poller for the lanes' connections
 * (net.c), the structures shared with Python (cffi cdef between the marker lines, as in
 * bt_lane.h).
 *
 * Why: with the lane doing a command's work in C, the reactor's time per I/O went to the
 * event loop's per-read Python callback and the glue around each lane call (1.3 of 2 µs
 * per 4 KiB read, all of it holding the GIL). A connection in its steady state is
 * therefore lent to C: its transport stops reading, and net.c receives, runs the lane
 * and sends for every such connection of the reactor, many reads per Python call, the
 * GIL released throughout. Python gets back only what the lane does not take (bytes
 * for the Python path), the end of the connection, and flow-control changes.
 */
#ifndef BT_NET_H
#define BT_NET_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "bt_lane.h"
#include "bt_nvme.h"

/* ---- cdef begin ---- */

/* What a connection has for Python after a poll (bits of bt_conn.ev). */
enum bt_net_ev {
    BT_NET_HAND = 1,     /* bytes for the Python path (hand); C let go of the socket */
    BT_NET_EOF = 2,      /* end of stream or a socket error; C let go of the socket */
    BT_NET_PAUSED = 4,   /* output over the high mark: reading stopped (pause_writing) */
    BT_NET_RESUMED = 8   /* below the low mark again: reading again (resume_writing) */
};

struct bt_net;

/* One connection lent to C. Its fd stays the transport's: C never closes it. */
struct bt_conn {
    int fd;
    struct bt_lane *lane;
    void *handle;           /* the Python queue pair (a cffi handle) */
    uint32_t ev;            /* enum bt_net_ev bits Python has not seen (Python clears) */
    uint8_t attached;       /* in the poller: C does the socket's I/O */
    uint8_t paused;         /* not reading: output over `high` (until under `low`) */
    size_t high, low;       /* the transport's write buffer limits, as Python set them */
    size_t out_bytes;       /* output queued, not yet sent */
    uint64_t pdus;          /* PDUs the lane took whole (cumulative: the stall watch) */
    uint64_t busy_ns;       /* time spent on this connection (cumulative: latency) */
    uint64_t reads, rx_bytes, sends, tx_bytes;  /* cumulative */
    uint64_t blocked;       /* sends the socket took only part of, or none (cumulative) */
    unsigned char *hand;    /* BT_NET_HAND: hand_len bytes for the Python path, of which */
    size_t hand_len;        /* the first hand_first are a capsule the lane carried and */
    size_t hand_first;      /* gave back, to be handled before the rest */
    size_t pend_len;        /* input received but not yet run (reading paused meanwhile) */
    /* private to net.c */
    struct bt_net *net;
    struct bt_chunk *q;     /* output, in order: q[qhead .. qhead + qn) */
    uint32_t qhead, qn, qcap;
    size_t qoff;            /* bytes of q[qhead] already sent */
    unsigned char *pend;
    uint8_t epout;          /* EPOLLOUT requested */
    uint8_t on_ready;
    struct bt_conn *next_ready;
    uint64_t seen_submitted; /* the lane's `submitted` when last looked at */
};

struct bt_net {
    int epfd;               /* readable when a connection has something: loop.add_reader */
    /* The reactor's R2T/in-capsule buffer budget as Python saw it before bt_net_poll
       (used; limit, 0 while other connections wait for it): the lanes take from and
       give back to it as they run, and Python adds each lane's counts afterwards. */
    uint64_t bud_used, bud_limit;
    /* What the lent lanes took from the budget minus what they gave back since Python
       last added it to the budget (it does after every call, and clears it). */
    int64_t bud_delta;
    /* A lent lane submitted I/O to a ring or queue pair (Python clears it): Python's
       watch of them must hear of it (uring's pending SQEs, NVMe's poller kick). */
    uint8_t lane_started;
    /* Set by Python while every ring and queue pair the lent lanes use is an NVMe queue
       pair this poller sweeps: then a call that ends with no lane command at any of
       them does not report lane_started (there is nothing for Python's watch to poll;
       under a host slower than the window every command is one call, and that report
       was a Python pass per command). */
    uint8_t quiet_starts;
    /* Set by Python while every ring and queue pair the lent lanes use is one this
       poller reaps (a ring whose eventfd it watches, a queue pair it sweeps): then
       Python's watch has nothing urgent to do for lane I/O started, which may wait for
       the call's end (a host wait does not stop for it). */
    uint8_t starts_reaped;
    /* While the lanes' only outstanding work is at an NVMe device (no socket or ring
       had anything in the last round, lane commands at a queue pair), the busy-poll
       window does not spin: it sleeps in slices of dev_wait_ns (woken at once by a
       socket or a ring's eventfd) between sweeps, so that a device emulated by the
       host's CPUs (QEMU) is not robbed of the CPU it needs to complete them; past the
       window it goes on so (the call ends at its time budget), the slices doubling up
       to 8 x dev_wait_ns, so that a slow device is not left to the reactor's idle poll
       (a millisecond). 0: spin, and stop at the window's end. dev_waits counts the
       slices slept (cumulative), dev_wait_cpu_ns the thread's CPU time in them (a
       short timed sleep is not free: on a VM, programming and taking the timer cost
       more CPU than the slice lasts, 17 us for 10 us, all of it waiting for the
       device); dev_pending: the last call ended with lane commands still at a device,
       waited for so. */
    uint64_t dev_wait_ns, dev_waits, dev_wait_cpu_ns;
    uint8_t dev_pending;
    /* The busy-poll window after work, for the host's next command, adapts to the
       host's pace (win_adapt): a command that comes later than the whole window
       (spin_max_ns, the reactor's busy_poll_us) halves it, so a host whose turnaround
       is slower than the window is waited for in epoll, not by spinning (in a guest,
       spinning took the CPU the host side and QEMU's device model needed); one that
       comes within it doubles it back (at least to 1.25x its gap), up to spin_max_ns.
       The gap is measured from the last work to the next socket input, spinning or
       woken by epoll alike. win_ns: the window now; win_used_ns: the one the last
       call spun (its spin_ns, or less); win_shrinks, win_grows: cumulative. */
    uint8_t win_adapt;
    uint64_t spin_max_ns, win_ns, win_used_ns, win_shrinks, win_grows;
    uint32_t nconns;
    /* cumulative: calls; the thread's CPU time in them (not wall time: a call that
       serves for long is more likely preempted, and that time is nobody's work); of
       that, the part spent finding nothing to do (spinning). The CPU clock is a system
       call (0.4 us here; two per call and two per device-wait slice were 13 % of a QD1
       command's reactor time), so one call in 16 reads it (samp_*: those calls' CPU
       and wall time awake) and the others' CPU is their wall time awake at that ratio;
       likewise one device-wait slice in 16 (dw_samp_*), the rest counted at their mean. */
    uint64_t polls, cpu_ns, idle_ns;
    uint64_t samp_cpu_ns, samp_wall_ns, dw_samp_cpu_ns, dw_samp;
    uint64_t pdus;          /* cumulative: PDUs the lanes took in the calls */
    uint64_t tail_idle_ns;  /* how long the last call found nothing before returning */
    /* cumulative: wake-ups by an NVMe queue's completion interrupt (its MSI-X eventfd,
       watched in the epoll set instead of waiting for the device in timed slices) */
    uint64_t irq_wakes;
    /* The host wait. When the lanes have nothing to do but wait (for the host's next
       command, or for an interrupting NVMe queue's completion), the call sleeps for it
       here, the GIL released, instead of returning to the event loop, which would sleep
       in its own epoll and make a Python pass of the wake-up; to the end of the call's
       time budget at most (budget_ns: the loop's timers wait no longer than they did).
       loop_fd is the event loop's own epoll fd, in the same wait: anything of the
       loop's (another socket, a message from another thread) ends it at once. Python
       sets host_wait_ns per call: 0 while the loop has callbacks ready to run, or
       pollers of its own to turn (they would wait), or the option is off
       (poll.host_wait_us). It is not taken either while the host's recent gaps
       (host_gap_ns, a moving average of the time from the last work to its next
       command, each sample at most 4 x host_wait_ns) exceed host_wait_ns: a host that
       slow would leave the reactor asleep in C to the end of the budget, then in the
       loop, for nothing. Cumulative: host_waits, the waits begun; host_catches, those
       after which a command or a completion came; host_loop_wakes, those the loop's fd
       ended (the rest ran to the budget's end). */
    int loop_fd;
    uint64_t host_wait_ns, host_gap_ns, host_waits, host_catches, host_loop_wakes;
    uint8_t python_cqe;     /* a completion of Python's first: 1 on an io_uring ring,
                               2 on an NVMe queue pair (bits): Python reaps it */
    /* private to net.c */
    unsigned char *rbuf;
    size_t rcap;
    struct bt_conn *ready;
    uint32_t nready;            /* on the ready list */
    struct bt_uring *rings[8];  /* the lanes' io_uring rings, reaped here too, */
    int ring_efd[8];            /* and their eventfds, in the epoll set */
    uint32_t nrings;
    struct bt_nvmeq *nvmeqs[8]; /* the reactor's NVMe queue pairs the lanes use */
    int nvme_efd[8];            /* and our duplicates of their interrupt eventfds, or -1 */
    uint32_t nnvmeqs;
    uint8_t slack_set;          /* the thread's timer slack made fine for dev_wait_ns */
    int tfd;                    /* the host wait's turn timer (a timerfd in the epoll set) */
    uint8_t turn_armed;
    uint64_t last_work_ns;      /* when a round last found work (the gap's start) */
    uint8_t gap_dev;            /* lane commands were at a device since: no host gap */
};

/* A poller (an epoll set and a receive buffer), or NULL (out of memory or fds). */
struct bt_net *bt_net_new(void);
/* Only once no connection is attached. */
void bt_net_free(struct bt_net *n);
/* Lend the connected socket fd (whose transport no longer reads it) and its lane to C;
   NULL when it cannot be (errno). */
struct bt_conn *bt_net_attach(struct bt_net *n, int fd, struct bt_lane *l, void *handle,
                              size_t high, size_t low);
/* Take the socket back (idempotent): C stops reading and sending; unsent output stays
   queued for bt_net_take, unrun input joins `hand`. */
void bt_net_detach(struct bt_conn *c);
/* The unsent output of a detached connection, in order, as up to max pieces (each freed
   with bt_free(owner) once sent); returns how many (call again while it returns max). */
unsigned bt_net_take(struct bt_conn *c, struct bt_chunk *out, unsigned max);
/* Free a detached connection (what it still queues is dropped). */
void bt_net_conn_free(struct bt_conn *c);
/* Output of the Python path for an attached connection: queued (copied) behind the
   lane's and sent as the socket takes it. 0, or -1 when memory is short. */
int bt_net_write(struct bt_conn *c, const unsigned char *p, size_t n);
/* The lane's pending output queued behind what is there and sent. 0 / -1. */
int bt_net_flush(struct bt_conn *c);
/* The poller reaps this ring's completions of lent lanes too, and sends their replies
   (until the first completion of Python's own I/O: then python_cqe, and Python reaps
   from there). efd (or -1): the ring's eventfd, which the poller watches (and reads)
   from now on instead of the event loop. 0, or -1 when it has no room for another ring
   (then Python alone reaps it, as before). */
int bt_net_add_ring(struct bt_net *n, struct bt_uring *u, int efd);
/* The ring goes away (before bt_uring_detach). */
void bt_net_drop_ring(struct bt_net *n, struct bt_uring *u);
/* The poller sweeps this NVMe queue pair too, each round of a poll: it rings its
   pending SQ doorbell, and finishes and answers the completions of lent lanes, until
   the first entry that is Python's (then python_cqe bit 2: Python reaps from there;
   bt_nvme.h says who moves the CQ head when). A queue with an interrupt (irq_efd >= 0)
   joins the epoll set by a duplicate of that eventfd (so that closing the device's
   descriptor cannot leave a stale number here): its lane commands are waited for in
   epoll, by the poller or the event loop, never in timed slices, and starting them
   needs no word to Python. A polled one (irq_efd < 0) raises no event. 0, or -1 when
   there is no room for another (then the reactor's Python poller reaps it all). */
int bt_net_add_nvmeq(struct bt_net *n, struct bt_nvmeq *q);
/* The queue pair goes away, or its reactor's Python poller takes it back. */
void bt_net_drop_nvmeq(struct bt_net *n, struct bt_nvmeq *q);
/* One sweep of the NVMe queue pairs alone, as a round of bt_net_poll makes it, without
   polling the sockets (no system call but the replies' sends): the reactor's poller
   turn while lane commands are at a device and the reactor does not spin. Reports the
   connections as bt_net_poll does; returns the entries consumed. */
unsigned bt_net_reap(struct bt_net *n, void **ready, unsigned max, unsigned *nready);
/* Serve the attached connections: receive, run the lanes, send, until none has
   anything to do (or after budget_ns, or once spin_ns passed with nothing to do; then,
   with host_wait_ns, after a host wait that nothing of C's ended within budget_ns). The
   connections Python must act on go to ready (their handles; up to max, *nready of
   them): those with events or with a command to redo (given back).
   What the others did stays counted in C (the lane's and the connection's cumulative
   counters, bt_net.bud_delta, the cumulative counters above) for Python to fold when
   it likes (nvme/netpoll.py says when). Returns what Python must act on, as BT_NET_*
   bits: 0, the common case, when nothing (so that a call costs Python no more than
   the call itself: a QEMU guest's slow host makes every command one call). */
#define BT_NET_PYTHON_CQE 1   /* python_cqe: Python's own completion stopped the sweep */
#define BT_NET_READY 2        /* connections reported (*nready) */
#define BT_NET_STARTED 4      /* lane_started */
#define BT_NET_BUDGET 8       /* bud_delta is not 0 */
#define BT_NET_PDUS 16        /* the lanes took PDUs in this call */
#define BT_NET_SHORT 32       /* it ended inside its window (tail_idle_ns < win_used_ns) */
#define BT_NET_DEV 64         /* dev_pending */
uint64_t bt_net_poll(struct bt_net *n, void **ready, unsigned max, unsigned *nready,
                     uint64_t budget_ns, uint64_t spin_ns);

/* ---- cdef end ---- */

/* an attached lane's asynchronous completions produced output: send it */
void net_lane_output(struct bt_conn *c);
/* the same, reaped by the poller: sent, or given back (and so reported to Python) when a
   command must be done again by the Python path */
void net_lane_done(struct bt_conn *c);
/* A read's reply sent from memory the caller owns only for now (a pmem pool's blocks,
   lane.c): net_send_ready sends what is queued and says whether nothing is left before
   it (1: the reply may go now; 0: the socket is full or gone, copy it as usual);
   net_send_now then sends the pieces and, before returning, copies into the queue what
   the socket did not take. 0, or -1 when the connection failed (reported to Python). */
int net_send_ready(struct bt_conn *c);
int net_send_now(struct bt_conn *c, const struct iovec *iov, unsigned niov);
/* an attached lane took (d > 0) or gave back budget (bt_net.bud_delta) */
void net_budget(struct bt_conn *c, int64_t d);

#endif
