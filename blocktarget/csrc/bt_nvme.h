/* The lane's NVMe PCIe backend (be_nvme.c): one I/O queue pair of a controller driven by
 * our user-space driver (nvme/driver), shared by the lane and the Python path.
 *
 * How the two paths share one SQ/CQ on one reactor: the ring state (SQ tail, CQ head,
 * phase, the dirty SQ doorbell) lives only here, in struct bt_nvmeq, and both paths
 * move it through these calls (nvme/driver/qpair.py's QueuePair does when its `cring` is
 * set); both run on the reactor's thread, one at a time, so nothing else is needed.
 * Command ids are partitioned: 0 .. cid0 - 1 are the Python path's (its trackers, its
 * waiting queue, its timeouts and resubmission after a reset), cid0 .. depth - 2 the
 * lane's. Together they never exceed depth - 1 commands, so neither ring overflows,
 * whoever submits.
 *
 * Who may move the CQ head and phase, and when: only code running on the queue's
 * reactor thread, through bt_nvmeq_reap (the Python poller's turn: every entry; the
 * lane's finished in C, the Python path's handed to it) or be_nvme_reap_lanes (the
 * reactor's C socket poller, net.c, when the queue is registered with it: only the
 * completions of lanes whose socket is lent to that poller, in ring order, stopping at
 * the first entry that is anyone else's). Both run on that one thread, so they never
 * overlap; the C poller stops rather than skip, so entries are consumed in order and the
 * head doorbell written by whoever consumed last is right. While the queue is suspended
 * (a reset) or dead, the C poller does not touch it at all: bt_nvmeq_reinit and the
 * Python path own it until resume.
 */
#ifndef BT_NVME_H
#define BT_NVME_H

#include <stdint.h>

#include "bt_lane.h"

/* ---- cdef begin ---- */

struct bt_nvme_buf;          /* a DMA buffer of the lane's pool (be_nvme.c) */

struct bt_nvmeq {
    unsigned char *sq;       /* the SQ ring: depth entries of 64 bytes, in DMA memory */
    unsigned char *cq;       /* the CQ ring: depth entries of 16 bytes */
    uint32_t *sq_db;         /* the SQ tail doorbell, in the BAR's mapping */
    uint32_t *cq_db;         /* the CQ head doorbell */
    uint16_t depth;
    uint16_t cid0;           /* command ids from cid0 to depth - 2 are the lane's */
    uint16_t sq_tail;
    uint16_t cq_head;
    uint16_t sq_head;        /* as the last CQE reported it */
    uint8_t phase;
    uint8_t sq_dirty;        /* SQEs written since the SQ doorbell was last written */
    uint8_t suspended;       /* the controller is being reset: no doorbell, nothing new */
    uint8_t dead;            /* the queue failed or is going away: the lane starts nothing */
    uint32_t max_transfer;   /* the largest transfer of one command (MDTS, pool buffers) */
    uint32_t lane_inflight;  /* the lane's commands at the device */
    uint32_t bufs_out;       /* pool buffers not in the pool (at commands, at the socket) */
    uint32_t bufs;           /* pool buffers in all */
    uint64_t lane_reads, lane_writes, lane_flushes;  /* submitted by the lane (cumulative) */
    uint64_t doorbells;      /* SQ doorbell writes, either path's */
    uint64_t lane_reaped;    /* the lane's completions consumed (cumulative; either reaper) */
    uint64_t c_reaped;       /* of those, by the reactor's C poller (net.c) */
    struct bt_lane *ready;   /* lanes with completions Python has not seen */
    /* The eventfd the CQ's MSI-X vector signals, or -1 (polled: IEN=0). Set by Python
       before the queue joins a C poller, which then sleeps on it (net.c). */
    int irq_efd;
    void *priv;              /* be_nvme.c's */
    /* A measurement and test hook, NULL in production (one predictable branch per
       doorbell): called with db_hook_ctx right after the SQ tail doorbell is written,
       on the thread that wrote it. A device model that completes the commands in it
       (tests/unit/fake_nvme_dev.c, fdev_doorbell) stands for an SSD done within the C
       poller's sweep: its completions are reaped in the call that submitted them, as
       no device on a thread of its own can promise on a shared CPU. */
    void (*db_hook)(void *ctx);
    void *db_hook_ctx;
};

/* A queue pair of `depth` entries whose command ids from cid0 up are the lane's, or NULL
   (out of memory). The rings and doorbells are set by the caller. */
struct bt_nvmeq *bt_nvmeq_new(uint16_t depth, uint16_t cid0, uint32_t max_transfer);
/* Give the lane's pool a DMA buffer: `data` (max_transfer bytes, page aligned, with a page
   before it for a C2HData header and room after it for a digest) at `iova`, its PRP list
   (the pages after the first, precomputed in DMA memory) at prp_list. 0 / -ENOMEM. */
int bt_nvmeq_add_buf(struct bt_nvmeq *q, unsigned char *data, uint64_t iova, uint64_t prp_list);
/* The queue pair is gone (its lane commands finished or handed back); its memory goes
   once the last buffer lent to a socket comes back. */
void bt_nvmeq_free(struct bt_nvmeq *q);
/* The Python path's command: its 64 bytes at the SQ tail (doorbell pending). */
void bt_nvmeq_push(struct bt_nvmeq *q, const unsigned char *sqe);
/* Write the SQ tail doorbell if anything was written since (not while suspended). */
void bt_nvmeq_ring(struct bt_nvmeq *q);
/* Reap up to max completions: the lane's are finished in C; the Python path's (cid,
   15-bit status, dw0) go to the arrays (the return value says how many). Writes the CQ
   head doorbell once. Lanes with new output or commands to redo: see bt_nvmeq_ready. */
unsigned bt_nvmeq_reap(struct bt_nvmeq *q, uint16_t *cids, uint16_t *status, uint32_t *dw0,
                       unsigned max);
/* Lanes with completions Python has not seen: up to max handles; the rest stay. */
unsigned bt_nvmeq_ready(struct bt_nvmeq *q, void **ready, unsigned max);
/* The controller lost the queue (reset: disabled with the CQ reaped; or removed): the
   lane's commands still at it go back to the Python path (redo), and the rings start
   again empty, phase 1. Returns how many went back. */
unsigned bt_nvmeq_reinit(struct bt_nvmeq *q);
/* The lane's commands submitted before `before_ns` (CLOCK_MONOTONIC): up to max of
   their command ids, and whether an Abort was already sent for each. */
unsigned bt_nvmeq_expired(struct bt_nvmeq *q, uint64_t before_ns, uint16_t *cids,
                          uint8_t *aborting, unsigned max);
/* An Abort was sent for the lane's command `cid`: its clock starts again. */
void bt_nvmeq_aborting(struct bt_nvmeq *q, uint16_t cid);
/* A DMA buffer the socket is done with (a bt_chunk with dma set). */
void bt_nvme_buf_put(void *buf);
/* CLOCK_MONOTONIC in ns, the clock of bt_nvmeq_expired. */
uint64_t bt_now_ns(void);

/* ---- cdef end ---- */

#endif
