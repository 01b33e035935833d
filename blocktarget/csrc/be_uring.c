/* The lane's io_uring backend: a reactor's ring (made and owned by blocktarget._uring,
 * the uring bdev's glue, so Python's I/O and the lane's share one ring and one completion
 * source per reactor) driven from C.
 *
 * A lane command's SQE carries UD_LANE, its slot and its lane in user_data; Python's
 * carry small integers. bt_uring_reap finishes the lane's completions in C and hands
 * Python only its own, plus the lanes that now have output (or commands to redo).
 *
 * Compiled in only when liburing's headers were there at build time (BT_HAVE_URING, set
 * by _fastpath_build.py); without them the lane simply has no io_uring backend and those
 * namespaces stay on the Python path.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "bt_lane.h"
#include "bt_net.h"
#include "lane_int.h"

#ifdef BT_HAVE_URING
#include <liburing.h>
#include <sys/uio.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

int bt_uring_available(void)
{
    return 1;
}

struct bt_uring *bt_uring_attach(void *ring)
{
    struct bt_uring *u = calloc(1, sizeof(*u));
    if (u != NULL)
        u->ring = ring;
    return u;
}

void bt_uring_detach(struct bt_uring *u)
{
    /* (the caller waits until no lane I/O is in flight and the ready list is empty) */
    free(u);
}

int be_uring_space(struct bt_ns *ns)
{
    struct bt_uring *u = ns->ring;
    if (u == NULL)
        return 0;
    return (int)io_uring_sq_space_left((struct io_uring *)u->ring);
}

int be_uring_queue(struct bt_lane *l, struct bt_cmd *c, uint32_t idx)
{
    struct bt_ns *ns = c->ns;
    struct bt_uring *u = ns->ring;
    struct io_uring *ring = (struct io_uring *)u->ring;
    uint64_t ud = UD_LANE | ((uint64_t)idx << UD_SLOT_SHIFT)
                | ((uint64_t)(uintptr_t)l & UD_PTR_MASK);
    int nsqe = c->kind == IO_WRITE && c->fua ? 2 : 1;
    if ((int)io_uring_sq_space_left(ring) < nsqe)
        return -EBUSY;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    switch (c->kind) {
    case IO_READ:
        io_uring_prep_read(sqe, ns->fd, c->data, c->nbytes, ns->fd_offset + c->off);
        break;
    case IO_WRITE:
        io_uring_prep_write(sqe, ns->fd, c->data, c->nbytes, ns->fd_offset + c->off);
        if (c->fua) {
            /* as the uring bdev does for a FUA write on a device with a volatile
               cache: RWF_DSYNC on the write, then fdatasync once it is done */
            sqe->rw_flags = RWF_DSYNC;
            io_uring_sqe_set_flags(sqe, IOSQE_IO_LINK);
            io_uring_sqe_set_data64(sqe, ud);
            sqe = io_uring_get_sqe(ring);
            io_uring_prep_fsync(sqe, ns->fd, IORING_FSYNC_DATASYNC);
        }
        break;
    default:
        io_uring_prep_fsync(sqe, ns->fd, IORING_FSYNC_DATASYNC);
        break;
    }
    io_uring_sqe_set_data64(sqe, ud);
    u->queued += nsqe;
    u->inflight += nsqe;
    return 0;
}

int be_uring_submit(void *ring_ctx)
{
    struct bt_uring *u = ring_ctx;
    if (u->queued == 0)
        return 0;
    int rc = io_uring_submit((struct io_uring *)u->ring);
    if (rc >= 0)
        u->queued = 0;
    /* (on EAGAIN/EBUSY the SQEs stay in the ring; the next submit, Python's or ours,
       takes them) */
    return rc;
}

static void ready(struct bt_uring *u, struct bt_lane *l)
{
    if (!l->queued_ready) {
        l->queued_ready = 1;
        l->ready_on = u;
        l->next_ready = u->ready;
        u->ready = l;
    }
}

void be_uring_unready(struct bt_lane *l)
{
    if (!l->queued_ready)
        return;
    struct bt_lane **pp = &l->ready_on->ready;
    while (*pp != NULL && *pp != l)
        pp = &(*pp)->next_ready;
    if (*pp == l)
        *pp = l->next_ready;
    l->next_ready = NULL;
    l->queued_ready = 0;
}

#define REAP_LANES 32  /* distinct lanes answered per sweep (one send each) */

unsigned be_uring_reap_lanes(struct bt_uring *u, int *python)
{
    struct io_uring *ring = (struct io_uring *)u->ring;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0, nlanes = 0;
    struct bt_lane *lanes[REAP_LANES];
    io_uring_for_each_cqe(ring, head, cqe) {
        uint64_t d = cqe->user_data;
        if (!(d & UD_LANE)) {
            *python = 1;
            break;
        }
        struct bt_lane *l = (struct bt_lane *)(uintptr_t)(d & UD_PTR_MASK);
        uint32_t idx = (uint32_t)((d & ~UD_LANE) >> UD_SLOT_SHIFT);
        if (l->conn == NULL) {
            ready(u, l);  /* (a lane Python runs: Python's reap hands it over) */
            *python = 1;
        } else {
            unsigned i = 0;
            while (i < nlanes && lanes[i] != l)
                i++;
            if (i == nlanes) {
                if (nlanes == REAP_LANES)
                    break;  /* (the next sweep) */
                lanes[nlanes++] = l;
            }
        }
        seen++;
        u->inflight--;
        lane_io_done(l, idx, cqe->res);
    }
    if (seen)
        io_uring_cq_advance(ring, seen);
    /* a lent lane's replies go out once per sweep, and its connection is reported to
       Python after the poll (its counters); it joins no ready list of the ring */
    for (unsigned i = 0; i < nlanes; i++)
        net_lane_done(lanes[i]->conn);
    return seen;
}

unsigned bt_uring_reap(struct bt_uring *u, uint64_t *ud, int32_t *res, unsigned max,
                       void **ready_out, unsigned max_ready, unsigned *nready)
{
    struct io_uring *ring = (struct io_uring *)u->ring;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0, n = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max)
            break;
        uint64_t d = cqe->user_data;
        seen++;
        if (!(d & UD_LANE)) {
            ud[n] = d;
            res[n] = cqe->res;
            n++;
            continue;
        }
        struct bt_lane *l = (struct bt_lane *)(uintptr_t)(d & UD_PTR_MASK);
        uint32_t idx = (uint32_t)((d & ~UD_LANE) >> UD_SLOT_SHIFT);
        u->inflight--;
        lane_io_done(l, idx, cqe->res);
        ready(u, l);  /* (output, commands to redo, counters; or a closed lane's end) */
    }
    io_uring_cq_advance(ring, seen);
    unsigned k = 0;
    while (u->ready != NULL && k < max_ready) {
        struct bt_lane *l = u->ready;
        u->ready = l->next_ready;
        l->next_ready = NULL;
        l->queued_ready = 0;
        if (l->conn != NULL)
            net_lane_output(l->conn);  /* sent from here: no trip through Python */
        ready_out[k++] = l->handle;
    }
    *nready = k;
    return n;
}

#else /* no liburing at build time */

int bt_uring_available(void)
{
    return 0;
}

struct bt_uring *bt_uring_attach(void *ring)
{
    (void)ring;
    return NULL;
}

void bt_uring_detach(struct bt_uring *u)
{
    (void)u;
}

int be_uring_space(struct bt_ns *ns)
{
    (void)ns;
    return 0;
}

int be_uring_queue(struct bt_lane *l, struct bt_cmd *c, uint32_t idx)
{
    (void)l;
    (void)c;
    (void)idx;
    return -ENOSYS;
}

int be_uring_submit(void *ring_ctx)
{
    (void)ring_ctx;
    return 0;
}

void be_uring_unready(struct bt_lane *l)
{
    (void)l;
}

unsigned be_uring_reap_lanes(struct bt_uring *u, int *python)
{
    (void)u;
    (void)python;
    return 0;
}

unsigned bt_uring_reap(struct bt_uring *u, uint64_t *ud, int32_t *res, unsigned max,
                       void **ready_out, unsigned max_ready, unsigned *nready)
{
    (void)u;
    (void)ud;
    (void)res;
    (void)max;
    (void)ready_out;
    (void)max_ready;
    *nready = 0;
    return 0;
}

#endif
