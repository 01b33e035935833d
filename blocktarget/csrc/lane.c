/* The lane's command path: whole receive buffers of NVMe/TCP capsules and H2CData
 * executed in C.
 *
 * The rule that keeps it honest: the lane only does what the Python path (nvme/qpair.py,
 * dispatch, nvme/io.py) would do for the same bytes, and only when the outcome is
 * success. At the first PDU it does not take (any other PDU or opcode, any field that
 * would produce an error status or a transport error, a digest that does not match, an
 * incomplete PDU, a namespace it has no backend for, a budget it may not take, a full
 * ring) it stops, and the Python path handles the rest of the buffer: every error and
 * every rare case lives there, once. tests/unit/test_fastpath.py feeds the same byte
 * streams to queue pairs with and without the lane and compares every byte sent and the
 * state left behind.
 *
 * Commands the lane takes are its own until they complete: a write of more than the
 * in-capsule data gets an R2T and waits in a slot for its H2CData (ttags from
 * BT_LANE_TTAG up are the lane's), and I/O on an asynchronous backend (io_uring) waits
 * in a slot for its completion, which may come in any order. The Python path asks the
 * lane about its commands when it must (a reused command id, a full queue, an H2CData
 * it decoded itself, Abort, the stall watch) and takes one over (bt_lane_adopt) for
 * anything unusual about its data. A backend that does not do all it should (an error,
 * a short transfer) sends the command back to the Python path to be done again from the
 * start (bt_lane_redo): errors and their statuses are the Python path's business.
 *
 * Output (C2HData, R2T, CapsuleResp) accumulates in one growing buffer per lane that
 * Python takes after each call (or after completions) and hands to the socket as is.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bt_lane.h"
#include "bt_lvol.h"
#include "bt_pmem.h"
#include "bt_nvme.h"
#include "bt_net.h"
#include "lane_int.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the NVMe/TCP fast lane assumes a little-endian host"
#endif

/* NVMe/TCP and NVMe facts used below (NVMe/TCP 1.0, NVMe base 2.0) */
#define PDU_CAPSULE_CMD 0x04
#define PDU_CAPSULE_RESP 0x05
#define PDU_H2C_DATA 0x06
#define PDU_C2H_DATA 0x07
#define PDU_R2T 0x09
#define F_HDGST 0x01
#define F_DDGST 0x02
#define F_LAST 0x04
#define F_SUCCESS 0x08
#define CMD_HLEN 72
#define RESP_HLEN 24
#define DATA_HLEN 24            /* C2HData, H2CData, R2T */
#define DIGEST 4
#define OPC_FLUSH 0x00
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define SGL_ID_INCAPSULE 0x01   /* data block, offset */
#define SGL_ID_TRANSPORT 0x5A   /* transport data block, transport specific */
#define RW_FUA (1u << 30)
#define OUT_MIN (64u << 10)
#define ALIGN 4096              /* data buffers: what O_DIRECT asks of any device here */
#define KEEP_BUF 8192           /* data buffers up to this size stay with their slot */
#define OUT_SEAL (256u << 10)   /* an output buffer this full is sealed, not grown */
#define ZC_MIN (32u << 10)      /* asynchronous reads this large are sent from where they
                                   were read (their C2HData header built in front) */

uint64_t lane_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* the start of the public lane call running on this thread (0: none), for start_io */
static __thread uint64_t call_ns;

static inline int is_async(const struct bt_ns *ns)
{
    return ns->backend == BT_BE_URING || ns->backend == BT_BE_NVME;
}

/* SQEs a command takes at its backend: io_uring follows a FUA write with fdatasync;
   NVMe carries FUA in the write itself */
static inline int sqes_for(const struct bt_ns *ns, int fua)
{
    return fua && ns->backend == BT_BE_URING ? 2 : 1;
}

static void set_state(struct bt_lane *l, struct bt_cmd *s, uint8_t state);

/* ---- the lane's life ---- */

/* Slots grow on demand (up to the queue's size) rather than up front: an idle
   connection of a 128-entry queue would otherwise carry 13 KiB it never uses. */
struct bt_lane *bt_lane_new(uint16_t sqsize)
{
    struct bt_lane *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    l->sqsize = sqsize;
    return l;
}

static void drop_chunks(struct bt_lane *l)
{
    for (uint32_t i = 0; i < l->nchunks; i++)
        chunk_release(&l->chunks[i]);
    l->nchunks = 0;
}

static void lane_destroy(struct bt_lane *l)
{
    for (uint32_t i = 0; i < l->nslots; i++)
        free(l->slot[i].base);
    free(l->slot);
    free(l->out);
    drop_chunks(l);
    free(l->chunks);
    free(l->carry);
    free(l->psend);
    free(l->pgset);
    free(l);
}

void bt_lane_close(struct bt_lane *l)
{
    l->closed = 1;
    for (uint32_t i = 0; i < l->nslots; i++) {
        struct bt_cmd *s = &l->slot[i];
        if (s->state == SLOT_DATA || s->state == SLOT_REDO)
            set_state(l, s, SLOT_FREE);
    }
    free(l->out);
    l->out = NULL;
    l->out_len = l->out_cap = 0;
    drop_chunks(l);
    l->carry_len = l->carry_plen = 0;
}

void bt_lane_free(struct bt_lane *l)
{
    if (l == NULL)
        return;
    be_uring_unready(l);
    be_nvme_unready(l);
    lane_destroy(l);
}

void bt_free(void *p)
{
    free(p);
}

/* room for k more chunks; 0: out of memory */
static int chunk_room(struct bt_lane *l, uint32_t k)
{
    if (l->nchunks + k <= l->chunks_cap)
        return 1;
    uint32_t cap = l->chunks_cap ? l->chunks_cap * 2 : 16;
    while (cap < l->nchunks + k)
        cap *= 2;
    struct bt_chunk *c = realloc(l->chunks, cap * sizeof(*c));
    if (c == NULL)
        return 0;
    l->chunks = c;
    l->chunks_cap = cap;
    return 1;
}

static int push_chunk(struct bt_lane *l, void *owner, unsigned char *start, size_t len)
{
    if (!chunk_room(l, 1))
        return 0;
    l->chunks[l->nchunks++] = (struct bt_chunk){owner, start, len, 0};
    return 1;
}

/* The current output buffer joins the chunks (nothing is copied). 0: out of memory. */
static int seal_out(struct bt_lane *l)
{
    if (l->out_len == 0)
        return 1;
    if (!push_chunk(l, l->out, l->out, l->out_len))
        return 0;
    l->out = NULL;
    l->out_len = l->out_cap = 0;
    return 1;
}

unsigned bt_lane_take_chunks(struct bt_lane *l, struct bt_chunk *out, unsigned max)
{
    if (!seal_out(l))
        return 0;
    unsigned n = l->nchunks < max ? l->nchunks : max;
    memcpy(out, l->chunks, n * sizeof(*out));
    memmove(l->chunks, l->chunks + n, (l->nchunks - n) * sizeof(*out));
    l->nchunks -= n;
    return n;
}

/* room for n more output bytes; NULL when memory is short. A full buffer past OUT_SEAL
   is sealed and a new one begun, rather than grown: growing copies what it holds (a
   batch of 128 KiB reads was copied over and over). */
static unsigned char *reserve(struct bt_lane *l, size_t n)
{
    if (l->out_len + n > l->out_cap) {
        if (l->out_len && l->out_len + n > OUT_SEAL && !seal_out(l))
            return NULL;
        size_t cap = l->out_cap ? l->out_cap * 2 : OUT_MIN;
        while (cap < l->out_len + n)
            cap *= 2;
        unsigned char *p = realloc(l->out, cap);
        if (p == NULL)
            return NULL;
        l->out = p;
        l->out_cap = cap;
    }
    return l->out + l->out_len;
}

/* ---- slots ---- */

static struct bt_cmd *find_cid(const struct bt_lane *l, uint16_t cid)
{
    if (l->inflight == 0)
        return NULL;
    for (uint32_t i = 0; i < l->nslots; i++)
        if (l->slot[i].state != SLOT_FREE && l->slot[i].cid == cid)
            return &l->slot[i];
    return NULL;
}

int bt_lane_busy(const struct bt_lane *l, uint16_t cid)
{
    return find_cid(l, cid) != NULL;
}

static struct bt_cmd *slot_of_ttag(const struct bt_lane *l, uint16_t ttag)
{
    if (ttag < BT_LANE_TTAG || ttag - BT_LANE_TTAG >= l->nslots)
        return NULL;
    struct bt_cmd *c = &l->slot[ttag - BT_LANE_TTAG];
    return c->state == SLOT_DATA ? c : NULL;
}

/* A free slot, growing the table if there is none; NULL when the queue is full or
   memory short. Slot indexes must fit user_data (UD_SLOTS). */
static struct bt_cmd *free_slot(struct bt_lane *l)
{
    for (uint32_t i = 0; i < l->nslots; i++)
        if (l->slot[i].state == SLOT_FREE)
            return &l->slot[i];
    uint32_t most = (uint32_t)l->sqsize + 1;
    if (most > UD_SLOTS)
        most = UD_SLOTS;
    if (l->nslots >= most)
        return NULL;
    uint32_t n = l->nslots ? l->nslots * 2 : 8;
    if (n > most)
        n = most;
    struct bt_cmd *grown = realloc(l->slot, n * sizeof(*grown));
    if (grown == NULL)
        return NULL;
    memset(grown + l->nslots, 0, (n - l->nslots) * sizeof(*grown));
    struct bt_cmd *first = grown + l->nslots;
    l->slot = grown;
    l->nslots = n;
    return first;
}

/* Move a slot to a new state, keeping the lane's counts of each. */
static void set_state(struct bt_lane *l, struct bt_cmd *s, uint8_t state)
{
    switch (s->state) {
    case SLOT_FREE:
        l->inflight++;
        break;
    case SLOT_DATA:
        l->r2t_waiting--;
        l->r2t_wait_bytes -= s->nbytes;
        break;
    case SLOT_IO:
        l->io_inflight--;
        if (s->lv != NULL) {  /* its base I/O is over: the volume's map may change */
            lane_lv_leave(s->lv);
            s->lv = NULL;
        }
        break;
    case SLOT_REDO:
        l->redo--;
        break;
    }
    switch (state) {
    case SLOT_FREE:
        l->inflight--;
        if (s->dma != NULL) {
            be_nvme_buf_release(s->dma);
            s->dma = NULL;
            s->data = s->base;
        }
        if (s->base != NULL && (s->cap > KEEP_BUF || s->data != s->base)) {
            free(s->base);
            s->data = s->base = NULL;
            s->cap = 0;
        }
        break;
    case SLOT_DATA:
        l->r2t_waiting++;
        l->r2t_wait_bytes += s->nbytes;
        break;
    case SLOT_IO:
        l->io_inflight++;
        break;
    case SLOT_REDO:
        l->redo++;
        break;
    }
    s->state = state;
}

/* The slot's data buffer for n bytes, aligned for O_DIRECT; NULL when memory is short.
   Small buffers stay with the slot for its next command: no allocation once warm. */
static unsigned char *slot_buffer(struct bt_cmd *s, uint32_t n)
{
    if (s->data != NULL && s->data == s->base && s->cap >= n)
        return s->data;
    free(s->base);
    s->data = s->base = NULL;
    s->cap = 0;
    void *p;
    if (posix_memalign(&p, ALIGN, n < ALIGN ? ALIGN : n) != 0)
        return NULL;
    s->data = s->base = p;
    s->cap = n < ALIGN ? ALIGN : n;
    return s->data;
}

/* A buffer for a large read, with a page of headroom in front of the data (which stays
   page-aligned for O_DIRECT): its C2HData header is built there and the PDU sent from
   it as it lies (see read_zero_copy). */
static unsigned char *read_buffer(struct bt_cmd *s, uint32_t n)
{
    free(s->base);
    s->data = s->base = NULL;
    s->cap = 0;
    void *p;
    if (posix_memalign(&p, ALIGN, ALIGN + (size_t)n + DIGEST) != 0)
        return NULL;
    s->base = p;
    s->data = (unsigned char *)p + ALIGN;
    s->cap = n;
    return s->data;
}

/* The buffer a command's data goes in at its backend (s->ns set): one of the queue
   pair's DMA buffers for NVMe (the device reads or writes it; a kept heap buffer is let
   go), else an aligned heap buffer, with headroom for a large read (`zc`). NULL: none. */
static unsigned char *io_buffer(struct bt_cmd *s, uint32_t n, int zc)
{
    if (s->ns->backend != BT_BE_NVME)
        return zc ? read_buffer(s, n) : slot_buffer(s, n);
    if (s->dma != NULL)
        return s->data;
    struct bt_nvme_buf *b = be_nvme_buf_get(s->ns->nvmeq);
    if (b == NULL)
        return NULL;
    free(s->base);
    s->base = NULL;
    s->cap = 0;
    s->dma = b;
    s->data = be_nvme_buf_data(b);
    return s->data;
}

unsigned bt_lane_r2t_list(const struct bt_lane *l, uint16_t *ttags, uint16_t *cids,
                          uint32_t *seqs, unsigned max)
{
    unsigned n = 0;
    for (uint32_t i = 0; i < l->nslots && n < max; i++)
        if (l->slot[i].state == SLOT_DATA) {
            ttags[n] = (uint16_t)(BT_LANE_TTAG + i);
            cids[n] = l->slot[i].cid;
            seqs[n] = l->slot[i].seq;
            n++;
        }
    return n;
}

int bt_lane_r2t_of(const struct bt_lane *l, uint16_t cid)
{
    struct bt_cmd *c = find_cid(l, cid);
    return c != NULL && c->state == SLOT_DATA ? (int)(BT_LANE_TTAG + (c - l->slot)) : -1;
}

int bt_lane_adopt(struct bt_lane *l, uint16_t ttag, unsigned char *sqe, unsigned char *data,
                  uint32_t *received, uint32_t *length)
{
    struct bt_cmd *c = slot_of_ttag(l, ttag);
    if (c == NULL)
        return -1;
    memcpy(sqe, c->sqe, SQE_LEN);
    if (c->received)
        memcpy(data, c->data, c->received);
    *received = c->received;
    *length = c->nbytes;
    set_state(l, c, SLOT_FREE);  /* (its budget goes with it to the Python request) */
    return 0;
}

/* ---- namespaces and budget ---- */

static struct bt_ns *find_ns(const struct bt_lane *l, uint32_t nsid)
{
    for (uint32_t i = 0; i < l->nns; i++)
        if (l->ns[i].nsid == nsid)
            return l->ns[i].stale ? NULL : &l->ns[i];
    return NULL;
}

/* While the socket is lent, the poller keeps the reactor's budget for Python (one sum
   for all its lanes, added once per poll), so that Python need not visit every lane. */
static void budget_net(struct bt_lane *l, int64_t d)
{
    if (l->conn != NULL) {
        l->bud_net += d;
        net_budget(l->conn, d);
    }
}

/* tcp_limits.DataBudget.take: the first buffer of an idle connection on an idle
   reactor is never refused; beyond a limit, the Python path makes the write wait */
static int budget_take(struct bt_lane *l, uint64_t n)
{
    if ((l->bud_held && l->bud_held + n > l->bud_per_qpair)
        || (l->bud_used && l->bud_used + n > l->bud_limit))
        return 0;
    l->bud_held += n;
    l->bud_used += n;
    l->bud_taken += n;
    budget_net(l, (int64_t)n);
    return 1;
}

/* DataBudget.hold: in-capsule data of a command not yet done (the caller checked that
   it does not overrun the budget: that pauses the connection, Python's to do) */
static void budget_hold(struct bt_lane *l, uint64_t n)
{
    l->bud_held += n;
    l->bud_used += n;
    l->bud_taken += n;
    budget_net(l, (int64_t)n);
}

static void budget_give_back(struct bt_lane *l, uint64_t n)
{
    l->bud_held -= n;
    l->bud_used -= n;
    l->bud_returned += n;
    budget_net(l, -(int64_t)n);
}

/* ---- output framing ---- */

static inline size_t resp_len(const struct bt_lane *l)
{
    return RESP_HLEN + (l->hdgst ? DIGEST : 0);
}

static inline size_t r2t_len(const struct bt_lane *l)
{
    return DATA_HLEN + (l->hdgst ? DIGEST : 0);
}

/* where C2HData payload starts: after the header (and its digest), padded to the
   host's alignment */
static inline size_t c2h_pdo(const struct bt_lane *l)
{
    size_t base = DATA_HLEN + (l->hdgst ? DIGEST : 0);
    size_t align = ((size_t)l->hpda + 1) * 4;
    return (base + align - 1) / align * align;
}

/* bytes on the wire for n bytes of read data, in PDUs of at most c2h_chunk */
static size_t c2h_bytes(const struct bt_lane *l, uint64_t n)
{
    uint64_t pdus = (n + l->c2h_chunk - 1) / l->c2h_chunk;
    return pdus * (c2h_pdo(l) + (l->ddgst ? DIGEST : 0)) + n;
}

/* the whole reply to a successful read of n bytes */
static size_t read_reply(const struct bt_lane *l, uint64_t n)
{
    return c2h_bytes(l, n) + (l->c2h_success ? 0 : resp_len(l));
}

static unsigned char *put_resp(const struct bt_lane *l, unsigned char *o, uint16_t cid)
{
    memset(o, 0, RESP_HLEN);
    o[0] = PDU_CAPSULE_RESP;
    o[1] = l->hdgst ? F_HDGST : 0;
    o[2] = RESP_HLEN;
    st32(o + 4, (uint32_t)resp_len(l));
    st16(o + 16, l->flow_disabled ? 0 : l->sqhd);
    st16(o + 18, l->qid);
    st16(o + 20, cid);            /* status (o + 22) 0: success, phase 0 */
    if (l->hdgst)
        st32(o + RESP_HLEN, bt_crc32c(0, o, RESP_HLEN));
    return o + resp_len(l);
}

static unsigned char *put_r2t(const struct bt_lane *l, unsigned char *o, uint16_t cid,
                              uint16_t ttag, uint32_t n)
{
    memset(o, 0, DATA_HLEN);
    o[0] = PDU_R2T;
    o[1] = l->hdgst ? F_HDGST : 0;
    o[2] = DATA_HLEN;
    st32(o + 4, (uint32_t)r2t_len(l));
    st16(o + 8, cid);
    st16(o + 10, ttag);
    st32(o + 16, n);              /* R2TO (o + 12) 0: the whole transfer at once */
    if (l->hdgst)
        st32(o + DATA_HLEN, bt_crc32c(0, o, DATA_HLEN));
    return o + r2t_len(l);
}

/* A C2HData PDU's header (and padding) for n bytes of data; returns where the data
   goes (then c2h_tail). */
static unsigned char *c2h_head(const struct bt_lane *l, unsigned char *o, uint16_t cid,
                               uint32_t datao, uint32_t n, int last)
{
    size_t pdo = c2h_pdo(l);
    memset(o, 0, pdo);
    o[0] = PDU_C2H_DATA;
    o[1] = (l->hdgst ? F_HDGST : 0) | (l->ddgst ? F_DDGST : 0)
         | (last ? F_LAST : 0) | (last && l->c2h_success ? F_SUCCESS : 0);
    o[2] = DATA_HLEN;
    o[3] = (unsigned char)pdo;
    st32(o + 4, (uint32_t)(pdo + n + (l->ddgst ? DIGEST : 0)));
    st16(o + 8, cid);
    st32(o + 12, datao);
    st32(o + 16, n);
    if (l->hdgst)
        st32(o + DATA_HLEN, bt_crc32c(0, o, DATA_HLEN));
    return o + pdo;
}

/* The data digest after the n bytes of data at d; returns the PDU's end. */
static unsigned char *c2h_tail(const struct bt_lane *l, unsigned char *d, uint32_t n)
{
    unsigned char *o = d + n;
    if (l->ddgst) {
        st32(o, bt_crc32c(0, d, n));
        o += DIGEST;
    }
    return o;
}

/* One C2HData PDU: its header, padding, n bytes of data from `src` (NULL: zeroes), its
   digests. */
static unsigned char *put_c2h(const struct bt_lane *l, unsigned char *o, uint16_t cid,
                              uint32_t datao, const unsigned char *src, uint32_t n,
                              int last)
{
    unsigned char *d = c2h_head(l, o, cid, datao, n, last);
    if (src != NULL)
        memcpy(d, src, n);
    else
        memset(d, 0, n);
    return c2h_tail(l, d, n);
}

/* ---- the replies of commands that succeeded ---- */

uint64_t bt_lat_bounds[15];

/* bisect_left over bt_lat_bounds: the first bucket whose bound is >= ns */
static unsigned lat_bucket(uint64_t ns)
{
    unsigned b = 0;
    while (b < BT_LAT_BUCKETS - 1 && bt_lat_bounds[b] < ns)
        b++;
    return b;
}

static void lat_add(struct bt_ns *ns, int st, uint64_t lat, uint32_t n)
{
    unsigned b = lat_bucket(lat);
    ns->lat_ns[st] += lat * n;
    ns->hist[st][b] += n;
    ns->hist_touched[st] |= 1u << b;
}

/* An operation done: its latency comes with it (lat_async) or, done in the call,
   when the call ends (settle). */
static void count(struct bt_ns *ns, int st, uint64_t n)
{
    ns->ops[st]++;
    ns->bytes[st] += n;
    ns->sync_pend[st]++;
}

/* an operation counted by count() completed at a backend, `lat` after its submission */
static void lat_async(struct bt_ns *ns, int st, uint64_t lat)
{
    if (ns->sync_pend[st])
        ns->sync_pend[st]--;
    lat_add(ns, st, lat, 1);
}

/* The end of a lane call that began at t0 with l->cmds at cmds0: the operations it did
   get its time shared out over its commands (the Python path's rule for the lane call
   it measured, kept here so that every command lands in its own call's bucket however
   late Python folds the statistics). */
static void settle(struct bt_lane *l, uint64_t t0, uint64_t cmds0)
{
    uint64_t ncmds = l->cmds - cmds0;
    uint64_t per = (lane_now_ns() - t0) / (ncmds ? ncmds : 1);
    for (uint32_t i = 0; i < l->nns; i++) {
        struct bt_ns *ns = &l->ns[i];
        for (int st = 0; st < 3; st++) {
            if (ns->sync_pend[st]) {
                lat_add(ns, st, per, ns->sync_pend[st]);
                ns->sync_pend[st] = 0;
            }
        }
    }
}

/* A read's data (src; NULL: zeroes) as C2HData PDUs, and its response. */
static unsigned char *read_done(struct bt_lane *l, struct bt_ns *ns, const unsigned char *src,
                                uint32_t nbytes, uint16_t cid, unsigned char *o)
{
    uint32_t left = nbytes, datao = 0;
    while (left) {
        uint32_t n = left < l->c2h_chunk ? left : l->c2h_chunk;
        o = put_c2h(l, o, cid, datao, src ? src + datao : NULL, n, n == left);
        datao += n;
        left -= n;
    }
    if (!l->c2h_success)
        o = put_resp(l, o, cid);
    count(ns, BT_ST_READ, nbytes);
    l->cmds++;
    return o;
}

/* The controller's SMART counters, counted when the command starts, as io.read and
   io.write do (and taken back if the command goes to the Python path, which counts it
   again). */
static void smart(struct bt_lane *l, int write, uint32_t nbytes, int sign)
{
    if (write) {
        l->write_cmds += sign;
        l->write_bytes += (uint64_t)(int64_t)sign * nbytes;
    } else {
        l->read_cmds += sign;
        l->read_bytes += (uint64_t)(int64_t)sign * nbytes;
    }
}

static unsigned char *write_done(struct bt_lane *l, struct bt_ns *ns, uint32_t nbytes,
                                 int fua, uint16_t cid, unsigned char *o)
{
    count(ns, BT_ST_WRITE, nbytes);
    if (fua)
        /* io.write: a FUA write on a bdev with a volatile cache is a write, then a
           flush of its blocks (counted by the bdev as one of each) */
        count(ns, BT_ST_FLUSH, nbytes);
    l->cmds++;
    return put_resp(l, o, cid);
}

static unsigned char *flush_done(struct bt_lane *l, struct bt_ns *ns, uint16_t cid,
                                 unsigned char *o)
{
    count(ns, BT_ST_FLUSH, ns->num_blocks * ns->block_size);
    l->cmds++;
    return put_resp(l, o, cid);
}

/* ---- asynchronous backends ---- */

static int backend_space(struct bt_ns *ns)
{
    return ns->backend == BT_BE_URING ? be_uring_space(ns)
         : ns->backend == BT_BE_NVME ? be_nvme_space(ns) : 0;
}

/* Hand slot s (data in place for a write) to its backend; 0 or -errno (nothing
   queued). */
static int start_io(struct bt_lane *l, struct bt_cmd *s, uint8_t kind)
{
    s->kind = kind;
    s->cqes = (uint8_t)sqes_for(s->ns, kind == IO_WRITE && s->fua);
    s->bad = 0;
    /* (the commands of one lane call arrived together: its start is theirs, one clock
       read per call rather than one per command) */
    s->start_ns = call_ns ? call_ns : lane_now_ns();
    if (s->ns->backend == BT_BE_NVME) {
        int rc = be_nvme_queue(l, s, (uint32_t)(s - l->slot));
        if (rc < 0)
            return rc;
        set_state(l, s, SLOT_IO);
        l->submitted++;
        struct bt_nvmeq *q = s->ns->nvmeq;
        if (l->touched_nvme != NULL && l->touched_nvme != q)
            be_nvme_submit(l->touched_nvme);
        l->touched_nvme = q;
        return 0;
    }
    int rc = be_uring_queue(l, s, (uint32_t)(s - l->slot));
    if (rc < 0)
        return rc;
    set_state(l, s, SLOT_IO);
    l->submitted++;
    struct bt_uring *u = s->ns->ring;
    if (l->touched != NULL && l->touched != u)
        be_uring_submit(l->touched);
    l->touched = u;
    return 0;
}

/* Submit what this call queued (one system call for every SQE of a receive buffer). */
static void submit_touched(struct bt_lane *l)
{
    if (l->touched != NULL) {
        be_uring_submit(l->touched);
        l->touched = NULL;
    }
    if (l->touched_nvme != NULL) {  /* one doorbell write for the call's commands */
        be_nvme_submit(l->touched_nvme);
        l->touched_nvme = NULL;
    }
}

static void to_redo(struct bt_lane *l, struct bt_cmd *s)
{
    if (s->kind != IO_FLUSH && !s->corrupt)
        smart(l, s->kind == IO_WRITE, s->nbytes, -1);
    if (s->held) {
        budget_give_back(l, s->nbytes);
        s->held = 0;
    }
    set_state(l, s, SLOT_REDO);
}

/* A large read done into a buffer with headroom (one C2HData PDU): its header and
   padding are built in front of the data, its digest after it, and the whole PDU joins
   the output as it lies; the buffer goes with it (the slot gets a new one next time).
   0: out of memory, nothing changed. */
static int read_zero_copy(struct bt_lane *l, struct bt_cmd *s)
{
    size_t pdo = c2h_pdo(l);
    unsigned char *h = s->data - pdo;
    size_t resp = l->c2h_success ? 0 : resp_len(l);
    /* everything that can fail first: the output so far sealed (it goes before this
       PDU), room for the chunk, and a new buffer for the response after it */
    if (!seal_out(l) || !chunk_room(l, 1) || (resp && reserve(l, resp) == NULL))
        return 0;
    uint32_t n = s->nbytes;
    memset(h, 0, pdo);
    h[0] = PDU_C2H_DATA;
    h[1] = (l->hdgst ? F_HDGST : 0) | (l->ddgst ? F_DDGST : 0) | F_LAST
         | (l->c2h_success ? F_SUCCESS : 0);
    h[2] = DATA_HLEN;
    h[3] = (unsigned char)pdo;
    st32(h + 4, (uint32_t)(pdo + n + (l->ddgst ? DIGEST : 0)));
    st16(h + 8, s->cid);
    st32(h + 16, n);
    if (l->hdgst)
        st32(h + DATA_HLEN, bt_crc32c(0, h, DATA_HLEN));
    size_t len = pdo + n;
    if (l->ddgst) {
        st32(s->data + n, bt_crc32c(0, s->data, n));
        len += DIGEST;
    }
    /* (room made above); a DMA buffer goes back to its pool once sent */
    if (s->dma != NULL)
        l->chunks[l->nchunks++] = (struct bt_chunk){s->dma, h, len, 1};
    else
        l->chunks[l->nchunks++] = (struct bt_chunk){s->base, h, len, 0};
    s->dma = NULL;
    s->data = s->base = NULL;
    s->cap = 0;
    if (resp) {
        unsigned char *o = reserve(l, resp);  /* (reserved above: cannot fail) */
        put_resp(l, o, s->cid);
        l->out_len += resp;
    }
    count(s->ns, BT_ST_READ, n);
    l->cmds++;
    return 1;
}

void lane_io_done(struct bt_lane *l, uint32_t idx, int32_t res)
{
    lane_io_done_at(l, idx, res, lane_now_ns());
}

void lane_io_done_at(struct bt_lane *l, uint32_t idx, int32_t res, uint64_t now)
{
    struct bt_cmd *s = &l->slot[idx];
    if (s->kind == IO_FLUSH
        || (s->kind == IO_WRITE && s->fua && s->cqes == 1 && s->ns->backend == BT_BE_URING))
        s->bad |= res != 0;   /* (fdatasync: 0; -ECANCELED after a failed linked write) */
    else
        s->bad |= res != (int32_t)s->nbytes;
    if (--s->cqes)
        return;
    struct bt_ns *ns = s->ns;
    uint64_t lat = now - s->start_ns;
    if (l->closed) {
        /* nobody to answer; the bdev still counts what it did, as the Python path's
           channel does for a connection that went away */
        if (!s->bad) {
            int st = s->kind == IO_READ ? BT_ST_READ : s->kind == IO_WRITE ? BT_ST_WRITE
                   : BT_ST_FLUSH;
            count(ns, st, s->kind == IO_FLUSH ? ns->num_blocks * ns->block_size : s->nbytes);
            lat_async(ns, st, lat);
            if (s->kind == IO_WRITE && s->fua) {
                count(ns, BT_ST_FLUSH, s->nbytes);
                lat_async(ns, BT_ST_FLUSH, lat);
            }
            l->cmds++;
        }
        set_state(l, s, SLOT_FREE);
        return;
    }
    if (s->bad) {
        to_redo(l, s);
        return;
    }
    int zc = s->dma != NULL ? s->nbytes >= ZC_MIN && s->nbytes <= l->c2h_chunk
                            : s->data != s->base;
    if (s->kind == IO_READ && zc) {
        /* a large read: its PDU is sent from the buffer it was read into */
        if (read_zero_copy(l, s)) {
            lat_async(ns, BT_ST_READ, lat);
            set_state(l, s, SLOT_FREE);
        } else {
            to_redo(l, s);
        }
        return;
    }
    size_t need = s->kind == IO_READ ? read_reply(l, s->nbytes) : resp_len(l);
    unsigned char *o = reserve(l, need);
    if (o == NULL) {
        to_redo(l, s);
        return;
    }
    switch (s->kind) {
    case IO_READ:
        read_done(l, ns, s->data, s->nbytes, s->cid, o);
        lat_async(ns, BT_ST_READ, lat);
        break;
    case IO_WRITE:
        write_done(l, ns, s->nbytes, s->fua, s->cid, o);
        lat_async(ns, BT_ST_WRITE, lat);
        if (s->fua)
            lat_async(ns, BT_ST_FLUSH, lat);
        break;
    default:
        flush_done(l, ns, s->cid, o);
        lat_async(ns, BT_ST_FLUSH, lat);
        break;
    }
    l->out_len += need;
    if (s->held)
        budget_give_back(l, s->nbytes);
    s->held = 0;
    set_state(l, s, SLOT_FREE);
}

int bt_lane_redo(struct bt_lane *l, unsigned char *sqe, unsigned char *data, uint32_t *length,
                 int *failed)
{
    if (l->redo == 0)
        return 0;
    for (uint32_t i = 0; i < l->nslots; i++) {
        struct bt_cmd *s = &l->slot[i];
        if (s->state != SLOT_REDO)
            continue;
        memcpy(sqe, s->sqe, SQE_LEN);
        *length = 0;
        *failed = s->corrupt;
        if (s->kind == IO_WRITE && !s->corrupt) {
            memcpy(data, s->data, s->nbytes);
            *length = s->nbytes;
        }
        s->corrupt = 0;
        set_state(l, s, SLOT_FREE);
        return 1;
    }
    return 0;
}

/* ---- the verdict on one capsule ---- */

enum { ACT_READ, ACT_WRITE_ICD, ACT_WRITE_R2T, ACT_FLUSH };

struct cmd {
    struct bt_lvmap *lv;        /* a volume's map the command holds (lv_drop) */
    uint8_t zero;               /* a volume's read of an unmapped cluster: zeroes */
    const unsigned char *sqe;
    const unsigned char *data;  /* in-capsule data */
    uint32_t data_len;
    int act;
    struct bt_ns *ns;
    uint64_t off;               /* byte offset in the namespace */
    uint32_t nbytes;
};

/* The reply's size in bytes for one complete capsule PDU `p` of `plen` bytes (0 for
   what will answer later), or -1 when the Python path must handle it. Mirrors
   pdu.Decoder, qpair._capsule, dispatch and io.read/io.write/io.flush for the cases
   that succeed. */
static long accept_plain(const struct bt_lane *l, const unsigned char *p, uint32_t plen,
                         struct cmd *c)
{
    size_t hend = CMD_HLEN + (l->hdgst ? DIGEST : 0);
    if (l->hdgst && ld32(p + CMD_HLEN) != bt_crc32c(0, p, CMD_HLEN))
        return -1;                /* Python: header digest error, fatal */
    c->sqe = p + 8;
    if (plen > hend) {
        size_t dd = l->ddgst ? DIGEST : 0;
        if (p[3] != hend || plen <= hend + dd)
            return -1;            /* padding before the data, or no data after it */
        c->data = p + hend;
        c->data_len = plen - (uint32_t)hend - (uint32_t)dd;
        if (l->ddgst && ld32(c->data + c->data_len) != bt_crc32c(0, c->data, c->data_len))
            return -1;            /* Python: data digest error */
    }                             /* (no data: PDO is not looked at, as in Python) */
    const unsigned char *sqe = c->sqe;
    uint8_t opc = sqe[0], flags = sqe[1];
    if ((flags & 0x03) || (flags >> 6) == 0)  /* fused; PRPs */
        return -1;
    /* a busy command id (CID conflict) or a full queue: Python's to answer */
    if (find_cid(l, ld16(sqe + 2)) != NULL || l->inflight > l->sqsize)
        return -1;
    struct bt_ns *ns = find_ns(l, ld32(sqe + 4));
    if (ns == NULL)
        return -1;
    c->ns = ns;
    int async = is_async(ns);
    if (opc == OPC_FLUSH) {
        /* no data either way; an SGL of any length is ignored as Python ignores it */
        if (c->data_len)
            return -1;
        c->act = ACT_FLUSH;
        return async ? 0 : (long)resp_len(l);
    }
    uint64_t slba = ld64(sqe + 40);
    uint32_t cdw12 = ld32(sqe + 48);
    uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
    uint64_t n = nlb * ns->block_size;
    uint32_t sgl_len = ld32(sqe + 32);
    uint8_t sgl_id = sqe[39];
    if (n > l->max_io_size || slba > ns->num_blocks || nlb > ns->num_blocks - slba
        || sgl_len != n)
        return -1;
    if (ns->backend == BT_BE_NVME && n > ns->nvmeq->max_transfer)
        return -1;                /* more than one device command: the Python path splits */
    c->off = slba * ns->block_size;
    c->nbytes = (uint32_t)n;
    if (opc == OPC_READ) {
        if (c->data_len || sgl_id != SGL_ID_TRANSPORT)
            return -1;
        /* (a pool is read a C2HData PDU at a time: whole blocks each) */
        if (ns->backend == BT_BE_PMEM && n > l->c2h_chunk && l->c2h_chunk % ns->block_size)
            return -1;
        c->act = ACT_READ;
        return async ? 0 : (long)read_reply(l, n);
    }
    if (opc != OPC_WRITE)
        return -1;
    if (c->data_len) {
        if (sgl_id != SGL_ID_INCAPSULE || ld64(sqe + 24) != 0 || sgl_len != c->data_len
            || c->data_len > l->icd_limit
            /* DataBudget.hold: in-capsule data that overruns the reactor's budget
               pauses the connection (Python's to do) */
            || l->bud_used + c->data_len > l->bud_limit)
            return -1;
        c->act = ACT_WRITE_ICD;
        return async ? 0 : (long)resp_len(l);
    }
    if (sgl_id != SGL_ID_TRANSPORT)
        return -1;
    c->act = ACT_WRITE_R2T;
    return (long)r2t_len(l);
}

static int fua_of(const struct bt_ns *ns, const unsigned char *sqe)
{
    return (ld32(sqe + 48) & RW_FUA) && ns->write_cache;
}

/* ---- logical volumes (bt_lvol.h, lane_lvol.c) ---- */

/* A volume's command that accept_plain took: its reply as accept_plain said it, or -1
   (the Python path's). A read or an in-capsule write leaves holding the map (c->lv, let
   go by lv_drop or, once at an asynchronous backend, when its slot leaves SLOT_IO) with
   c->off moved onto the base; a read of an unmapped cluster is answered with zeroes at
   once (c->zero), whatever the backend; a write by R2T is looked up once its data is in
   (write_in): holding the map while the host takes its time would hold up a freeze. A
   Flush goes to the Python path, which flushes the base and counts it as the base's. */
static long accept_lvol(const struct bt_lane *l, struct cmd *c, long reply)
{
    struct bt_lvmap *m = c->ns->lv;
    if (c->act == ACT_FLUSH || (c->act != ACT_READ && fua_of(c->ns, c->sqe)))
        return -1;  /* (FUA on a volatile cache: the Python path flushes the base) */
    if (c->act == ACT_WRITE_R2T)
        return m->read_only || (c->off & ((1ull << m->cluster_shift) - 1)) + c->nbytes
                               > (1ull << m->cluster_shift) ? -1 : reply;
    if (lane_lv_enter(m) < 0)
        return -1;
    uint64_t off = 0;
    int r = lane_lv_map(m, c->off, c->nbytes, c->act != ACT_READ, &off);
    if (r <= 0)
        lane_lv_leave(m);
    if (r < 0)
        return -1;
    if (r == 0) {
        c->zero = 1;
        return (long)read_reply(l, c->nbytes);
    }
    c->lv = m;
    c->off = off;
    return reply;
}

static void lv_drop(struct cmd *c)
{
    if (c->lv != NULL) {
        lane_lv_leave(c->lv);
        c->lv = NULL;
    }
}

/* The reply's size for a capsule, or -1 (the Python path's): accept_plain's verdict,
   then a volume's lookup. */
static long accept_capsule(const struct bt_lane *l, const unsigned char *p, uint32_t plen,
                           struct cmd *c)
{
    long reply = accept_plain(l, p, plen, c);
    if (reply < 0 || c->ns->lv == NULL)
        return reply;
    return accept_lvol(l, c, reply);
}

/* ---- pmem (be_pmem.c): synchronous like memory, but the BTT may refuse a command (a
   block whose map entry carries the error flag, a pool that takes no more writes): the
   command then goes to the Python path in a slot (SLOT_REDO), which answers it as the
   reference does. ---- */

static inline uint64_t pmem_lba(const struct bt_ns *ns, uint64_t off)
{
    return (ns->fd_offset + off) / ns->block_size;
}

/* What a refusal needs, made sure of before the command is accepted (nothing may fail
   once the queue's SQ head moved): a free slot, and for in-capsule data its buffer.
   0: the Python path takes the command now. */
static int pmem_ready(struct bt_lane *l, const struct cmd *c)
{
    if (c->act == ACT_FLUSH)
        return 1;
    if (c->act != ACT_READ && bt_pmem_broken(c->ns->pmem))
        return 0;  /* (it would refuse: the Python path answers at once) */
    struct bt_cmd *s = free_slot(l);
    return s != NULL && (c->act != ACT_WRITE_ICD || slot_buffer(s, c->nbytes) != NULL);
}

/* The command the BTT refused, to the Python path (the slot pmem_ready found). */
static void pmem_refused(struct bt_lane *l, const struct cmd *c, uint16_t cid, uint8_t kind)
{
    struct bt_cmd *s = free_slot(l);
    s->seq++;
    s->cid = cid;
    s->ns = c->ns;
    s->off = c->off;
    s->nbytes = c->nbytes;
    s->kind = kind;
    s->fua = 0;
    s->held = 0;
    s->corrupt = 0;
    s->received = 0;
    memcpy(s->sqe, c->sqe, SQE_LEN);
    if (kind == IO_WRITE)
        memcpy(slot_buffer(s, c->nbytes), c->data, c->nbytes);  /* (kept: pmem_ready) */
    set_state(l, s, SLOT_REDO);
}

/* A read from a pool, each piece straight into its C2HData PDU; 0, or the BTT's
   refusal (the output is not advanced: nothing was sent). */
static int pmem_read_done(struct bt_lane *l, struct bt_ns *ns, const struct cmd *c,
                          uint16_t cid, unsigned char *o)
{
    uint64_t lba = pmem_lba(ns, c->off);
    uint32_t left = c->nbytes, datao = 0;
    while (left) {
        uint32_t n = left < l->c2h_chunk ? left : l->c2h_chunk;
        unsigned char *d = c2h_head(l, o, cid, datao, n, n == left);
        int rc = bt_pmem_read(ns->pmem, ns->pmem_lane, lba + datao / ns->block_size,
                              n / ns->block_size, d);
        if (rc != BT_PMEM_OK)
            return rc;
        o = c2h_tail(l, d, n);
        datao += n;
        left -= n;
    }
    if (!l->c2h_success)
        put_resp(l, o, cid);
    count(ns, BT_ST_READ, c->nbytes);
    l->cmds++;
    return 0;
}

/* A large read from a pool over a socket lent to the reactor's C poller is sent from
   the pool's blocks themselves rather than copied into the output and copied again by
   the socket: its blocks are held (bt_pmem_read_map: no writer reuses them; be_pmem.c
   has the argument) from the command until the socket took its bytes or what it did
   not take was copied into the queue. One sendmsg per read cost more in the kernel than
   the copy saved (bench/RESULTS.md), so the reads that follow one another in a lane
   call are held together and sent in one (psend_flush), before anything else of the
   lane's leaves: the first one only once everything before it was sent, and every
   other command, and the end of the call, sends them first, so the output's order is
   the command order as always. A small read, or one when the socket is full or the
   held set is, is copied as before. */
#define PMEM_SEND_MIN (32u << 10)
#define PS_BLOCKS 1024             /* blocks held at once (be_pmem.c's RTT_MAX) */
#define PS_IOV 2048                /* pieces of one send */
#define PS_META (32u << 10)        /* their headers, digests and responses */
#define PDU_ROOM 128               /* one C2HData header with its digest and padding */

struct psend {
    struct bt_pmem *pool;       /* the pool whose blocks are held (NULL: none), */
    uint32_t lane;              /* through this lane of it */
    uint32_t blocks;            /* how many */
    unsigned niov;
    size_t meta_len;
    struct iovec iov[PS_IOV];
    struct iovec segs[PS_BLOCKS];  /* (one read's, as bt_pmem_read_map gives them) */
    unsigned char meta[PS_META];
};

/* Send the held reads and let go of their blocks. */
static void psend_flush(struct bt_lane *l)
{
    struct psend *ps = l->psend;
    if (ps == NULL || ps->pool == NULL)
        return;
    if (l->conn != NULL)
        net_send_now(l->conn, ps->iov, ps->niov);  /* (-1: the connection failed, which
                                                      Python hears of) */
    bt_pmem_read_unmap(ps->pool, ps->lane);
    ps->pool = NULL;
    ps->blocks = 0;
    ps->niov = 0;
    ps->meta_len = 0;
}

static int pmem_send_wanted(const struct bt_lane *l, const struct cmd *c)
{
    return c->act == ACT_READ && c->ns->backend == BT_BE_PMEM && !c->zero && l->conn != NULL
        && c->nbytes >= PMEM_SEND_MIN && c->nbytes / c->ns->block_size <= PS_BLOCKS
        && c2h_pdo(l) + DIGEST <= PDU_ROOM;
}

/* Read c to be sent from the pool: 1 held for the next psend_flush (counted as done), 0
   not possible (nothing held: copy it, after psend_flush), -1 the BTT refused it (a
   block with the error flag: nothing sent). */
static int pmem_read_held(struct bt_lane *l, const struct cmd *c, uint16_t cid)
{
    struct bt_ns *ns = c->ns;
    struct psend *ps = l->psend;
    uint64_t nlb = c->nbytes / ns->block_size;
    uint32_t pdus = (c->nbytes + l->c2h_chunk - 1) / l->c2h_chunk;
    if (ps == NULL && (ps = l->psend = calloc(1, sizeof(*ps))) == NULL)
        return 0;
    /* (what it may need: a piece per block, two more per PDU, a response) */
    if (ps->pool != NULL && (ps->pool != ns->pmem || ps->lane != ns->pmem_lane
                             || ps->blocks + nlb > PS_BLOCKS
                             || ps->niov + nlb + 2 * pdus + 1 > PS_IOV
                             || ps->meta_len + (size_t)pdus * PDU_ROOM + PDU_ROOM > PS_META))
        psend_flush(l);
    if (nlb + 2 * pdus + 1 > PS_IOV || (size_t)pdus * PDU_ROOM + PDU_ROOM > PS_META)
        return 0;
    if (ps->pool == NULL && !net_send_ready(l->conn))
        return 0;  /* (output waits for the socket: this one is copied behind it) */
    unsigned nsegs = 0;
    int rc = bt_pmem_read_map(ns->pmem, ns->pmem_lane, ps->blocks, pmem_lba(ns, c->off), nlb,
                              ps->segs, PS_BLOCKS, &nsegs);
    if (rc == BT_PMEM_MEDIA)
        return -1;
    if (rc != BT_PMEM_OK)
        return 0;
    ps->pool = ns->pmem;
    ps->lane = ns->pmem_lane;
    ps->blocks += (uint32_t)nlb;
    /* the blocks are held until psend_flush: the PDUs around them */
    struct iovec *iov = ps->iov;
    unsigned s = 0;
    size_t soff = 0;            /* bytes of segs[s] already in a PDU */
    uint32_t left = c->nbytes, datao = 0;
    while (left) {
        uint32_t n = left < l->c2h_chunk ? left : l->c2h_chunk;
        unsigned char *h = ps->meta + ps->meta_len;
        unsigned char *d = c2h_head(l, h, cid, datao, n, n == left);
        iov[ps->niov++] = (struct iovec){h, (size_t)(d - h)};
        ps->meta_len += (size_t)(d - h);
        uint32_t crc = 0;
        for (uint32_t want = n; want;) {
            size_t take = ps->segs[s].iov_len - soff;
            if (take > want)
                take = want;
            unsigned char *src = (unsigned char *)ps->segs[s].iov_base + soff;
            if (l->ddgst)
                crc = bt_crc32c(crc, src, take);  /* (the bytes sent: held as they are) */
            iov[ps->niov++] = (struct iovec){src, take};
            want -= (uint32_t)take;
            soff += take;
            if (soff == ps->segs[s].iov_len) {
                s++;
                soff = 0;
            }
        }
        if (l->ddgst) {
            st32(ps->meta + ps->meta_len, crc);
            iov[ps->niov++] = (struct iovec){ps->meta + ps->meta_len, DIGEST};
            ps->meta_len += DIGEST;
        }
        datao += n;
        left -= n;
    }
    if (!l->c2h_success) {
        unsigned char *r = ps->meta + ps->meta_len;
        unsigned char *e = put_resp(l, r, cid);
        iov[ps->niov++] = (struct iovec){r, (size_t)(e - r)};
        ps->meta_len += (size_t)(e - r);
    }
    count(ns, BT_ST_READ, c->nbytes);
    l->cmds++;
    l->pmem_sent++;
    smart(l, 0, c->nbytes, 1);
    return 1;
}

/* ---- pmem group commit: the in-capsule writes to one pool that follow one another in a
   batch are committed together (bt_pmem_write_group: the BTT's two drains once for all,
   each block still atomic; be_pmem.c has the argument). A write joins the group instead
   of running: its response's room is reserved in the output, the response built only
   once the group is durable (group_commit, at the latest before bt_lane_run returns), so
   no response leaves before its blocks are durable. Anything else (another PDU, a write
   that overlaps the group or would overflow it, output that would not fit the buffer as
   it is) commits the group first. If the commit fails, the lane takes the whole group
   back as if it had never taken it (input position, command count, SQ head, output):
   the Python path decodes those capsules itself, in order, and answers each as the
   reference does (the pool, broken now, refuses them), every response with the SQ head
   of its turn. ---- */

#define GROUP_MAX 32

struct pgroup {
    uint32_t n;                 /* writes waiting */
    uint64_t blocks;
    struct bt_lba_set *lbas;    /* their LBAs (the lane's, l->pgset); NULL: none may
                                   join (no memory, or a write too large to list) */
    struct bt_ns *ns;
    size_t out0;                /* their responses' room: l->out from here to out_len
                                   (an offset: the buffer may be reallocated) */
    size_t pos0;                /* the first one's capsule in bt_lane_run's input */
    unsigned ncmds0;            /* bt_lane_run's count of commands before it */
    uint16_t sqhd0;             /* the SQ head before it */
    uint64_t lba[GROUP_MAX], count[GROUP_MAX];
    const unsigned char *src[GROUP_MAX];  /* (in bt_lane_run's input) */
    uint32_t nbytes[GROUP_MAX];
    uint16_t cid[GROUP_MAX];
    uint16_t sqhd[GROUP_MAX];   /* the SQ head its response reports (as when it ran) */
    uint8_t fua[GROUP_MAX];
};

/* Can command c (accepted, reply bytes) join g now? */
static int group_fits(const struct bt_lane *l, const struct pgroup *g, const struct cmd *c,
                      long reply)
{
    /* (not a volume's write: it holds the volume's map until it is done, lv_drop) */
    if (c->act != ACT_WRITE_ICD || c->ns->backend != BT_BE_PMEM || c->lv != NULL)
        return 0;
    if (g->n == 0)
        return 1;
    uint64_t lba = pmem_lba(c->ns, c->off), nlb = c->nbytes / c->ns->block_size;
    if (c->ns != g->ns || g->n == GROUP_MAX
        || g->blocks + nlb > bt_pmem_group_max(c->ns->pmem)
        || l->out_len + (size_t)reply > l->out_cap)  /* (reserve would seal the buffer) */
        return 0;
    /* (one flog entry per LBA in a group: an overlap commits the first one first) */
    if (g->lbas == NULL)
        return 0;
    for (uint64_t b = 0; b < nlb; b++)
        if (bt_lba_set_has(g->lbas, lba + b))
            return 0;
    return 1;
}

/* c, the capsule at input position pos, the ncmds-th command, joins g (the SQ head
   already counts it); returns its reply's length. */
static long group_join(struct bt_lane *l, struct pgroup *g, const struct cmd *c, uint16_t cid,
                       long reply, size_t pos, unsigned ncmds)
{
    uint32_t i = g->n++;
    if (i == 0) {
        g->blocks = 0;
        if (l->pgset == NULL)
            l->pgset = calloc(1, sizeof(struct bt_lba_set));
        g->lbas = l->pgset;
        if (g->lbas != NULL)
            bt_lba_set_reset(g->lbas);
        g->ns = c->ns;
        g->out0 = l->out_len;
        g->pos0 = pos;
        g->ncmds0 = ncmds;
        g->sqhd0 = l->flow_disabled ? l->sqhd
                 : (uint16_t)((l->sqhd + (uint32_t)l->sqsize) % ((uint32_t)l->sqsize + 1));
    }
    g->lba[i] = pmem_lba(c->ns, c->off);
    g->count[i] = c->nbytes / c->ns->block_size;
    g->src[i] = c->data;
    g->nbytes[i] = c->nbytes;
    g->cid[i] = cid;
    g->sqhd[i] = l->sqhd;
    g->fua[i] = (uint8_t)fua_of(c->ns, c->sqe);
    g->blocks += g->count[i];
    for (uint64_t b = 0; b < g->count[i] && g->lbas != NULL; b++)
        if (!bt_lba_set_add(g->lbas, g->lba[i] + b))
            g->lbas = NULL;  /* (full: only a first write larger than a group gets here) */
    return reply;
}

/* Make g's writes durable and answer them. 0 if the pool refused: then *pos and *ncmds
   are where bt_lane_run stands without the group (the Python path's from there). */
static int group_commit(struct bt_lane *l, struct pgroup *g, size_t *pos, unsigned *ncmds)
{
    uint32_t n = g->n;
    if (n == 0)
        return 1;
    g->n = 0;
    struct bt_ns *ns = g->ns;
    /* (one write alone: bt_pmem_write, which also takes more blocks than one chunk) */
    int rc = n == 1 ? bt_pmem_write(ns->pmem, ns->pmem_lane, g->lba[0], g->count[0], g->src[0])
                    : bt_pmem_write_group(ns->pmem, ns->pmem_lane, n, g->lba, g->count,
                                          g->src);
    if (rc != BT_PMEM_OK) {
        l->out_len = g->out0;
        l->sqhd = g->sqhd0;
        *pos = g->pos0;
        *ncmds = g->ncmds0;
        return 0;
    }
    unsigned char *o = l->out + g->out0;
    uint16_t sqhd = l->sqhd;
    for (uint32_t i = 0; i < n; i++) {
        smart(l, 1, g->nbytes[i], 1);
        l->sqhd = g->sqhd[i];
        o = write_done(l, ns, g->nbytes[i], g->fua[i], g->cid[i], o);
    }
    l->sqhd = sqhd;
    return 1;
}

/* Execute an accepted command on a backend that completes at once; o has its reply's
   room. Returns the reply's length (0: the command went to the Python path). */
static long exec_sync(struct bt_lane *l, const struct cmd *c, uint16_t cid, unsigned char *o,
                      long reply)
{
    struct bt_ns *ns = c->ns;
    switch (c->act) {
    case ACT_READ:
        if (c->zero) {
            smart(l, 0, c->nbytes, 1);
            read_done(l, ns->lv_zero != NULL ? ns->lv_zero : ns, NULL, c->nbytes, cid, o);
            break;
        }
        if (ns->backend == BT_BE_PMEM) {
            if (pmem_read_done(l, ns, c, cid, o) != 0) {
                pmem_refused(l, c, cid, IO_READ);
                return 0;
            }
            smart(l, 0, c->nbytes, 1);
            break;
        }
        smart(l, 0, c->nbytes, 1);
        read_done(l, ns, ns->backend == BT_BE_MEM ? ns->mem + c->off : NULL, c->nbytes, cid,
                  o);
        break;
    case ACT_WRITE_ICD:
        if (ns->backend == BT_BE_MEM) {
            memcpy(ns->mem + c->off, c->data, c->nbytes);
        } else if (ns->backend == BT_BE_PMEM
                   && bt_pmem_write(ns->pmem, ns->pmem_lane, pmem_lba(ns, c->off),
                                    c->nbytes / ns->block_size, c->data) != BT_PMEM_OK) {
            pmem_refused(l, c, cid, IO_WRITE);
            return 0;
        }
        smart(l, 1, c->nbytes, 1);
        write_done(l, ns, c->nbytes, fua_of(ns, c->sqe), cid, o);
        break;
    default:
        flush_done(l, ns, cid, o);
        break;
    }
    return reply;
}

/* Start an accepted command on an asynchronous backend: 1 started, 0 not (nothing
   changed: the Python path takes it). */
static int exec_async(struct bt_lane *l, struct cmd *c, uint16_t cid)
{
    struct bt_ns *ns = c->ns;
    int need = sqes_for(ns, c->act == ACT_WRITE_ICD && fua_of(ns, c->sqe));
    if (backend_space(ns) < need)
        return 0;
    struct bt_cmd *s = free_slot(l);
    if (s == NULL)
        return 0;
    uint8_t kind = c->act == ACT_READ ? IO_READ : c->act == ACT_FLUSH ? IO_FLUSH : IO_WRITE;
    s->ns = ns;
    if (kind != IO_FLUSH
        && io_buffer(s, c->nbytes, kind == IO_READ && c->nbytes >= ZC_MIN
                                   && c->nbytes <= l->c2h_chunk) == NULL)
        return 0;
    s->seq++;
    s->cid = cid;
    s->received = 0;
    s->held = 0;
    s->ns = ns;
    s->off = c->off;
    s->nbytes = kind == IO_FLUSH ? 0 : c->nbytes;
    s->fua = kind == IO_WRITE && fua_of(ns, c->sqe);
    memcpy(s->sqe, c->sqe, SQE_LEN);
    if (kind == IO_WRITE)
        memcpy(s->data, c->data, c->nbytes);
    s->lv = c->lv;  /* (a volume's map: held by the slot until its I/O is over) */
    if (start_io(l, s, kind) < 0) {
        s->lv = NULL;
        if (s->dma != NULL) {       /* (the slot stayed free: its DMA buffer goes back) */
            be_nvme_buf_release(s->dma);
            s->dma = NULL;
            s->data = s->base;
        }
        return 0;
    }
    c->lv = NULL;
    if (kind != IO_FLUSH)
        smart(l, kind == IO_WRITE, c->nbytes, 1);
    if (kind == IO_WRITE) {
        budget_hold(l, c->nbytes);  /* held by the Python path until completion too */
        s->held = 1;
    }
    return 1;
}

/* Start a write whose data comes by R2T: a slot, the budget, the R2T. Its buffer is
   allocated only if the data comes in pieces or goes to an asynchronous backend. */
static int start_r2t(struct bt_lane *l, const struct cmd *c, uint16_t cid, unsigned char *o)
{
    struct bt_cmd *s = free_slot(l);
    if (s == NULL || !budget_take(l, c->nbytes))
        return 0;
    s->seq++;
    s->cid = cid;
    s->ns = c->ns;
    s->off = c->off;
    s->nbytes = c->nbytes;
    s->received = 0;
    s->fua = fua_of(c->ns, c->sqe);
    s->held = 1;
    s->corrupt = 0;
    s->kind = IO_WRITE;
    memcpy(s->sqe, c->sqe, SQE_LEN);
    set_state(l, s, SLOT_DATA);
    put_r2t(l, o, cid, (uint16_t)(BT_LANE_TTAG + (s - l->slot)), c->nbytes);
    return 1;
}

/* All the data of slot s is in (src): execute the write. Room for a response is
   reserved. A write whose data failed a digest, or whose namespace changed meanwhile,
   goes to the Python path instead (it fails the one, decides the other). */
/* A write with all its data in (src) that the lane will not do after all: the Python
   path does it again, which needs the data in the slot; without memory for that it gets
   the command as failed (an error either way, just not the same one). */
static void write_refused(struct bt_lane *l, struct bt_cmd *s, const unsigned char *src)
{
    if (src != s->data) {
        if (slot_buffer(s, s->nbytes) != NULL) {
            memcpy(s->data, src, s->nbytes);
        } else {
            smart(l, 1, s->nbytes, -1);
            s->corrupt = 1;
        }
    }
    to_redo(l, s);
}

static void write_in(struct bt_lane *l, struct bt_cmd *s, const unsigned char *src)
{
    struct bt_ns *ns = s->ns;
    if (s->corrupt || ns->stale) {
        to_redo(l, s);
        return;
    }
    smart(l, 1, s->nbytes, 1);
    struct bt_lvmap *lv = ns->lv;  /* a volume: its cluster looked up now (accept_lvol) */
    if (lv != NULL) {
        uint64_t off = 0;
        if (lane_lv_enter(lv) < 0) {
            write_refused(l, s, src);  /* (frozen: a metadata change is under way) */
            return;
        }
        if (lane_lv_map(lv, s->off, s->nbytes, 1, &off) != 1) {
            lane_lv_leave(lv);
            write_refused(l, s, src);  /* (a first write, copy-on-write) */
            return;
        }
        s->off = off;
    }
    if (!is_async(ns)) {
        if (ns->backend == BT_BE_MEM) {
            memcpy(ns->mem + s->off, src, s->nbytes);
        } else if (ns->backend == BT_BE_PMEM
                   && bt_pmem_write(ns->pmem, ns->pmem_lane, pmem_lba(ns, s->off),
                                    s->nbytes / ns->block_size, src) != BT_PMEM_OK) {
            /* the BTT refused (the pool takes no more writes): the Python path answers */
            if (lv != NULL)
                lane_lv_leave(lv);
            write_refused(l, s, src);
            return;
        }
        if (lv != NULL)
            lane_lv_leave(lv);
        unsigned char *o = l->out + l->out_len;
        unsigned char *e = write_done(l, ns, s->nbytes, s->fua, s->cid, o);
        l->out_len += (size_t)(e - o);
        budget_give_back(l, s->nbytes);
        s->held = 0;
        set_state(l, s, SLOT_FREE);
        return;
    }
    if (src != s->data)
        memcpy(s->data, src, s->nbytes);
    s->kind = IO_WRITE;
    s->lv = lv;
    if (backend_space(ns) < sqes_for(ns, s->fua) || start_io(l, s, IO_WRITE) < 0) {
        s->lv = NULL;
        if (lv != NULL)
            lane_lv_leave(lv);
        to_redo(l, s);  /* (a full ring: the Python path queues it) */
    }
}

/* Data in for slot s (checked by the caller, with room for a response reserved):
   place it; once it is all in, execute. The whole transfer in one PDU (the usual case)
   is written to memory from where it lies, as the Python path does; pieces are
   gathered in the slot's buffer first, since the write may only happen once all of it
   is there, and so is anything for an asynchronous backend (the receive buffer is
   gone by the time it reads). 0: out of memory or the namespace changed meanwhile:
   nothing done, the Python path takes the write over. */
static int place(struct bt_lane *l, struct bt_cmd *s, uint32_t datao,
                 const unsigned char *data, uint32_t n)
{
    if (s->ns->stale)
        return 0;
    const unsigned char *src = data;
    if (n < s->nbytes || is_async(s->ns)) {
        if (s->received == 0 && io_buffer(s, s->nbytes, 0) == NULL)
            return 0;
        memcpy(s->data + datao, data, n);
        src = s->data;
    }
    s->received += n;
    if (s->received == s->nbytes)
        write_in(l, s, src);
    return 1;
}

/* Is this H2CData the next piece of slot s, exactly as the Python path would place it
   without complaint? */
static int h2c_fits(const struct bt_lane *l, const struct bt_cmd *s, uint16_t cccid,
                    uint32_t datao, uint32_t n, int last)
{
    if (s == NULL || s->cid != cccid || datao != s->received || n > s->nbytes - datao
        || n > l->maxh2cdata)
        return 0;
    return (s->received + n == s->nbytes) == (last != 0);
}

static size_t lane_rx(struct bt_lane *l, const unsigned char *in, size_t len);
static size_t lane_run(struct bt_lane *l, const unsigned char *in, size_t len,
                       unsigned max_cmds, size_t max_out, unsigned *ncmds);

static int lane_h2c(struct bt_lane *l, uint16_t cccid, uint16_t ttag, uint32_t datao,
                    const unsigned char *data, uint32_t n, int last)
{
    struct bt_cmd *s = slot_of_ttag(l, ttag);
    if (!h2c_fits(l, s, cccid, datao, n, last))
        return 0;
    if (reserve(l, resp_len(l)) == NULL)
        return 0;
    int placed = place(l, s, datao, data, n);
    submit_touched(l);
    return placed;
}

/* An H2CData PDU of plen bytes of which only `have` are in the buffer, header whole:
   the lane receives its payload itself, now and from the next buffers (bt_lane_rx), into
   the write's buffer, computing the data digest as the bytes come. 1 taken (all `have`
   bytes), 0 Python's (its decoder then gathers the PDU). */
static int begin_h2c(struct bt_lane *l, const unsigned char *p, uint32_t plen, size_t have)
{
    size_t hend = DATA_HLEN + (l->hdgst ? DIGEST : 0);
    size_t dd = l->ddgst ? DIGEST : 0;
    uint8_t want = (l->hdgst ? F_HDGST : 0) | (l->ddgst ? F_DDGST : 0);
    if (have < hend || p[2] != DATA_HLEN || (p[1] & ~F_LAST) != want || p[3] != hend
        || plen <= hend + dd)
        return 0;
    uint32_t n = plen - (uint32_t)hend - (uint32_t)dd;
    if (ld32(p + 16) != n)
        return 0;
    struct bt_cmd *s = slot_of_ttag(l, ld16(p + 10));
    uint32_t datao = ld32(p + 12);
    if (!h2c_fits(l, s, ld16(p + 8), datao, n, p[1] & F_LAST) || s->ns->stale)
        return 0;
    if (l->hdgst && ld32(p + DATA_HLEN) != bt_crc32c(0, p, DATA_HLEN))
        return 0;
    if (s->received == 0 && io_buffer(s, s->nbytes, 0) == NULL)
        return 0;
    l->rx_slot = (uint32_t)(s - l->slot);
    l->rx_off = datao;
    l->rx_n = n;
    l->rx_crc = 0;
    l->rx_last = p[1] & F_LAST;
    l->rx_left = n;
    l->rx_dleft = (uint8_t)dd;
    lane_rx(l, p + hend, have - hend);
    return 1;
}

static size_t lane_rx(struct bt_lane *l, const unsigned char *in, size_t len)
{
    size_t pos = 0;
    struct bt_cmd *s = &l->slot[l->rx_slot];
    if (l->rx_left) {
        uint32_t n = len < l->rx_left ? (uint32_t)len : l->rx_left;
        memcpy(s->data + l->rx_off, in, n);
        if (l->ddgst)
            l->rx_crc = bt_crc32c(l->rx_crc, in, n);
        l->rx_off += n;
        l->rx_left -= n;
        pos = n;
    }
    while (l->rx_left == 0 && l->rx_dleft && pos < len) {
        l->rx_dgst[DIGEST - l->rx_dleft] = in[pos++];
        l->rx_dleft--;
    }
    if (l->rx_left || l->rx_dleft)
        return pos;
    /* the PDU is whole */
    l->rx_pdus++;
    if (l->ddgst && ld32(l->rx_dgst) != l->rx_crc)
        s->corrupt = 1;  /* the Python path fails the write once all its data is in */
    s->received += l->rx_n;
    if (s->received == s->nbytes && reserve(l, resp_len(l)) != NULL)
        write_in(l, s, s->data);
    else if (s->received == s->nbytes)
        to_redo(l, s);
    submit_touched(l);  /* (every entry point submits what it queued before returning) */
    return pos;
}

/* One H2CData PDU at p (plen bytes, all there): 1 taken, 0 Python's. */
static int take_h2c(struct bt_lane *l, const unsigned char *p, uint32_t plen)
{
    size_t hend = DATA_HLEN + (l->hdgst ? DIGEST : 0);
    size_t dd = l->ddgst ? DIGEST : 0;
    uint8_t want = (l->hdgst ? F_HDGST : 0) | (l->ddgst ? F_DDGST : 0);
    if (p[2] != DATA_HLEN || (p[1] & ~F_LAST) != want || p[3] != hend || plen <= hend + dd)
        return 0;
    uint32_t n = plen - (uint32_t)hend - (uint32_t)dd;
    if (ld32(p + 16) != n)
        return 0;                 /* Python: DATAL mismatch, fatal */
    struct bt_cmd *s = slot_of_ttag(l, ld16(p + 10));
    if (!h2c_fits(l, s, ld16(p + 8), ld32(p + 12), n, p[1] & F_LAST))
        return 0;
    if (l->hdgst && ld32(p + DATA_HLEN) != bt_crc32c(0, p, DATA_HLEN))
        return 0;
    if (l->ddgst && ld32(p + hend + n) != bt_crc32c(0, p + hend, n))
        return 0;
    if (reserve(l, resp_len(l)) == NULL)
        return 0;
    return place(l, s, ld32(p + 12), p + hend, n);
}

/* The largest capsule the lane carries across buffers: a command with the most in-capsule
   data the queue accepts, its digests and a little padding. */
static uint32_t carry_max(const struct bt_lane *l)
{
    return CMD_HLEN + 2 * DIGEST + l->icd_limit + 128;
}

/* A receive buffer ends inside a capsule (its first `have` bytes at p): keep them, to
   finish with the next buffer (else the Python decoder gathers the capsule, and the
   command goes the Python path's way: on a real socket that was one 4 KiB write in
   ten). 1 kept, 0 not (the Python path's, as before). */
static int begin_carry(struct bt_lane *l, const unsigned char *p, size_t have)
{
    uint32_t plen = have >= 8 ? ld32(p + 4) : 0;
    if (p[0] != PDU_CAPSULE_CMD || (have >= 8 && (plen > carry_max(l) || plen <= have)))
        return 0;
    if (l->carry == NULL && (l->carry = malloc(carry_max(l))) == NULL)
        return 0;
    memcpy(l->carry, p, have);
    l->carry_len = (uint32_t)have;
    l->carry_plen = plen;
    return 1;
}

static size_t lane_carry(struct bt_lane *l, const unsigned char *in, size_t len, int run,
                         unsigned char **handed, size_t *nhanded, unsigned *ncmds)
{
    size_t pos = 0;
    *handed = NULL;
    *nhanded = 0;
    *ncmds = 0;
    if (l->carry_plen == 0) {  /* the common header first */
        size_t n = len < 8 - l->carry_len ? len : 8 - l->carry_len;
        memcpy(l->carry + l->carry_len, in, n);
        l->carry_len += (uint32_t)n;
        pos = n;
        if (l->carry_len < 8)
            return pos;
        l->carry_plen = ld32(l->carry + 4);
        if (l->carry_plen > carry_max(l) || l->carry_plen < 8) {
            /* not a capsule the lane could carry: what it has goes to the Python path
               (whose decoder then judges the PDU), and so does the rest */
            goto hand;
        }
    }
    size_t need = l->carry_plen - l->carry_len;
    size_t n = len - pos < need ? len - pos : need;
    memcpy(l->carry + l->carry_len, in + pos, n);
    l->carry_len += (uint32_t)n;
    pos += n;
    if (l->carry_len < l->carry_plen)
        return pos;
    if (run && lane_run(l, l->carry, l->carry_plen, 1, (size_t)-1, ncmds) == l->carry_plen) {
        l->carry_len = l->carry_plen = 0;
        return pos;
    }
hand:
    *nhanded = l->carry_len;
    *handed = malloc(l->carry_len);
    if (*handed != NULL)
        memcpy(*handed, l->carry, l->carry_len);
    l->carry_len = l->carry_plen = 0;
    return pos;
}

static size_t lane_run(struct bt_lane *l, const unsigned char *in, size_t len,
                       unsigned max_cmds, size_t max_out, unsigned *ncmds)
{
    size_t pos = 0;
    size_t chlen = CMD_HLEN + (l->hdgst ? DIGEST : 0);
    size_t dhlen = DATA_HLEN + (l->hdgst ? DIGEST : 0);
    uint8_t hflag = l->hdgst ? F_HDGST : 0;
    unsigned n = 0;
    struct pgroup g;
    g.n = 0;
    while (n < max_cmds && len - pos >= 8) {
        const unsigned char *p = in + pos;
        uint32_t plen = ld32(p + 4);
        if (p[0] != PDU_CAPSULE_CMD || plen > len - pos)
            psend_flush(l);  /* (before anything else of the lane's: see pmem_read_held) */
        if (g.n && p[0] != PDU_CAPSULE_CMD && !group_commit(l, &g, &pos, &n))
            break;  /* (H2CData may complete a write and answer it: the group's first) */
        if (plen > len - pos) {
            /* a PDU that goes on in the next buffers: a write's data is received by the
               lane as it comes, a capsule kept to finish (else Python's decoder gathers
               either: one more copy, and the command the Python path's) */
            if (p[0] == PDU_H2C_DATA && plen >= dhlen && begin_h2c(l, p, plen, len - pos))
                pos = len;  /* (counted in rx_pdus once whole, as the decoder counts) */
            else if (begin_carry(l, p, len - pos))
                pos = len;  /* (counted when executed) */
            break;
        }
        if (p[0] == PDU_H2C_DATA) {
            if (plen < dhlen || !take_h2c(l, p, plen))
                break;
            pos += plen;
            n++;
            continue;
        }
        if (p[0] != PDU_CAPSULE_CMD || p[2] != CMD_HLEN || plen < chlen)
            break;
        /* flags: HDGSTF exactly as negotiated; DDGSTF exactly when data is digested */
        uint8_t want = hflag | (plen > chlen && l->ddgst ? F_DDGST : 0);
        if (p[1] != want)
            break;
        struct cmd c = {0};
        long reply = accept_capsule(l, p, plen, &c);
        if (reply >= 0 && g.n && !group_fits(l, &g, &c, reply)
            && !group_commit(l, &g, &pos, &n)) {
            lv_drop(&c);
            break;  /* (the group's writes are the Python path's now, and all after) */
        }
        if (reply < 0)
            break;
        unsigned char *o = NULL;  /* (an asynchronous command answers later) */
        int sent = pmem_send_wanted(l, &c);  /* (its reply does not go into `out`) */
        if ((n > 0 && l->out_len + (size_t)reply > max_out)
            || (reply > 0 && !sent && (o = reserve(l, (size_t)reply)) == NULL)) {
            lv_drop(&c);
            break;
        }
        uint16_t cid = ld16(c.sqe + 2);
        int async = is_async(c.ns) && !c.zero;
        if (c.act == ACT_WRITE_R2T) {
            if (!start_r2t(l, &c, cid, o))
                break;            /* no budget (the Python path makes it wait) */
        } else if (async) {
            if (!exec_async(l, &c, cid)) {
                lv_drop(&c);
                break;            /* a full ring, no memory: Python queues it */
            }
        } else if (c.ns->backend == BT_BE_PMEM && !c.zero && !pmem_ready(l, &c)) {
            lv_drop(&c);
            break;
        }
        if (!l->flow_disabled)
            l->sqhd = (uint16_t)((l->sqhd + 1) % ((uint32_t)l->sqsize + 1));
        int refused = 0;
        if (sent)
            sent = pmem_read_held(l, &c, cid);
        if (!sent) {
            psend_flush(l);  /* (the held reads leave before this command's output) */
            if (o == NULL && reply > 0 && (o = reserve(l, (size_t)reply)) == NULL)
                sent = -1;  /* (a read not held, and no room to copy it: Python's) */
        }
        if (sent) {
            if (sent < 0)
                pmem_refused(l, &c, cid, IO_READ);
            lv_drop(&c);
            refused = sent < 0;
            reply = 0;
        } else if (c.act != ACT_WRITE_R2T && !async) {
            long done = group_fits(l, &g, &c, reply)
                      ? group_join(l, &g, &c, cid, reply, pos, n)
                      : exec_sync(l, &c, cid, o, reply);
            lv_drop(&c);          /* (memory and pmem are done with it; a group holds none) */
            refused = done != reply;
            reply = done;
        }
        l->out_len += (size_t)reply;
        pos += plen;
        n++;
        if (refused)
            break;  /* the Python path answers it before anything after it, in order */
    }
    psend_flush(l);
    size_t end = pos;
    if (!group_commit(l, &g, &pos, &n)) {  /* (before anything it answered is sent) */
        if (end == len && in != l->carry)
            l->carry_len = l->carry_plen = 0;  /* (a capsule begun above: Python's too) */
    } else if (n < max_cmds && pos < len && len - pos < 8
               && begin_carry(l, in + pos, len - pos)) {
        pos = len;  /* a capsule's first bytes, its length not even there yet */
    }
    submit_touched(l);
    *ncmds = n;
    return pos;
}

/* ---- the public calls: each settles its operations' latency (settle) ---- */

/* A public call's start: its clock read, which its commands' submission times share. */
static inline uint64_t call_open(void)
{
    call_ns = lane_now_ns();
    return call_ns;
}

static inline void call_close(struct bt_lane *l, uint64_t t0, uint64_t c0)
{
    call_ns = 0;
    settle(l, t0, c0);
}

size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned *ncmds)
{
    uint64_t c0 = l->cmds, t0 = call_open();
    size_t r = lane_run(l, in, len, max_cmds, max_out, ncmds);
    call_close(l, t0, c0);
    return r;
}

size_t bt_lane_rx(struct bt_lane *l, const unsigned char *in, size_t len)
{
    uint64_t c0 = l->cmds, t0 = call_open();
    size_t r = lane_rx(l, in, len);
    call_close(l, t0, c0);
    return r;
}

size_t bt_lane_carry(struct bt_lane *l, const unsigned char *in, size_t len, int run,
                     unsigned char **handed, size_t *nhanded, unsigned *ncmds)
{
    uint64_t c0 = l->cmds, t0 = call_open();
    size_t r = lane_carry(l, in, len, run, handed, nhanded, ncmds);
    call_close(l, t0, c0);
    return r;
}

int bt_lane_h2c(struct bt_lane *l, uint16_t cccid, uint16_t ttag, uint32_t datao,
                const unsigned char *data, uint32_t n, int last)
{
    uint64_t c0 = l->cmds, t0 = call_open();
    int r = lane_h2c(l, cccid, ttag, datao, data, n, last);
    call_close(l, t0, c0);
    return r;
}
