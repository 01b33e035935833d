"""cffi build script (API mode) for `blocktarget._uring`, the io_uring glue of the uring bdev.

Built at install time by setuptools (`cffi_modules` in setup.py) against Debian's
liburing-dev. API mode rather than ABI mode because most of liburing is `static inline`
(io_uring_get_sqe, the prep helpers, the CQ ring accessors): there is no symbol to dlopen.

The C side is a handful of coarse helpers instead of the raw liburing API so that one
Python call does one whole step (get an SQE, prepare it, tag it; or reap a batch of CQEs
into two arrays): every crossing from Python to C costs more than the C work itself.

The extension is optional: when liburing-dev is missing the compile fails, setuptools
skips the extension with a warning (`optional=True`), the install succeeds, and the uring
bdev says at create time why it cannot use io_uring (the "threads" engine still works).
"""

from __future__ import annotations

from cffi import FFI

CDEF = r"""
struct io_uring;

#define IORING_FSYNC_DATASYNC ...
#define IORING_SETUP_SQPOLL ...
#define IORING_OP_READ ...
#define IORING_OP_WRITE ...
#define IORING_OP_FSYNC ...
#define IORING_OP_FALLOCATE ...
#define RWF_DSYNC ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...

/* a new ring, or NULL with *err = -errno */
struct io_uring *bt_ring_new(unsigned entries, unsigned flags, int *err);
void bt_ring_free(struct io_uring *ring);
int bt_ring_register_eventfd(struct io_uring *ring, int efd);
/* 1 if the kernel supports opcode op on this ring, 0 if not, -errno if it cannot say */
int bt_ring_op_supported(struct io_uring *ring, int op);
unsigned bt_ring_sq_space(struct io_uring *ring);
unsigned bt_ring_cq_ready(struct io_uring *ring);

/* prepare one SQE tagged with ud; -EBUSY when the SQ ring is full (submit, then retry) */
int bt_prep_rw(struct io_uring *ring, int write, int fd, void *buf, unsigned len,
               uint64_t off, int rw_flags, uint64_t ud);
int bt_prep_fsync(struct io_uring *ring, int fd, unsigned flags, uint64_t ud);
int bt_prep_fallocate(struct io_uring *ring, int fd, int mode, uint64_t off, uint64_t len,
                      uint64_t ud);

int bt_submit(struct io_uring *ring);
int bt_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
/* copy up to max ready completions into ud/res and consume them; returns the count */
unsigned bt_reap(struct io_uring *ring, uint64_t *ud, int32_t *res, unsigned max);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <linux/falloc.h>
#include <liburing.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

static struct io_uring *bt_ring_new(unsigned entries, unsigned flags, int *err)
{
    struct io_uring *ring = calloc(1, sizeof(*ring));
    if (!ring) {
        *err = -ENOMEM;
        return NULL;
    }
    int r = -EINVAL;
#ifdef IORING_SETUP_COOP_TASKRUN
    /* The kernel finishes a request punted to io-wq (tmpfs, buffered writes) by task
       work on the submitting thread, the reactor. Without COOP_TASKRUN it interrupts
       the reactor with an IPI for each such completion (most of uring-shm's extra CPU
       per command in bench/hotpath.py --socket: bench/RESULTS.md); with it the work
       waits for the reactor's next system call, which its loop and C poller make every
       turn (a sleeping reactor is still woken). SQPOLL rejects the flag; kernels
       before 5.19 do not know it: then the ring is made as before. */
    if (!(flags & IORING_SETUP_SQPOLL))
        r = io_uring_queue_init(entries, ring, flags | IORING_SETUP_COOP_TASKRUN);
    if (r == -EINVAL)
#endif
        r = io_uring_queue_init(entries, ring, flags);
    if (r < 0) {
        free(ring);
        *err = r;
        return NULL;
    }
    *err = 0;
    return ring;
}

static void bt_ring_free(struct io_uring *ring)
{
    io_uring_queue_exit(ring);
    free(ring);
}

static int bt_ring_register_eventfd(struct io_uring *ring, int efd)
{
    return io_uring_register_eventfd(ring, efd);
}

static int bt_ring_op_supported(struct io_uring *ring, int op)
{
    struct io_uring_probe *p = io_uring_get_probe_ring(ring);
    if (!p)
        return -EOPNOTSUPP;
    int ok = io_uring_opcode_supported(p, op);
    io_uring_free_probe(p);
    return ok ? 1 : 0;
}

static unsigned bt_ring_sq_space(struct io_uring *ring)
{
    return io_uring_sq_space_left(ring);
}

static unsigned bt_ring_cq_ready(struct io_uring *ring)
{
    return io_uring_cq_ready(ring);
}

static int bt_prep_rw(struct io_uring *ring, int write, int fd, void *buf, unsigned len,
                      uint64_t off, int rw_flags, uint64_t ud)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    if (write)
        io_uring_prep_write(sqe, fd, buf, len, off);
    else
        io_uring_prep_read(sqe, fd, buf, len, off);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int bt_prep_fsync(struct io_uring *ring, int fd, unsigned flags, uint64_t ud)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_fsync(sqe, fd, flags);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int bt_prep_fallocate(struct io_uring *ring, int fd, int mode, uint64_t off,
                             uint64_t len, uint64_t ud)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_fallocate(sqe, fd, mode, off, len);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

static int bt_submit(struct io_uring *ring)
{
    return io_uring_submit(ring);
}

static int bt_submit_and_wait(struct io_uring *ring, unsigned wait_nr)
{
    return io_uring_submit_and_wait(ring, wait_nr);
}

static unsigned bt_reap(struct io_uring *ring, uint64_t *ud, int32_t *res, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max)
            break;
        ud[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(ring, n);
    return n;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "blocktarget._uring",
    SOURCE,
    libraries=["uring"],
    # a missing liburing-dev must not fail `pip install`; the bdev reports it at create time
    optional=True,
)

if __name__ == "__main__":  # `python blocktarget/_uring_build.py` builds it in place
    ffibuilder.compile(verbose=True)
