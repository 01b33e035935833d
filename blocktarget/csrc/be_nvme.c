/* The lane's NVMe PCIe backend: a reactor's hardware queue pair (made and owned by
 * nvme/driver, bdevs/nvme_pcie.py) driven from C. bt_nvme.h says how the lane and the
 * Python path share it.
 *
 * A lane command is one NVMe command whose data lies in one of the queue's DMA buffers
 * (a pool of its own, given by Python, each with its PRP list precomputed, a page of
 * headroom before the data and room after it): reads are sent to the host from that
 * buffer with their C2HData header built in the headroom, write data is received or
 * copied into it once. The SQE is written at the tail, the doorbell once per lane call;
 * completions are found by their phase bit and finished in any order. Whatever does not
 * succeed (a status other than success, a lost queue) goes back to the Python path.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bt_lane.h"
#include "bt_net.h"
#include "bt_nvme.h"
#include "lane_int.h"

#define NVME_SQE 64
#define NVME_CQE 16
#define NVME_PAGE 4096u
#define OPC_FLUSH 0x00
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define CDW12_FUA (1u << 30)

struct bt_nvme_buf {
    struct bt_nvmeq *q;
    unsigned char *data;
    uint64_t iova;
    uint64_t prp_list;
    struct bt_nvme_buf *next;
};

struct nvme_cmd {            /* one lane command id */
    struct bt_lane *l;       /* NULL: free */
    uint32_t idx;            /* the lane's slot */
    uint8_t aborting;
    uint64_t start_ns;
};

struct nvme_priv {
    struct nvme_cmd *cmds;   /* by cid - cid0 */
    uint16_t *free_cids;
    uint32_t nfree;
    struct bt_nvme_buf **all;
    struct bt_nvme_buf *pool;
    uint32_t cap_all;
    uint8_t gone;            /* bt_nvmeq_free was called: free once bufs_out is 0 */
};

static inline struct nvme_priv *priv(const struct bt_nvmeq *q)
{
    return (struct nvme_priv *)q->priv;
}

uint64_t bt_now_ns(void)
{
    return lane_now_ns();
}

struct bt_nvmeq *bt_nvmeq_new(uint16_t depth, uint16_t cid0, uint32_t max_transfer)
{
    if (depth < 2 || cid0 > depth - 1)
        return NULL;
    struct bt_nvmeq *q = calloc(1, sizeof(*q));
    struct nvme_priv *p = calloc(1, sizeof(*p));
    uint32_t n = (uint32_t)(depth - 1 - cid0);
    if (q == NULL || p == NULL)
        goto fail;
    p->cmds = calloc(n ? n : 1, sizeof(*p->cmds));
    p->free_cids = calloc(n ? n : 1, sizeof(*p->free_cids));
    if (p->cmds == NULL || p->free_cids == NULL)
        goto fail;
    for (uint32_t i = 0; i < n; i++)  /* (the lowest id first, as Python takes its own) */
        p->free_cids[i] = (uint16_t)(depth - 2 - i);
    p->nfree = n;
    q->depth = depth;
    q->cid0 = cid0;
    q->phase = 1;
    q->irq_efd = -1;
    q->max_transfer = max_transfer;
    q->priv = p;
    return q;
fail:
    if (p != NULL) {
        free(p->cmds);
        free(p->free_cids);
    }
    free(p);
    free(q);
    return NULL;
}

int bt_nvmeq_add_buf(struct bt_nvmeq *q, unsigned char *data, uint64_t iova, uint64_t prp_list)
{
    struct nvme_priv *p = priv(q);
    if (q->bufs == p->cap_all) {
        uint32_t cap = p->cap_all ? p->cap_all * 2 : 16;
        struct bt_nvme_buf **all = realloc(p->all, cap * sizeof(*all));
        if (all == NULL)
            return -ENOMEM;
        p->all = all;
        p->cap_all = cap;
    }
    struct bt_nvme_buf *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return -ENOMEM;
    b->q = q;
    b->data = data;
    b->iova = iova;
    b->prp_list = prp_list;
    b->next = p->pool;
    p->pool = b;
    p->all[q->bufs++] = b;
    return 0;
}

static void destroy(struct bt_nvmeq *q)
{
    struct nvme_priv *p = priv(q);
    for (uint32_t i = 0; i < q->bufs; i++)
        free(p->all[i]);
    free(p->all);
    free(p->cmds);
    free(p->free_cids);
    free(p);
    free(q);
}

void bt_nvmeq_free(struct bt_nvmeq *q)
{
    if (q == NULL)
        return;
    struct nvme_priv *p = priv(q);
    q->dead = 1;
    p->gone = 1;
    /* (a lane may still be on the ready list: Python drains it before freeing) */
    if (q->bufs_out == 0)
        destroy(q);
}

struct bt_nvme_buf *be_nvme_buf_get(struct bt_nvmeq *q)
{
    struct nvme_priv *p = priv(q);
    struct bt_nvme_buf *b = p->pool;
    if (b == NULL || q->dead)
        return NULL;
    p->pool = b->next;
    b->next = NULL;
    q->bufs_out++;
    return b;
}

unsigned char *be_nvme_buf_data(struct bt_nvme_buf *b)
{
    return b->data;
}

void be_nvme_buf_release(struct bt_nvme_buf *b)
{
    struct bt_nvmeq *q = b->q;
    struct nvme_priv *p = priv(q);
    b->next = p->pool;
    p->pool = b;
    if (--q->bufs_out == 0 && p->gone)
        destroy(q);
}

void bt_nvme_buf_put(void *buf)
{
    /* (called where the socket's last view of the buffer goes: the reactor's thread,
       which owns the queue pair) */
    be_nvme_buf_release((struct bt_nvme_buf *)buf);
}

int be_nvme_space(struct bt_ns *ns)
{
    struct bt_nvmeq *q = ns->nvmeq;
    if (q == NULL || q->dead || q->suspended)
        return 0;
    return (int)priv(q)->nfree;
}

/* the next SQ entry: the caller fills it */
static unsigned char *sq_slot(struct bt_nvmeq *q)
{
    unsigned char *e = q->sq + (size_t)q->sq_tail * NVME_SQE;
    q->sq_tail = (uint16_t)(q->sq_tail + 1 == q->depth ? 0 : q->sq_tail + 1);
    q->sq_dirty = 1;
    return e;
}

void bt_nvmeq_push(struct bt_nvmeq *q, const unsigned char *sqe)
{
    memcpy(sq_slot(q), sqe, NVME_SQE);
}

void bt_nvmeq_ring(struct bt_nvmeq *q)
{
    if (!q->sq_dirty || q->suspended || q->dead)
        return;
    q->sq_dirty = 0;
    /* the entries must be in memory before the device hears of them */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile uint32_t *)q->sq_db = q->sq_tail;
    q->doorbells++;
    if (q->db_hook != NULL)  /* (bt_nvme.h: a device model's, never in production) */
        q->db_hook(q->db_hook_ctx);
}

void be_nvme_submit(struct bt_nvmeq *q)
{
    bt_nvmeq_ring(q);
}

static inline void put64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static inline void put32(unsigned char *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

int be_nvme_queue(struct bt_lane *l, struct bt_cmd *c, uint32_t idx)
{
    struct bt_ns *ns = c->ns;
    struct bt_nvmeq *q = ns->nvmeq;
    struct nvme_priv *p = priv(q);
    if (q->dead || q->suspended || p->nfree == 0)
        return -EBUSY;
    if (c->kind != IO_FLUSH && (c->dma == NULL || c->nbytes > q->max_transfer))
        return -EINVAL;  /* (the lane only sends data that lies in the pool) */
    uint16_t cid = p->free_cids[--p->nfree];
    struct nvme_cmd *k = &p->cmds[cid - q->cid0];
    k->l = l;
    k->idx = idx;
    k->aborting = 0;
    k->start_ns = c->start_ns;
    unsigned char *e = sq_slot(q);
    memset(e, 0, NVME_SQE);
    st16(e + 2, cid);
    put32(e + 4, ns->hw_nsid);         /* (flags 0: PRPs) */
    if (c->kind == IO_FLUSH) {
        e[0] = OPC_FLUSH;
        q->lane_flushes++;
    } else {
        struct bt_nvme_buf *b = c->dma;
        uint64_t lba = (ns->fd_offset + c->off) / ns->block_size;
        uint32_t nlb = c->nbytes / ns->block_size;
        e[0] = c->kind == IO_READ ? OPC_READ : OPC_WRITE;
        put64(e + 24, b->iova);
        /* PRP2 as nvme/driver/ctrlr.buffer_prps chooses it: none, the second page, or
           the buffer's list of the pages after the first */
        put64(e + 32, c->nbytes <= NVME_PAGE ? 0
                      : c->nbytes <= 2 * NVME_PAGE ? b->iova + NVME_PAGE : b->prp_list);
        put32(e + 40, (uint32_t)lba);
        put32(e + 44, (uint32_t)(lba >> 32));
        /* the host's FUA bit passes through, as NvmeChannel passes it. (The Python
           path's io.write also follows a FUA write on a bdev with a volatile cache by a
           Flush of the bdev; on NVMe the FUA bit alone makes the write durable, so the
           lane sends none, and counts the flush in the bdev's statistics as that path
           does. Likewise a Flush goes to the device even without a volatile cache,
           where NvmeChannel answers it at once: a no-op for the device either way.) */
        put32(e + 48, (nlb - 1) | (c->kind == IO_WRITE ? ld32(c->sqe + 48) & CDW12_FUA : 0));
        if (c->kind == IO_READ)
            q->lane_reads++;
        else
            q->lane_writes++;
    }
    q->lane_inflight++;
    return 0;
}

static void ready(struct bt_nvmeq *q, struct bt_lane *l)
{
    if (!l->nvme_queued) {
        l->nvme_queued = 1;
        l->nvme_ready_on = q;
        l->nvme_next = q->ready;
        q->ready = l;
    }
}

void be_nvme_unready(struct bt_lane *l)
{
    if (!l->nvme_queued)
        return;
    struct bt_lane **pp = &l->nvme_ready_on->ready;
    while (*pp != NULL && *pp != l)
        pp = &(*pp)->nvme_next;
    if (*pp == l)
        *pp = l->nvme_next;
    l->nvme_next = NULL;
    l->nvme_queued = 0;
}

/* the lane's command `cid` is done (ok: success at the device); its lane, or NULL */
static struct bt_lane *complete(struct bt_nvmeq *q, uint16_t cid, int ok, uint64_t now)
{
    struct nvme_priv *p = priv(q);
    struct nvme_cmd *k = &p->cmds[cid - q->cid0];
    struct bt_lane *l = k->l;
    if (l == NULL)
        return NULL;  /* (no such command: a stray completion is ignored, as Python does) */
    uint32_t idx = k->idx;
    k->l = NULL;
    p->free_cids[p->nfree++] = cid;
    q->lane_inflight--;
    q->lane_reaped++;
    struct bt_cmd *s = &l->slot[idx];
    int32_t res = !ok ? -EIO : s->kind == IO_FLUSH ? 0 : (int32_t)s->nbytes;
    lane_io_done_at(l, idx, res, now);
    return l;
}

/* the same, the lane told through the queue's ready list (Python drains it) */
static void finish(struct bt_nvmeq *q, uint16_t cid, int ok, uint64_t now)
{
    struct bt_lane *l = complete(q, cid, ok, now);
    if (l != NULL)
        ready(q, l);
}

/* the entry at the CQ head if the device has posted it (its status word), else -1 */
static inline int cq_peek(const struct bt_nvmeq *q, const unsigned char **entry)
{
    const unsigned char *e = q->cq + (size_t)q->cq_head * NVME_CQE;
    uint16_t st = *(volatile const uint16_t *)(e + 14);
    if ((st & 1) != q->phase)
        return -1;
    /* the rest of the entry is read only after its phase bit said it is new */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    *entry = e;
    return st;
}

static inline void cq_advance(struct bt_nvmeq *q, const unsigned char *e)
{
    q->sq_head = ld16(e + 8);
    if (++q->cq_head == q->depth) {
        q->cq_head = 0;
        q->phase ^= 1;
    }
}

#define SWEEP_LANES 32  /* distinct lanes answered per sweep (one send each) */

unsigned be_nvme_reap_lanes(struct bt_nvmeq *q, int *python)
{
    if (q->suspended || q->dead)
        return 0;  /* (a reset or a removal: Python's, until resume) */
    bt_nvmeq_ring(q);
    struct bt_lane *lanes[SWEEP_LANES];
    unsigned seen = 0, nlanes = 0;
    const unsigned char *e;
    int st;
    uint64_t now = 0;  /* (read once, at the first entry found) */
    while ((st = cq_peek(q, &e)) >= 0) {
        uint16_t cid = ld16(e + 12);
        struct bt_lane *l = NULL;
        if (cid >= q->cid0 && cid < q->depth - 1) {
            l = priv(q)->cmds[cid - q->cid0].l;
            if (l != NULL && l->conn == NULL) {
                *python = 1;  /* (a lane Python runs, or a closed one: Python's reap) */
                break;
            }
        } else {
            *python = 1;      /* the Python path's own command */
            break;
        }
        if (l != NULL) {
            unsigned i = 0;
            while (i < nlanes && lanes[i] != l)
                i++;
            if (i == nlanes) {
                if (nlanes == SWEEP_LANES)
                    break;  /* (the next sweep) */
                lanes[nlanes++] = l;
            }
        }
        cq_advance(q, e);
        seen++;
        if (l != NULL) {
            if (!now)
                now = lane_now_ns();
            complete(q, cid, (st >> 1) == 0, now);
            q->c_reaped++;
        }
    }
    if (seen)
        *(volatile uint32_t *)q->cq_db = q->cq_head;
    /* each lane's replies go out once per sweep; a command to redo gives the socket
       back (net_lane_done), and the connection is reported to Python after the poll */
    for (unsigned i = 0; i < nlanes; i++)
        if (lanes[i]->conn != NULL)
            net_lane_done(lanes[i]->conn);
    return seen;
}

unsigned bt_nvmeq_reap(struct bt_nvmeq *q, uint16_t *cids, uint16_t *status, uint32_t *dw0,
                       unsigned max)
{
    unsigned n = 0;
    uint16_t head = q->cq_head;
    uint8_t phase = q->phase;
    int moved = 0;
    uint64_t now = 0;  /* (read once, at the lane's first entry) */
    while (n < max) {
        const unsigned char *e = q->cq + (size_t)head * NVME_CQE;
        uint16_t st = *(volatile const uint16_t *)(e + 14);
        if ((st & 1) != phase)
            break;
        /* the rest of the entry is read only after its phase bit said it is new */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint16_t cid = ld16(e + 12);
        q->sq_head = ld16(e + 8);
        head = (uint16_t)(head + 1);
        if (head == q->depth) {
            head = 0;
            phase ^= 1;
        }
        moved = 1;
        if (cid >= q->cid0 && cid < q->depth - 1) {
            if (!now)
                now = lane_now_ns();
            finish(q, cid, (st >> 1) == 0, now);
            continue;
        }
        cids[n] = cid;
        status[n] = (uint16_t)(st >> 1);
        dw0[n] = ld32(e);
        n++;
    }
    if (moved) {
        q->cq_head = head;
        q->phase = phase;
        if (!q->suspended && !q->dead)  /* (a suspended queue may be gone on the device) */
            *(volatile uint32_t *)q->cq_db = head;
    }
    return n;
}

unsigned bt_nvmeq_ready(struct bt_nvmeq *q, void **ready_out, unsigned max)
{
    unsigned k = 0;
    while (q->ready != NULL && k < max) {
        struct bt_lane *l = q->ready;
        q->ready = l->nvme_next;
        l->nvme_next = NULL;
        l->nvme_queued = 0;
        ready_out[k++] = l->handle;
    }
    return k;
}

unsigned bt_nvmeq_reinit(struct bt_nvmeq *q)
{
    struct nvme_priv *p = priv(q);
    unsigned n = 0;
    for (uint32_t i = 0; i + q->cid0 < (uint32_t)q->depth - 1; i++)
        if (p->cmds[i].l != NULL) {
            finish(q, (uint16_t)(q->cid0 + i), 0, lane_now_ns());
            n++;
        }
    memset(q->sq, 0, (size_t)q->depth * NVME_SQE);
    memset(q->cq, 0, (size_t)q->depth * NVME_CQE);
    q->sq_tail = q->cq_head = q->sq_head = 0;
    q->phase = 1;
    q->sq_dirty = 0;
    return n;
}

unsigned bt_nvmeq_expired(struct bt_nvmeq *q, uint64_t before_ns, uint16_t *cids,
                          uint8_t *aborting, unsigned max)
{
    struct nvme_priv *p = priv(q);
    unsigned n = 0;
    if (q->lane_inflight == 0)
        return 0;
    for (uint32_t i = 0; i + q->cid0 < (uint32_t)q->depth - 1 && n < max; i++) {
        struct nvme_cmd *k = &p->cmds[i];
        if (k->l != NULL && k->start_ns < before_ns) {
            cids[n] = (uint16_t)(q->cid0 + i);
            aborting[n] = k->aborting;
            n++;
        }
    }
    return n;
}

void bt_nvmeq_aborting(struct bt_nvmeq *q, uint16_t cid)
{
    if (cid < q->cid0 || cid >= q->depth - 1)
        return;
    struct nvme_cmd *k = &priv(q)->cmds[cid - q->cid0];
    if (k->l != NULL) {
        k->aborting = 1;
        k->start_ns = lane_now_ns();
    }
}
