/* A PCIe NVMe controller's I/O queues in C, on a thread of their own (fake_nvme_dev.c;
 * cfake_nvme.py builds it with cffi and reads this header's cdef section). */
#ifndef FAKE_NVME_DEV_H
#define FAKE_NVME_DEV_H

#include <stdint.h>

/* ---- cdef begin ---- */
struct fdev;

struct fdev_stats {
    uint64_t reads, writes, flushes, read_bytes, write_bytes;
    uint64_t completions;
    uint64_t dma_faults;     /* commands whose PRPs reached unmapped memory */
    uint64_t cq_full;        /* times a completion waited for the host's CQ head */
    uint64_t busy_passes;    /* the thread's passes that found commands */
    uint64_t naps;           /* the thread's sleeps, idle past its spin window */
    uint64_t sync_calls;     /* fdev_doorbell calls (the synchronous device's passes) */
    uint64_t sync_cpu_ns;    /* their CPU time, on the caller's thread (to subtract) */
    uint64_t interrupts;     /* eventfd signals of CQs created with IEN (MSI-X) */
};

/* A device over `bar` (the fake BAR's memory: doorbells at 0x1000, stride 4). Its thread,
   once started, spins for spin_ns after its last command, then sleeps sleep_ns at a time;
   latency_ns > 0 holds newly rung commands that long before executing them. */
struct fdev *fdev_new(uint32_t *bar, uint64_t spin_ns, uint64_t sleep_ns, uint64_t latency_ns);
int fdev_start(struct fdev *d);
void fdev_stop(struct fdev *d);
void fdev_free(struct fdev *d);
/* One pass from the caller's thread (no device thread): commands executed. */
int fdev_service(struct fdev *d);
/* The synchronous device: one pass right at a doorbell write, on the writer's thread
   (bt_nvmeq's db_hook, ctx the struct fdev), its CPU time added to sync_cpu_ns. */
void fdev_doorbell(void *ctx);
/* 1 when every command the doorbells announced has been completed. */
int fdev_idle(struct fdev *d);
/* The fake IOMMU's table: IOVA range -> our memory. 0 / -ENOSPC. */
int fdev_map(struct fdev *d, uint64_t iova, unsigned char *va, uint64_t size);
void fdev_unmap(struct fdev *d, uint64_t iova);
/* Namespace `nsid`'s contents: blocks * block_size bytes at data. */
int fdev_set_ns(struct fdev *d, uint32_t nsid, unsigned char *data, uint64_t blocks,
                uint32_t block_size);
/* I/O queues as the admin queue created them (rings at IOVAs already mapped). */
int fdev_add_cq(struct fdev *d, uint16_t qid, uint64_t iova, uint16_t size);
/* The CQ raises its interrupt: `fd` (an eventfd, the MSI-X vector's) is signalled after
   each pass that posted to it; -1: none. */
int fdev_set_cq_irq(struct fdev *d, uint16_t qid, int fd);
int fdev_add_sq(struct fdev *d, uint16_t qid, uint64_t iova, uint16_t size, uint16_t cqid);
void fdev_del_q(struct fdev *d, uint16_t qid, int cq);
/* The controller was disabled: every I/O queue is gone. */
void fdev_reset(struct fdev *d);
void fdev_stats(struct fdev *d, struct fdev_stats *out);
/* CPU ns of the device's threads, those running and those ended. */
uint64_t fdev_thread_cpu_ns(struct fdev *d);
/* ---- cdef end ---- */

#endif
