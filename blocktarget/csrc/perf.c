/* `blocktarget perf` in C: one NVMe/TCP I/O queue driven at full speed.
 *
 * Python connects (ICReq/ICResp, Fabrics Connect, Identify: blocktarget/host/), then
 * lends this loop the connected socket and what was negotiated (struct bt_perf), and
 * bt_perf_run executes one phase of the workload with the GIL released: the timed run,
 * the --verify prefill, or the --verify read-back of written blocks. It returns with
 * no command outstanding (all drained) unless the connection failed, so the Python
 * queue pair takes the socket back between PDUs and disconnects cleanly. The Python
 * engine (host/perf.py, _Engine) is the reference: same workload shapes, same verify
 * rules, same histogram, same reactions to a misbehaving controller; the differential
 * tests (tests/unit/test_perf_c.py, tests/integration/test_perf_engines.py) hold the
 * two to it.
 *
 * Design, and why:
 * - One thread, one socket, non-blocking, poll() only when there is nothing to do: a
 *   load generator must spend its CPU on I/O, and a blocked poll costs none, so the CPU
 *   time per I/O it reports is the work it did, not a spinning loop. What a wakeup
 *   costs (a context switch: about 10 µs in this VM, as much as 8 I/Os' work) is paid
 *   per batch: poll waits for a batch of answers (SO_RCVLOWAT, set_lowat), and while
 *   received data is waiting freed commands are resubmitted in rounds.
 * - Send side: every capsule and H2CData header is built in a small per-command area
 *   (cid = slot index) and queued as an iovec, data by reference (the write buffer, or
 *   the command's --verify pattern); everything produced while handling one receive
 *   batch goes out in one sendmsg. A command's area is reused only once the controller
 *   has answered what was sent from it, which implies the bytes left this process
 *   (a controller that completes a command early, before its queued bytes were written,
 *   parks the command until they were: it is never reused under the kernel's feet).
 * - Receive side: a per-PDU state machine over one receive buffer, as SPDK's
 *   lib/nvme/nvme_tcp.c does it (common header, rest of header, payload, data
 *   digest). Payloads go to the command's buffer only when somebody reads them
 *   (--verify, or land = --copy-data); otherwise they are dropped where they lie. For
 *   large reads the headers are received exactly and each payload straight into its
 *   buffer, or discarded in the kernel without a copy (recv MSG_TRUNC) when nobody
 *   reads it: the bytes crossed the connection, which is what a load generator
 *   measures, and the initiator's CPU stays far below the target's. Data digests are
 *   always computed over the bytes as received.
 * - Every check the Python queue pair makes (host/connection.py and the shared
 *   decoder, nvme/pdu.py) is made here too, with the same outcome: a protocol
 *   violation terminates the connection with an H2CTermReq carrying the same FES, FEI
 *   and header bytes; a data digest mismatch fails only its command (Transient
 *   Transport Error); C2HTermReq, EOF and reset end the run; no completion for
 *   timeout_ns with commands outstanding ends it too (never a hang).
 * - Latency: one CLOCK_MONOTONIC read per receive and per poll; every completion a
 *   receive brings gets its time, every command submitted after it too. Recorded in
 *   perf.py's histogram layout (perf_pattern.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "bt_lane.h"
#include "bt_perf.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the NVMe/TCP initiator loop assumes a little-endian host"
#endif

/* NVMe/TCP 1.0 and NVMe base 2.0 facts used below */
#define PDU_IC_RESP 0x01
#define PDU_H2C_TERM 0x02
#define PDU_C2H_TERM 0x03
#define PDU_CMD 0x04
#define PDU_RESP 0x05
#define PDU_H2C_DATA 0x06
#define PDU_C2H_DATA 0x07
#define PDU_R2T 0x09
#define F_HDGST 0x01
#define F_DDGST 0x02
#define F_LAST 0x04
#define F_SUCCESS 0x08
#define CMD_HLEN 72
#define SMALL_HLEN 24          /* CapsuleResp, C2HData, H2CData, R2T, TermReq */
#define TERM_MAX_DATA 128
#define DIGEST 4
#define FES_INVALID_HEADER 0x01
#define FES_SEQUENCE 0x02
#define FES_HDGST 0x03
#define FES_RANGE 0x04
#define FES_LIMIT 0x05
#define OFF_TYPE 0
#define OFF_FLAGS 1
#define OFF_HLEN 2
#define OFF_PDO 3
#define OFF_PLEN 4
#define OFF_CCCID 8
#define OFF_DATAO 12
#define OFF_DATAL 16
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define PSDT_SGL 0x40
#define SGL_ID_INCAPSULE 0x01
#define SGL_ID_TRANSPORT 0x5A
#define ST_DATA_XFER_ERROR 0x04
#define ST_TRANSIENT_TRANSPORT 0x22
#define UNKNOWN_GEN 0xFFFFFFFFu

/* a per-command header cell: header + digest + padding (pdo <= 128) then the data
   digest at CELL_DDGST */
#define CELL 136
#define CELL_DDGST 128
#define RX_CAP (256u * 1024)
#define DIRECT_MIN 16384u      /* payload left to receive for recv() straight to its place */
#define SKIM_MIN 32768u        /* I/O size from which headers are received exactly */
#define POLL_MAX_MS 100
#define LOWAT_MAX (1u << 20)
#define LOWAT_WAIT_MS 2
#define MAX_IOV 1024

enum { RX_CH, RX_HDR, RX_DATA, RX_DDGST };

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

struct slot {
    uint64_t unit;
    uint64_t start;
    uint64_t tx_end;            /* tx byte count through this command's last queued PDU */
    unsigned char *buf;         /* reads: landing buffer; verify writes: the pattern */
    const unsigned char *out;   /* write data */
    unsigned char *hdr;         /* header cells: capsule, then one per H2CData of an R2T */
    uint32_t received, sent;
    uint32_t gen;
    uint16_t status_override;
    uint8_t busy, is_read, r2t, parked;
};

struct st {
    struct bt_perf *p;
    struct slot *slots;
    uint32_t nslots, nh2c, nlb, calign;
    uint32_t *freel;
    uint32_t nfree, inflight, active, parked;
    int stopping;
    int exact;                  /* large reads: headers received exactly, payloads
                                   straight to their place or discarded in the kernel */
    uint32_t refill;            /* free slots worth a submission round while data waits */
    uint32_t resp_min;          /* fewest bytes a command's answer puts on the wire */
    uint32_t lowat;             /* SO_RCVLOWAT set on the socket (1: the default) */
    uint64_t rx_bytes, done;    /* this phase: bytes received, commands completed */
    /* send queue */
    struct iovec *iov;
    uint32_t iov_head, iov_tail, iov_cap;
    uint64_t tx_queued, tx_sent;
    /* receive buffer and the PDU being received */
    unsigned char *rx;
    size_t rpos, rend;
    int rstate;
    uint32_t hdr_need, data_len, plen;
    uint8_t type, flags, pdo, ddgst_on;
    struct slot *dslot;
    unsigned char *ddest;
    uint32_t dremain, dcrc, ddatal;
    uint8_t dflags;
    /* workload */
    uint64_t rng, cursor;
    uint8_t *busy;              /* verify: one bit per unit in flight */
    uint32_t *wcrc;             /* data digests of wbuf's standard H2CData chunks */
    uint32_t wcrc_all;          /* ... and of all of it (in-capsule writes) */
    uint64_t now, last_progress;
    /* the H2CTermReq we send when the controller breaks the protocol */
    unsigned char term[SMALL_HLEN + TERM_MAX_DATA];
    uint32_t term_len;
};

static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- random numbers: splitmix64 (seeding) and xorshift64* (the stream) ---- */

static uint64_t splitmix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline uint64_t rnd(struct st *s)
{
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* uniform in [0, n): the high half of a 64x64-bit product (Lemire), without a division */
static inline uint64_t rnd_below(struct st *s, uint64_t n)
{
#ifdef __SIZEOF_INT128__
    return (uint64_t)(((unsigned __int128)rnd(s) * n) >> 64);
#else
    return rnd(s) % n;
#endif
}

/* ---- errors ---- */

static int fail(struct st *s, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct st *s, int kind, const char *fmt, ...)
{
    struct bt_perf *p = s->p;
    if (p->fatal)
        return -1;
    p->fatal = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, sizeof p->msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* A protocol violation by the controller: remember the H2CTermReq to send (fes != 0),
   carrying `hlen` bytes of the offending header, as connection.py's _fatal does. */
static int violation(struct st *s, uint32_t fes, uint32_t fei, const unsigned char *hdr,
                     uint32_t hlen, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static int violation(struct st *s, uint32_t fes, uint32_t fei, const unsigned char *hdr,
                     uint32_t hlen, const char *fmt, ...)
{
    struct bt_perf *p = s->p;
    if (p->fatal)
        return -1;
    p->fatal = BT_PERF_PROTOCOL;
    p->fes = fes;
    p->fei = fei;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, sizeof p->msg, fmt, ap);
    va_end(ap);
    if (fes) {
        if (hlen > TERM_MAX_DATA)
            hlen = TERM_MAX_DATA;
        unsigned char *t = s->term;
        memset(t, 0, SMALL_HLEN);
        t[0] = PDU_H2C_TERM;
        t[2] = SMALL_HLEN;
        st32(t + 4, SMALL_HLEN + hlen);
        st16(t + 8, (uint16_t)fes);
        st32(t + 10, fei);
        if (hlen)
            memcpy(t + SMALL_HLEN, hdr, hlen);
        s->term_len = SMALL_HLEN + hlen;
    }
    return -1;
}

static void event(struct st *s, uint32_t kind, const struct slot *sl, uint32_t status,
                  uint32_t gen)
{
    struct bt_perf *p = s->p;
    if (p->nev >= p->ev_max)
        return;
    struct bt_perf_event *e = &p->ev[p->nev];
    e->kind = kind;
    e->is_read = sl->is_read;
    e->unit = sl->unit;
    e->status = status;
    e->gen = gen;
    if (kind == BT_PERF_EV_VERIFY && p->ev_data != NULL && sl->buf != NULL)
        memcpy(p->ev_data + (size_t)p->nev * p->io_size, sl->buf, p->io_size);
    p->nev++;
}

/* ---- send queue ---- */

static inline void push(struct st *s, const void *base, size_t len)
{
    if (s->iov_tail == s->iov_cap) {  /* sized for the worst case (setup): compact */
        uint32_t n = s->iov_tail - s->iov_head;
        memmove(s->iov, s->iov + s->iov_head, n * sizeof *s->iov);
        s->iov_head = 0;
        s->iov_tail = n;
    }
    s->iov[s->iov_tail].iov_base = (void *)base;
    s->iov[s->iov_tail].iov_len = len;
    s->iov_tail++;
    s->tx_queued += len;
}

static void unpark(struct st *s);

/* Write what is queued until done or the socket is full; <0: the connection failed. */
/* Write what is queued until done or the socket is full; <0: the connection failed.
   (Sending large payloads by reference, vmsplice into a pipe and splice into the
   socket, was tried for 128 KiB writes: it cost more CPU than the copy it saves, the
   loopback then building and delivering many small page-sized segments.) */
static int flush(struct st *s)
{
    struct bt_perf *p = s->p;
    while (s->iov_head < s->iov_tail) {
        uint32_t cnt = s->iov_tail - s->iov_head;
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = s->iov + s->iov_head;
        m.msg_iovlen = cnt < MAX_IOV ? cnt : MAX_IOV;
        ssize_t n = sendmsg(p->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        p->syscalls_tx++;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            p->err = errno;
            return fail(s, BT_PERF_CLOSED, "send: %s", strerror(errno));
        }
        s->tx_sent += (uint64_t)n;
        s->last_progress = s->now;
        size_t left = (size_t)n;
        while (left) {
            struct iovec *v = &s->iov[s->iov_head];
            if (left >= v->iov_len) {
                left -= v->iov_len;
                s->iov_head++;
            } else {
                v->iov_base = (char *)v->iov_base + left;
                v->iov_len -= left;
                left = 0;
            }
        }
    }
    if (s->iov_head == s->iov_tail)
        s->iov_head = s->iov_tail = 0;
    if (s->parked)
        unpark(s);
    return 0;
}

/* ---- commands ---- */

static inline uint32_t align_up(uint32_t v, uint32_t a) { return (v + a - 1) / a * a; }

static void put_capsule(struct st *s, struct slot *sl, uint16_t cid, uint8_t opc,
                        uint64_t slba, uint32_t cdw12)
{
    struct bt_perf *p = s->p;
    unsigned char *h = sl->hdr;
    int data = !sl->is_read && !sl->r2t;
    uint32_t base = CMD_HLEN + (p->hdgst ? DIGEST : 0);
    uint32_t pdo = data ? align_up(base, s->calign) : 0;
    uint32_t plen = data ? pdo + p->io_size + (p->ddgst ? DIGEST : 0) : base;
    memset(h, 0, CMD_HLEN);
    h[0] = PDU_CMD;
    h[1] = (p->hdgst ? F_HDGST : 0) | (p->ddgst && data ? F_DDGST : 0);
    h[2] = CMD_HLEN;
    h[3] = (unsigned char)pdo;
    st32(h + 4, plen);
    unsigned char *q = h + 8;  /* the SQE */
    q[0] = opc;
    q[1] = PSDT_SGL;
    st16(q + 2, cid);
    st32(q + 4, p->nsid);
    /* SGL (bytes 24..39): address 0 (offset 0 in the capsule, or none), length, type */
    st32(q + 32, p->io_size);
    q[39] = data ? SGL_ID_INCAPSULE : SGL_ID_TRANSPORT;
    st32(q + 40, (uint32_t)slba);
    st32(q + 44, (uint32_t)(slba >> 32));
    st32(q + 48, cdw12);
    if (p->hdgst)
        st32(h + CMD_HLEN, bt_crc32c(0, h, CMD_HLEN));
    push(s, h, data ? pdo : base);
    if (data) {
        push(s, sl->out, p->io_size);
        if (p->ddgst) {
            uint32_t crc = p->verify ? bt_crc32c(0, sl->out, p->io_size) : s->wcrc_all;
            st32(h + CELL_DDGST, crc);
            push(s, h + CELL_DDGST, DIGEST);
        }
    }
    sl->tx_end = s->tx_queued;
}

static inline int unit_busy(const struct st *s, uint64_t u)
{
    return (s->busy[u >> 3] >> (u & 7)) & 1;
}

/* The next unit for a free slot, as perf.py's _Engine._pick_unit / _sweep choose it;
   -1: none (the slot retires). */
static int64_t next_unit(struct st *s)
{
    struct bt_perf *p = s->p;
    uint64_t units = p->units;
    if (p->mode == BT_PERF_PREFILL)
        return s->cursor < units ? (int64_t)s->cursor++ : -1;
    if (p->mode == BT_PERF_READBACK) {
        while (s->cursor < units) {
            uint32_t g = p->gens[s->cursor];
            if (g != 0 && g != 1 && g != UNKNOWN_GEN)
                return (int64_t)s->cursor++;
            s->cursor++;
        }
        return -1;
    }
    uint64_t u;
    if (p->random) {
        u = rnd_below(s, units);
        if (p->verify) {
            for (int tries = 0; unit_busy(s, u) && tries < 64; tries++)
                u = rnd_below(s, units);
            if (unit_busy(s, u))
                return -1;
        }
    } else {
        u = s->cursor;
        if (p->verify) {
            /* skip blocks still in flight (the working set wrapped under us) */
            for (uint32_t i = 0; i < s->inflight && unit_busy(s, u); i++)
                u = u + 1 < units ? u + 1 : 0;
            if (unit_busy(s, u))
                return -1;
        }
        s->cursor = u + 1 < units ? u + 1 : 0;
    }
    return (int64_t)u;
}

static int submit(struct st *s, struct slot *sl)
{
    struct bt_perf *p = s->p;
    int64_t u = next_unit(s);
    if (u < 0)
        return -1;
    uint16_t cid = (uint16_t)(sl - s->slots);
    int is_read;
    if (p->mode == BT_PERF_TIMED)
        is_read = p->read_share >= 100 || (p->read_share && rnd_below(s, 100) < p->read_share);
    else
        is_read = p->mode == BT_PERF_READBACK;
    uint64_t slba = (p->first_unit + (uint64_t)u) * s->nlb;
    sl->unit = (uint64_t)u;
    sl->is_read = (uint8_t)is_read;
    sl->start = s->now;
    sl->received = sl->sent = 0;
    sl->status_override = 0;
    sl->busy = 1;
    if (p->verify)
        s->busy[(uint64_t)u >> 3] |= (uint8_t)(1u << (u & 7));
    s->inflight++;
    p->submitted++;
    if (is_read) {
        sl->r2t = 0;
        put_capsule(s, sl, cid, OPC_READ, slba, s->nlb - 1);
        return 0;
    }
    uint32_t cdw12 = s->nlb - 1;
    if (p->mode == BT_PERF_TIMED) {
        cdw12 |= p->write_flags;
        if (p->verify) {
            uint32_t g = p->next_gen;
            p->next_gen = g + 1 < UNKNOWN_GEN ? g + 1 : 2;
            sl->gen = g;
        }
    } else {
        sl->gen = 1;  /* prefill */
    }
    if (p->verify) {
        bt_perf_make_pattern(sl->buf, slba, s->nlb, p->lba_size, sl->gen);
        sl->out = sl->buf;
    } else {
        sl->out = p->wbuf;
    }
    sl->r2t = p->io_size > p->icd_max;
    put_capsule(s, sl, cid, OPC_WRITE, slba, cdw12);
    return 0;
}

static void unpark(struct st *s)
{
    for (uint32_t i = 0; i < s->nslots && s->parked; i++) {
        struct slot *sl = &s->slots[i];
        if (sl->parked && sl->tx_end <= s->tx_sent) {
            sl->parked = 0;
            s->parked--;
            s->freel[s->nfree++] = i;
        }
    }
}

static void complete(struct st *s, struct slot *sl, uint32_t status)
{
    struct bt_perf *p = s->p;
    s->inflight--;
    p->completed++;
    s->done++;
    s->last_progress = s->now;
    if (p->verify)
        s->busy[sl->unit >> 3] &= (uint8_t)~(1u << (sl->unit & 7));
    if (p->mode == BT_PERF_TIMED) {
        struct bt_perf_dir *d = sl->is_read ? &p->rd : &p->wr;
        if (status) {
            d->errors++;
            event(s, BT_PERF_EV_STATUS, sl, status, 0);
            if (p->verify && !sl->is_read)
                p->gens[sl->unit] = UNKNOWN_GEN;  /* content now unknown: never verify it */
        } else {
            uint64_t lat = s->now > sl->start ? s->now - sl->start : 0;
            bt_perf_hist_record(d, lat);
            d->bytes += p->io_size;
            d->ops++;  /* last: a reader of live counters sees ops with their latency */
            if (p->verify) {
                if (!sl->is_read) {
                    p->gens[sl->unit] = sl->gen;
                } else {
                    uint32_t g = p->gens[sl->unit];
                    if (g != 0 && g != UNKNOWN_GEN) {
                        p->verified_reads++;
                        if (bt_perf_check_pattern(sl->buf, (p->first_unit + sl->unit) * s->nlb,
                                                  s->nlb, p->lba_size, g)) {
                            p->verify_failures++;
                            event(s, BT_PERF_EV_VERIFY, sl, 0, g);
                        }
                    }
                }
            }
        }
    } else if (p->mode == BT_PERF_PREFILL) {
        p->gens[sl->unit] = status ? UNKNOWN_GEN : 1;
        if (status)
            event(s, BT_PERF_EV_STATUS, sl, status, 0);
    } else {  /* read-back */
        if (status) {
            p->verify_failures++;
            event(s, BT_PERF_EV_STATUS, sl, status, 0);
        } else {
            uint32_t g = p->gens[sl->unit];
            p->verified_reads++;
            if (bt_perf_check_pattern(sl->buf, (p->first_unit + sl->unit) * s->nlb, s->nlb,
                                      p->lba_size, g)) {
                p->verify_failures++;
                event(s, BT_PERF_EV_VERIFY, sl, 0, g);
            }
        }
    }
    sl->busy = 0;
    uint32_t idx = (uint32_t)(sl - s->slots);
    if (sl->tx_end > s->tx_sent) {  /* answered before we even sent it all: wait */
        sl->parked = 1;
        s->parked++;
    } else {
        s->freel[s->nfree++] = idx;
    }
}

/* ---- receive: one PDU at a time ---- */

static struct slot *cmd_of(struct st *s, uint16_t cid)
{
    if (cid >= s->nslots || !s->slots[cid].busy)
        return NULL;
    return &s->slots[cid];
}

/* The common header of the next PDU (8 bytes at h): the checks of nvme/pdu.py's
   Decoder._check_common, in its order, for the types a controller may send. */
static int common_header(struct st *s, const unsigned char *h)
{
    struct bt_perf *p = s->p;
    uint8_t type = h[0], flags = h[1], hlen = h[2], pdo = h[3];
    uint32_t plen = ld32(h + 4);
    if (type == PDU_C2H_TERM) {
        /* never digested; a malformed one is answered by closing, not a TermReq */
        if (hlen != SMALL_HLEN || plen < SMALL_HLEN || plen > SMALL_HLEN + TERM_MAX_DATA) {
            if (hlen != SMALL_HLEN)
                violation(s, FES_INVALID_HEADER, OFF_HLEN, NULL, 0,
                          "protocol error: bad TermReq hlen %u", hlen);
            else
                violation(s, FES_INVALID_HEADER, OFF_PLEN, NULL, 0,
                          "protocol error: bad TermReq plen %u", plen);
            s->term_len = 0;
            return -1;
        }
        s->type = type;
        s->hdr_need = plen;
        s->rstate = RX_HDR;
        return 0;
    }
    if (type == PDU_IC_RESP)
        return violation(s, FES_SEQUENCE, 0, h, 8,
                         "protocol error: second connection init PDU");
    if (type != PDU_RESP && type != PDU_C2H_DATA && type != PDU_R2T)
        return violation(s, FES_INVALID_HEADER, OFF_TYPE, h, 8,
                         "protocol error: unexpected PDU type 0x%x", type);
    uint32_t base = SMALL_HLEN + (p->hdgst ? DIGEST : 0);
    int has_data = plen > base && type == PDU_C2H_DATA;
    int ddgst = (flags & F_DDGST) != 0;
    if (((flags & F_HDGST) != 0) != (p->hdgst != 0))
        return violation(s, FES_INVALID_HEADER, OFF_FLAGS, h, 8,
                         "protocol error: HDGSTF does not match negotiated digest");
    if (has_data && ddgst != (p->ddgst != 0))
        return violation(s, FES_INVALID_HEADER, OFF_FLAGS, h, 8,
                         "protocol error: DDGSTF does not match negotiated digest");
    if (type == PDU_C2H_DATA && (flags & F_SUCCESS) && !(flags & F_LAST))
        return violation(s, FES_INVALID_HEADER, OFF_FLAGS, h, 8,
                         "protocol error: C2HData SUCCESS without LAST");
    if (hlen != SMALL_HLEN)
        return violation(s, FES_INVALID_HEADER, OFF_HLEN, h, 8,
                         "protocol error: bad hlen %u for type 0x%x", hlen, type);
    s->type = type;
    s->flags = flags;
    s->plen = plen;
    if (!has_data) {
        if (plen != base || type == PDU_C2H_DATA)
            return violation(s, FES_INVALID_HEADER, OFF_PLEN, h, 8,
                             "protocol error: bad plen %u for type 0x%x", plen, type);
        s->hdr_need = plen;
        s->rstate = RX_HDR;
        return 0;
    }
    uint32_t align = ((uint32_t)p->hpda + 1) * 4;
    if (pdo < base || pdo % align)
        return violation(s, FES_INVALID_HEADER, OFF_PDO, h, 8,
                         "protocol error: bad pdo %u (header end %u, align %u)", pdo, base,
                         align);
    int64_t data_len = (int64_t)plen - pdo - (ddgst ? DIGEST : 0);
    if (data_len <= 0)
        return violation(s, FES_INVALID_HEADER, OFF_PLEN, h, 8,
                         "protocol error: plen %u leaves no data after pdo %u", plen, pdo);
    if (plen > p->max_pdu)
        return violation(s, FES_LIMIT, 0, h, 8,
                         "protocol error: PDU of %u bytes exceeds limit %u", plen, p->max_pdu);
    s->pdo = pdo;
    s->ddgst_on = (uint8_t)ddgst;
    s->data_len = (uint32_t)data_len;
    s->hdr_need = pdo;
    s->rstate = RX_HDR;
    return 0;
}

static int hdgst_ok(struct st *s, const unsigned char *h)
{
    if (!s->p->hdgst)
        return 1;
    if (ld32(h + SMALL_HLEN) == bt_crc32c(0, h, SMALL_HLEN))
        return 1;
    violation(s, FES_HDGST, 0, h, SMALL_HLEN, "protocol error: header digest mismatch");
    return 0;
}

/* H2CData PDUs answering an R2T (connection.py's _r2t) */
static int r2t(struct st *s, const unsigned char *h)
{
    struct bt_perf *p = s->p;
    uint16_t cid = ld16(h + 8), ttag = ld16(h + 10);
    uint32_t r2to = ld32(h + 12), r2tl = ld32(h + 16);
    struct slot *sl = cmd_of(s, cid);
    if (sl == NULL || sl->is_read || !sl->r2t)
        return violation(s, FES_SEQUENCE, 0, NULL, 0,
                         "R2T for cid %u which has no data to send", cid);
    uint64_t end = (uint64_t)r2to + r2tl;
    if (r2tl == 0 || r2to != sl->sent || end > p->io_size)
        return violation(s, FES_RANGE, OFF_DATAO, NULL, 0,
                         "R2T cid %u offset %u length %u: expected offset %u within %u bytes",
                         cid, r2to, r2tl, sl->sent, p->io_size);
    uint32_t base = SMALL_HLEN + (p->hdgst ? DIGEST : 0);
    uint32_t pdo = align_up(base, s->calign);
    uint32_t off = r2to, k = 0, chunk = p->maxh2cdata;
    while (off < end) {
        uint32_t stop = end - off > chunk ? off + chunk : (uint32_t)end;
        uint32_t n = stop - off;
        unsigned char *c = sl->hdr + CELL * (1 + k);
        memset(c, 0, SMALL_HLEN);
        c[0] = PDU_H2C_DATA;
        c[1] = (p->hdgst ? F_HDGST : 0) | (p->ddgst ? F_DDGST : 0) | (stop == end ? F_LAST : 0);
        c[2] = SMALL_HLEN;
        c[3] = (unsigned char)pdo;
        st32(c + 4, pdo + n + (p->ddgst ? DIGEST : 0));
        st16(c + 8, cid);
        st16(c + 10, ttag);
        st32(c + 12, off);
        st32(c + 16, n);
        if (p->hdgst)
            st32(c + SMALL_HLEN, bt_crc32c(0, c, SMALL_HLEN));
        push(s, c, pdo);
        push(s, sl->out + off, n);
        if (p->ddgst) {
            uint32_t crc;
            /* wbuf never changes: the digests of its standard chunks are computed once */
            if (!p->verify && off % chunk == 0 && (n == chunk || stop == p->io_size))
                crc = s->wcrc[off / chunk];
            else
                crc = bt_crc32c(0, sl->out + off, n);
            st32(c + CELL_DDGST, crc);
            push(s, c + CELL_DDGST, DIGEST);
        }
        off = stop;
        k++;
    }
    sl->sent = (uint32_t)end;
    sl->tx_end = s->tx_queued;
    return 0;
}

/* The rest of the header is in (hdr_need bytes at h): act on it. */
static int header(struct st *s, const unsigned char *h)
{
    struct bt_perf *p = s->p;
    switch (s->type) {
    case PDU_C2H_TERM:
        p->fatal = BT_PERF_TERMREQ;
        p->fes = ld16(h + 8);
        p->fei = ld32(h + 10);
        return -1;
    case PDU_RESP: {
        if (!hdgst_ok(s, h))
            return -1;
        const unsigned char *cqe = h + 8;
        uint16_t cid = ld16(cqe + 12);
        struct slot *sl = cmd_of(s, cid);
        if (sl == NULL)
            return violation(s, 0, 0, NULL, 0, "CapsuleResp for unknown cid %u", cid);
        uint32_t status = ld16(cqe + 14) >> 1;
        if (sl->is_read && status == 0 && sl->received != p->io_size)
            status = ST_DATA_XFER_ERROR;
        if (sl->status_override && status == 0)
            status = sl->status_override;
        complete(s, sl, status);
        s->rstate = RX_CH;
        return 0;
    }
    case PDU_R2T:
        if (!hdgst_ok(s, h) || r2t(s, h) < 0)
            return -1;
        s->rstate = RX_CH;
        return 0;
    default: {  /* C2HData: header done, payload follows */
        if (!hdgst_ok(s, h))
            return -1;
        uint16_t cid = ld16(h + 8);
        uint32_t datao = ld32(h + 12), datal = ld32(h + 16);
        if (datal != s->data_len)
            return violation(s, FES_INVALID_HEADER, OFF_DATAL, h, SMALL_HLEN,
                             "protocol error: DATAL %u does not match PDU data length %u",
                             datal, s->data_len);
        struct slot *sl = cmd_of(s, cid);
        if (sl == NULL || !sl->is_read)
            return violation(s, FES_INVALID_HEADER, OFF_CCCID, NULL, 0,
                             "C2HData for cid %u which expects no data", cid);
        if (datao != sl->received || (uint64_t)datao + datal > p->io_size)
            return violation(s, FES_RANGE, OFF_DATAO, NULL, 0,
                             "C2HData cid %u offset %u length %u: expected offset %u within "
                             "%u bytes", cid, datao, datal, sl->received, p->io_size);
        s->dslot = sl;
        s->ddest = sl->buf != NULL ? sl->buf + datao : NULL;
        s->dremain = datal;
        s->ddatal = datal;
        s->dcrc = 0;
        s->dflags = s->flags;
        s->rstate = RX_DATA;
        return 0;
    }
    }
}

/* The current C2HData PDU is in (payload and digest): account for it; with SUCCESS it
   completes the command (connection.py's _c2h / _data_digest_error). */
static int finish_c2h(struct st *s, int digest_bad)
{
    struct slot *sl = s->dslot;
    struct bt_perf *p = s->p;
    sl->received += s->ddatal;
    s->rstate = RX_CH;
    if (digest_bad)
        sl->status_override = ST_TRANSIENT_TRANSPORT;
    if (s->dflags & F_SUCCESS) {
        if (!digest_bad && sl->received != p->io_size)
            return violation(s, FES_SEQUENCE, 0, NULL, 0,
                             "C2HData SUCCESS for cid %u after %u of %u bytes",
                             (unsigned)(sl - s->slots), sl->received, p->io_size);
        complete(s, sl, sl->status_override);
    }
    return 0;
}

/* Payload bytes of the current C2HData PDU (n <= dremain) */
static inline void payload(struct st *s, const unsigned char *src, uint32_t n)
{
    if (s->ddest != NULL && s->ddest + (s->ddatal - s->dremain) != src)
        memcpy(s->ddest + (s->ddatal - s->dremain), src, n);
    if (s->ddgst_on)
        s->dcrc = bt_crc32c(s->dcrc, src, n);
    s->dremain -= n;
}

/* Act on every complete piece in the receive buffer; <0: fatal. */
static int parse(struct st *s)
{
    for (;;) {
        size_t avail = s->rend - s->rpos;
        const unsigned char *h = s->rx + s->rpos;
        switch (s->rstate) {
        case RX_CH:
            if (avail < 8)
                return 0;
            if (common_header(s, h) < 0)
                return -1;
            break;
        case RX_HDR:
            if (avail < s->hdr_need)
                return 0;
            s->rpos += s->hdr_need;
            if (header(s, h) < 0)
                return -1;
            break;
        case RX_DATA:
            if (s->dremain) {  /* (0: received straight to its place by receive()) */
                if (avail == 0)
                    return 0;
                uint32_t n = avail < s->dremain ? (uint32_t)avail : s->dremain;
                payload(s, h, n);
                s->rpos += n;
            }
            if (s->dremain == 0) {
                if (s->ddgst_on)
                    s->rstate = RX_DDGST;
                else if (finish_c2h(s, 0) < 0)
                    return -1;
            }
            break;
        case RX_DDGST:
            if (avail < DIGEST)
                return 0;
            s->rpos += DIGEST;
            if (finish_c2h(s, ld32(h) != s->dcrc) < 0)
                return -1;
            break;
        }
    }
}

/* One receive; >0 bytes, 0 EOF, <0 errno-style (-EAGAIN...). A payload still to come
   goes straight to its place (or is discarded in the kernel) once the buffer is empty.

   Large reads (exact): a receive into the buffer would copy whatever is queued, payloads
   included, and the payloads then again to their place; so headers are received
   exactly (every PDU a controller sends is at least 24 bytes, plus 4 with header
   digests but for a final TermReq; a data digest is read with the next header) and
   payloads straight into the command's buffer or, when nobody reads them, skipped with
   MSG_TRUNC: a few more system calls, one copy or none. */
static ssize_t receive(struct st *s, int *full)
{
    struct bt_perf *p = s->p;
    ssize_t n;
    *full = 0;
    if (s->rstate == RX_DATA && s->rpos == s->rend && s->dremain
        && (s->dremain >= DIRECT_MIN || s->exact) && (s->ddest != NULL || !s->ddgst_on)) {
        s->rpos = s->rend = 0;
        if (s->ddest != NULL) {
            unsigned char *dst = s->ddest + (s->ddatal - s->dremain);
            n = recv(p->fd, dst, s->dremain, MSG_DONTWAIT);
            p->syscalls_rx++;
            if (n > 0) {
                payload(s, dst, (uint32_t)n);
                *full = s->dremain == 0;
            }
        } else {
            size_t want = s->dremain < RX_CAP ? s->dremain : RX_CAP;
            n = recv(p->fd, s->rx, want, MSG_DONTWAIT | MSG_TRUNC);
            p->syscalls_rx++;
            if (n > 0) {
                s->dremain -= (uint32_t)n;
                *full = s->dremain == 0 || (size_t)n == want;
            }
        }
        return n < 0 ? -errno : n;
    }
    if (s->rpos == s->rend) {
        s->rpos = s->rend = 0;
    } else if (s->rpos) {  /* at most a partial header is left: move it to the front */
        memmove(s->rx, s->rx + s->rpos, s->rend - s->rpos);
        s->rend -= s->rpos;
        s->rpos = 0;
    }
    size_t room = RX_CAP - s->rend;
    if (s->exact && s->rstate != RX_DATA) {
        size_t have = s->rend, want, base = SMALL_HLEN + (p->hdgst ? DIGEST : 0);
        if (s->rstate == RX_HDR)
            want = s->hdr_need - have;
        else if (s->rstate == RX_DDGST)  /* the digest and the next PDU's header */
            want = DIGEST + base - have;
        else  /* RX_CH with less than a common header */
            want = base - have;
        n = recv(p->fd, s->rx + s->rend, want, MSG_DONTWAIT);
        p->syscalls_rx++;
        if (n > 0) {
            s->rend += (size_t)n;
            *full = 1;  /* the rest may well be there: try before polling */
        }
        return n < 0 ? -errno : n;
    }
    n = recv(p->fd, s->rx + s->rend, room, MSG_DONTWAIT);
    p->syscalls_rx++;
    if (n > 0) {
        s->rend += (size_t)n;
        *full = (size_t)n == room;
    }
    return n < 0 ? -errno : n;
}

/* ---- setup ---- */

static void teardown(struct st *s)
{
    if (s->slots != NULL) {
        for (uint32_t i = 0; i < s->nslots; i++) {
            free(s->slots[i].buf);
            free(s->slots[i].hdr);
        }
    }
    free(s->slots);
    free(s->freel);
    free(s->iov);
    free(s->rx);
    free(s->busy);
    free(s->wcrc);
}

static void *zalloc_aligned(size_t n)
{
    void *m = NULL;
    if (posix_memalign(&m, 4096, n ? n : 1) != 0)
        return NULL;
    memset(m, 0, n);
    return m;
}

static int setup(struct st *s, struct bt_perf *p)
{
    memset(s, 0, sizeof *s);
    s->p = p;
    if (p->qd == 0 || p->qd > 65535 || p->lba_size == 0 || p->io_size == 0
        || p->io_size % p->lba_size || p->units == 0 || p->maxh2cdata < 4
        || p->read_share > 100 || p->cpda > 31 || p->hpda > 31 || p->mode > BT_PERF_READBACK
        || p->max_pdu < 64 || p->rd.hist == NULL || p->wr.hist == NULL
        || (p->verify && p->gens == NULL) || (p->mode != BT_PERF_TIMED && !p->verify)
        || (!p->verify && p->wbuf == NULL && p->read_share < 100)
        || (p->ev_max && p->ev == NULL) || p->io_size / p->lba_size > 65536)
        return fail(s, BT_PERF_BADCFG, "invalid configuration");
    s->nlb = p->io_size / p->lba_size;
    s->calign = ((uint32_t)p->cpda + 1) * 4;
    s->nh2c = (p->io_size + p->maxh2cdata - 1) / p->maxh2cdata;
    s->nslots = p->qd;
    s->slots = calloc(s->nslots, sizeof *s->slots);
    s->freel = calloc(s->nslots, sizeof *s->freel);
    /* what can be queued at once: per command its capsule (header, data, digest) or
       the H2CData PDUs answering one R2T (MAXR2T 0: one at a time), plus a TermReq */
    uint64_t cap = (uint64_t)s->nslots * (3 + 3 * (uint64_t)s->nh2c) + 8;
    if (cap > (1u << 22))
        return fail(s, BT_PERF_BADCFG, "queue depth x transfer size too large");
    s->iov_cap = (uint32_t)cap;
    s->iov = calloc(s->iov_cap, sizeof *s->iov);
    s->rx = malloc(RX_CAP);
    if (s->slots == NULL || s->freel == NULL || s->iov == NULL || s->rx == NULL)
        return fail(s, BT_PERF_NOMEM, "out of memory");
    int need_buf = p->verify || p->land;
    for (uint32_t i = 0; i < s->nslots; i++) {
        struct slot *sl = &s->slots[i];
        sl->hdr = zalloc_aligned((size_t)CELL * (1 + s->nh2c));
        if (sl->hdr == NULL)
            return fail(s, BT_PERF_NOMEM, "out of memory");
        if (need_buf && (sl->buf = zalloc_aligned(p->io_size)) == NULL)
            return fail(s, BT_PERF_NOMEM, "out of memory");
        s->freel[s->nfree++] = s->nslots - 1 - i;  /* cid 0 first, like the Python host */
    }
    s->active = s->nslots;
    if (p->verify && (s->busy = calloc(p->units / 8 + 1, 1)) == NULL)
        return fail(s, BT_PERF_NOMEM, "out of memory");
    if (p->ddgst && !p->verify && p->wbuf != NULL) {
        if ((s->wcrc = calloc(s->nh2c, sizeof *s->wcrc)) == NULL)
            return fail(s, BT_PERF_NOMEM, "out of memory");
        for (uint32_t k = 0; k < s->nh2c; k++) {
            uint32_t off = k * p->maxh2cdata;
            uint32_t n = p->io_size - off < p->maxh2cdata ? p->io_size - off : p->maxh2cdata;
            s->wcrc[k] = bt_crc32c(0, p->wbuf + off, n);
        }
        s->wcrc_all = bt_crc32c(0, p->wbuf, p->io_size);
    }
    s->exact = p->io_size >= SKIM_MIN && (p->verify || p->land || !p->ddgst)
               && (p->mode == BT_PERF_READBACK || (p->mode == BT_PERF_TIMED && p->read_share));
    s->refill = s->nslots / 4 ? s->nslots / 4 : 1;
    if (p->mode == BT_PERF_READBACK || (p->mode == BT_PERF_TIMED && p->read_share >= 100))
        s->resp_min = p->io_size;
    else
        s->resp_min = SMALL_HLEN + (p->hdgst ? DIGEST : 0);
    s->lowat = 1;
    s->rng = splitmix(p->seed);
    if (s->rng == 0)
        s->rng = 1;
    s->rstate = RX_CH;
    return 0;
}

/* Wake from poll only once a batch of answers is in (SO_RCVLOWAT): a wakeup costs far
   more than handling an answer (a context switch, ~10 µs in a VM), and with half the
   queue depth answered per wakeup the other half keeps the controller busy. Only while
   the queue is full (twice the batch in flight). A batch is sized from what answers have carried
   so far in this phase (before enough of them: the least an answer can be), so error
   answers (24 bytes for a read) shrink it rather than stall it; and poll waits at most
   LOWAT_WAIT_MS for it before reading whatever is there (a slow or starved controller
   costs a few spare wakeups, never throughput). */
static int set_lowat(struct st *s)
{
    struct bt_perf *p = s->p;
    uint32_t want = 1;
    uint32_t batch = s->nslots / 2;
    /* Not while writes go by R2T: an R2T is an answer that gates the data the
       controller needs before it can answer anything else, so waiting for a batch of
       answers stalled every round for LOWAT_WAIT_MS (128 KiB writes at QD4: 0.9K IOPS
       against 13.7K without the wait). */
    int r2t_writes = p->read_share < 100 && p->io_size > p->icd_max;
    if (!s->stopping && !r2t_writes && batch >= 2 && s->inflight >= 2 * batch) {
        uint64_t per = s->done >= s->nslots ? s->rx_bytes / s->done : s->resp_min;
        uint64_t w = (uint64_t)batch * per;
        want = w > LOWAT_MAX ? LOWAT_MAX : w < 2 ? 1 : (uint32_t)w;
    }
    /* small drifts are not worth a system call */
    if (want == s->lowat || (want > 1 && s->lowat > 1 && want < s->lowat + s->lowat / 4
                             && want > s->lowat - s->lowat / 4))
        return 0;
    int v = (int)want;
    if (setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &v, sizeof v) < 0) {
        p->err = errno;
        return fail(s, BT_PERF_CLOSED, "setsockopt(SO_RCVLOWAT): %s", strerror(errno));
    }
    s->lowat = want;
    return 0;
}

/* Best effort: the H2CTermReq of a protocol violation, after what is queued. */
static void send_term(struct st *s)
{
    struct bt_perf *p = s->p;
    if (!s->term_len)
        return;
    push(s, s->term, s->term_len);
    uint64_t until = mono_ns() + 200000000u;
    while (s->iov_head < s->iov_tail && mono_ns() < until) {
        int was = p->fatal;
        p->fatal = 0;  /* flush reports errors through fail(), which would keep the first */
        int r = flush(s);
        p->fatal = was;
        if (r < 0)
            return;
        if (s->iov_head < s->iov_tail) {
            struct pollfd pf = {.fd = p->fd, .events = POLLOUT};
            poll(&pf, 1, 20);
        }
    }
    p->term_sent = s->iov_head == s->iov_tail;
}

int bt_perf_run(struct bt_perf *p)
{
    struct st s;
    p->fatal = 0;
    p->err = 0;
    p->fes = p->fei = 0;
    p->term_sent = 0;
    p->msg[0] = 0;
    p->nev = 0;
    if (setup(&s, p) < 0) {
        teardown(&s);
        return p->fatal;
    }
    uint64_t start = mono_ns();
    uint64_t deadline = start + p->duration_ns;
    s.now = s.last_progress = start;
    int try_recv = 0;  /* receive before polling: the last receive filled the buffer */
    for (;;) {
        if (__atomic_load_n(&p->stop, __ATOMIC_RELAXED) >= 2) {
            fail(&s, BT_PERF_ABORTED, "aborted");
            break;
        }
        if (!s.stopping && ((p->mode == BT_PERF_TIMED && s.now >= deadline)
                            || __atomic_load_n(&p->stop, __ATOMIC_RELAXED)))
            s.stopping = 1;
        /* While more received data waits, free slots are refilled in rounds: one
           sendmsg for several commands, not one per completion. */
        if (s.nfree && (!try_recv || s.nfree >= s.refill || s.stopping)) {
            while (s.nfree) {
                struct slot *sl = &s.slots[s.freel[--s.nfree]];
                if (s.stopping || submit(&s, sl) < 0)
                    s.active--;  /* retired, as perf.py's _retire */
            }
        }
        if (s.iov_head < s.iov_tail && flush(&s) < 0)
            break;
        if (s.inflight == 0 && s.parked == 0 && s.iov_head == s.iov_tail
            && (s.stopping || s.active == 0))
            break;
        if (!try_recv && !p->spin) {
            if (set_lowat(&s) < 0)
                break;
            int ms = POLL_MAX_MS;
            if (p->mode == BT_PERF_TIMED && !s.stopping) {
                uint64_t left = deadline > s.now ? deadline - s.now : 0;
                if (left / 1000000u < (uint64_t)ms)
                    ms = (int)((left + 999999u) / 1000000u);
            }
            if (s.lowat > 1 && ms > LOWAT_WAIT_MS)
                ms = LOWAT_WAIT_MS;
            struct pollfd pf = {.fd = p->fd, .events = POLLIN};
            if (s.iov_head < s.iov_tail)
                pf.events |= POLLOUT;
            int r = poll(&pf, 1, ms);
            p->polls++;
            s.now = mono_ns();
            if (r < 0 && errno != EINTR) {
                p->err = errno;
                fail(&s, BT_PERF_CLOSED, "poll: %s", strerror(errno));
                break;
            }
            if (r <= 0 || !(pf.revents & (POLLIN | POLLERR | POLLHUP))) {
                if ((s.inflight || s.iov_head < s.iov_tail)
                    && s.now - s.last_progress > p->timeout_ns) {
                    fail(&s, BT_PERF_TIMEOUT,
                         "no completion in %.1f s with %u commands outstanding",
                         (double)p->timeout_ns / 1e9, s.inflight);
                    break;
                }
                if (r == 0 && s.lowat > 1)
                    try_recv = 1;  /* the batch is late: read what is there */
                continue;
            }
        }
        int full;
        ssize_t n = receive(&s, &full);
        s.now = mono_ns();
        if (n == 0) {
            fail(&s, BT_PERF_CLOSED, "connection closed by the controller");
            break;
        }
        if (n < 0) {
            if (n == -EAGAIN || n == -EWOULDBLOCK || n == -EINTR) {
                try_recv = 0;
                if (p->spin && (s.inflight || s.iov_head < s.iov_tail)
                    && s.now - s.last_progress > p->timeout_ns) {
                    fail(&s, BT_PERF_TIMEOUT,
                         "no completion in %.1f s with %u commands outstanding",
                         (double)p->timeout_ns / 1e9, s.inflight);
                    break;
                }
                continue;
            }
            p->err = (int)-n;
            fail(&s, BT_PERF_CLOSED, "receive: %s", strerror((int)-n));
            break;
        }
        s.last_progress = s.now;
        s.rx_bytes += (uint64_t)n;
        try_recv = full;
        if (p->fatal || parse(&s) < 0)
            break;
    }
    if (s.lowat != 1) {
        int one = 1;
        setsockopt(p->fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    }
    p->elapsed_ns = s.now - start;
    if (p->fatal == BT_PERF_PROTOCOL)
        send_term(&s);
    teardown(&s);
    return p->fatal;
}
