/* Inside the lane: what lane.c shares with its backends (be_*.c). Not part of the cdef
 * (the name does not start with bt_): Python never sees these. */
#ifndef BT_LANE_INT_H
#define BT_LANE_INT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bt_lane.h"

#define SQE_LEN 64
/* user_data of a lane command's SQE: this bit, the slot index (15 bits), the lane's
   address (48 bits): slots may move when the table grows, the lane never does */
#define UD_LANE (1ull << 63)
#define UD_SLOT_SHIFT 48
#define UD_SLOTS (1u << 15)
#define UD_PTR_MASK ((1ull << UD_SLOT_SHIFT) - 1)

enum slot_state {
    SLOT_FREE = 0,
    SLOT_DATA,   /* a write waiting for its H2CData */
    SLOT_IO,     /* at an asynchronous backend */
    SLOT_REDO    /* did not succeed in the lane: the Python path does it again */
};

enum io_kind { IO_READ = 0, IO_WRITE = 1, IO_FLUSH = 2 };

struct bt_cmd {
    uint8_t state;
    uint8_t kind;               /* enum io_kind, once at a backend */
    uint8_t fua;
    uint8_t cqes;               /* completions still due from the backend */
    uint8_t bad;                /* one of them did not do all it should */
    uint8_t held;               /* the data is counted in the reactor's budget */
    uint8_t corrupt;            /* some of its H2CData failed the data digest */
    uint16_t cid;
    uint32_t seq;               /* uses of this slot: tells the stall watch apart reuses */
    struct bt_ns *ns;           /* (the table stays while the lane has commands) */
    uint64_t off;               /* byte offset in the namespace */
    uint32_t nbytes;
    uint32_t received;          /* H2CData bytes in so far */
    unsigned char *data;        /* the transfer's buffer (aligned for O_DIRECT), */
    unsigned char *base;        /* the allocation it lies in (headroom before a read), */
    uint32_t cap;               /* its size (small ones stay with the slot) */
    uint64_t start_ns;
    struct bt_nvme_buf *dma;    /* BT_BE_NVME: the DMA buffer `data` lies in (or NULL) */
    struct bt_lvmap *lv;        /* a volume's map this I/O holds (let go when it leaves
                                   SLOT_IO) */
    unsigned char sqe[SQE_LEN]; /* for bt_lane_adopt and redo */
};

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

uint64_t lane_now_ns(void);
/* a backend finished slot `idx` of lane l with result res (bytes done or -errno) */
void lane_io_done(struct bt_lane *l, uint32_t idx, int32_t res);
/* the same, at `now` (lane_now_ns() read once for all the completions a sweep found:
   they were found together) */
void lane_io_done_at(struct bt_lane *l, uint32_t idx, int32_t res, uint64_t now);

/* the io_uring backend (be_uring.c): how many SQEs the ring can take now; queue the
   slot's I/O (two linked SQEs for a FUA write: the write, then fdatasync); submit what
   was queued. 0 / -errno. */
int be_uring_space(struct bt_ns *ns);
int be_uring_queue(struct bt_lane *l, struct bt_cmd *c, uint32_t idx);
int be_uring_submit(void *ring_ctx);
/* take a lane Python let go of off its ring's ready list */
void be_uring_unready(struct bt_lane *l);
/* reap the lanes' completions at the head of the ring, up to the first of Python's
   (*python set: one is waiting, or a lane Python runs got one: it joined the ready
   list, which Python's reap hands over); lent lanes' replies are sent */
unsigned be_uring_reap_lanes(struct bt_uring *u, int *python);

/* the NVMe backend (be_nvme.c): lane command ids free on the queue pair (0 while it is
   suspended or gone); a DMA buffer from its pool (NULL: none free) and its data; write
   the slot's SQE at the tail (0 / -errno); ring the SQ doorbell for what was written;
   take a freed lane off its ready list. */
struct bt_nvme_buf;
int be_nvme_space(struct bt_ns *ns);
struct bt_nvme_buf *be_nvme_buf_get(struct bt_nvmeq *q);
unsigned char *be_nvme_buf_data(struct bt_nvme_buf *b);
void be_nvme_buf_release(struct bt_nvme_buf *b);
int be_nvme_queue(struct bt_lane *l, struct bt_cmd *c, uint32_t idx);
void be_nvme_submit(struct bt_nvmeq *q);
void be_nvme_unready(struct bt_lane *l);
/* the reactor's C poller's sweep of a queue pair (net.c): pending doorbells rung, the
   completions of lent lanes finished and their replies sent; stops at the first entry
   Python must see (*python = 1), leaving it in the CQ. Returns the entries consumed. */
unsigned be_nvme_reap_lanes(struct bt_nvmeq *q, int *python);

/* A piece of output sent (or dropped): its owner goes back where it came from, a DMA
   buffer to its queue pair's pool (a zero-copy NVMe read), anything else to the heap. */
static inline void chunk_release(const struct bt_chunk *ch)
{
    if (ch->dma)
        be_nvme_buf_release((struct bt_nvme_buf *)ch->owner);
    else
        free(ch->owner);
}

#endif
