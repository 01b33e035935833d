/* The lane's command path: whole receive buffers of NVMe/TCP capsules executed in C.
 *
 * The rule that keeps it honest: the lane only does what the Python path (nvme/qpair.py,
 * dispatch, nvme/io.py) would do for the same bytes, and only when the outcome is
 * success. At the first PDU it does not take (any other PDU or opcode, any field that
 * would produce an error status or a transport error, a digest that does not match, an
 * incomplete PDU, a namespace it has no backend for) it stops, and the Python path
 * handles the rest of the buffer: every error and every rare case lives there, once.
 * tests/unit/test_fastpath.py feeds the same byte streams to queue pairs with and
 * without the lane and compares every byte sent and the state left behind.
 *
 * Two passes over the same bytes: with out == NULL bt_lane_run only measures (input
 * taken, output produced, no side effects), so Python allocates the output once, exactly
 * sized; the second call executes. max_out bounds one output buffer (never below one
 * command's reply).
 */
#include <stdint.h>
#include <string.h>

#include "bt_lane.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the NVMe/TCP fast lane assumes a little-endian host"
#endif

/* NVMe/TCP and NVMe facts used below (NVMe/TCP 1.0, NVMe base 2.0) */
#define PDU_CAPSULE_CMD 0x04
#define PDU_CAPSULE_RESP 0x05
#define PDU_C2H_DATA 0x07
#define F_HDGST 0x01
#define F_DDGST 0x02
#define F_LAST 0x04
#define F_SUCCESS 0x08
#define CMD_HLEN 72
#define RESP_HLEN 24
#define C2H_HLEN 24
#define DIGEST 4
#define OPC_FLUSH 0x00
#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define SGL_ID_INCAPSULE 0x01   /* data block, offset */
#define SGL_ID_TRANSPORT 0x5A   /* transport data block, transport specific */
#define RW_FUA (1u << 30)

static inline uint16_t ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

static struct bt_ns *find_ns(const struct bt_lane *l, uint32_t nsid)
{
    for (uint32_t i = 0; i < l->nns; i++)
        if (l->ns[i].nsid == nsid)
            return &l->ns[i];
    return NULL;
}

/* ---- output framing ---- */

static inline size_t resp_len(const struct bt_lane *l)
{
    return RESP_HLEN + (l->hdgst ? DIGEST : 0);
}

/* where C2HData payload starts: after the header (and its digest), padded to the
   host's alignment */
static inline size_t c2h_pdo(const struct bt_lane *l)
{
    size_t base = C2H_HLEN + (l->hdgst ? DIGEST : 0);
    size_t align = ((size_t)l->hpda + 1) * 4;
    return (base + align - 1) / align * align;
}

/* bytes on the wire for n bytes of read data, in PDUs of at most c2h_chunk */
static size_t c2h_bytes(const struct bt_lane *l, uint64_t n)
{
    uint64_t pdus = (n + l->c2h_chunk - 1) / l->c2h_chunk;
    return pdus * (c2h_pdo(l) + (l->ddgst ? DIGEST : 0)) + n;
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

/* One C2HData PDU: its header, padding, n bytes of data from `src` (NULL: zeroes), its
   digests. */
static unsigned char *put_c2h(const struct bt_lane *l, unsigned char *o, uint16_t cid,
                              uint32_t datao, const unsigned char *src, uint32_t n,
                              int last)
{
    size_t pdo = c2h_pdo(l);
    memset(o, 0, pdo);
    o[0] = PDU_C2H_DATA;
    o[1] = (l->hdgst ? F_HDGST : 0) | (l->ddgst ? F_DDGST : 0)
         | (last ? F_LAST : 0) | (last && l->c2h_success ? F_SUCCESS : 0);
    o[2] = C2H_HLEN;
    o[3] = (unsigned char)pdo;
    st32(o + 4, (uint32_t)(pdo + n + (l->ddgst ? DIGEST : 0)));
    st16(o + 8, cid);
    st32(o + 12, datao);
    st32(o + 16, n);
    if (l->hdgst)
        st32(o + C2H_HLEN, bt_crc32c(0, o, C2H_HLEN));
    unsigned char *d = o + pdo;
    if (src != NULL)
        memcpy(d, src, n);
    else
        memset(d, 0, n);
    o = d + n;
    if (l->ddgst) {
        st32(o, bt_crc32c(0, d, n));
        o += DIGEST;
    }
    return o;
}

/* ---- the verdict on one capsule ---- */

struct cmd {
    const unsigned char *sqe;
    const unsigned char *data;  /* in-capsule data */
    uint32_t data_len;
    struct bt_ns *ns;
    uint64_t off;               /* byte offset in the namespace */
    uint32_t nbytes;
};

/* The reply's size in bytes for one complete capsule PDU `p` of `plen` bytes, or 0 when
   the Python path must handle it. Mirrors pdu.Decoder, qpair._capsule, dispatch and
   io.read/io.write/io.flush for the cases that succeed. */
static size_t accept(const struct bt_lane *l, const unsigned char *p, uint32_t plen,
                     struct cmd *c)
{
    size_t hend = CMD_HLEN + (l->hdgst ? DIGEST : 0);
    if (l->hdgst && ld32(p + CMD_HLEN) != bt_crc32c(0, p, CMD_HLEN))
        return 0;                 /* Python: header digest error, fatal */
    c->sqe = p + 8;
    c->data = NULL;
    c->data_len = 0;
    if (plen > hend) {
        size_t dd = l->ddgst ? DIGEST : 0;
        if (p[3] != hend || plen <= hend + dd)
            return 0;             /* padding before the data, or no data after it */
        c->data = p + hend;
        c->data_len = plen - (uint32_t)hend - (uint32_t)dd;
        if (l->ddgst && ld32(c->data + c->data_len) != bt_crc32c(0, c->data, c->data_len))
            return 0;             /* Python: data digest error */
    }                             /* (no data: PDO is not looked at, as in Python) */
    const unsigned char *sqe = c->sqe;
    uint8_t opc = sqe[0], flags = sqe[1];
    if ((flags & 0x03) || (flags >> 6) == 0)  /* fused; PRPs */
        return 0;
    struct bt_ns *ns = find_ns(l, ld32(sqe + 4));
    if (ns == NULL)
        return 0;
    c->ns = ns;
    if (opc == OPC_FLUSH) {
        /* no data either way; an SGL of any length is ignored as Python ignores it */
        if (c->data_len)
            return 0;
        return resp_len(l);
    }
    uint64_t slba = ld64(sqe + 40);
    uint32_t cdw12 = ld32(sqe + 48);
    uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
    uint64_t n = nlb * ns->block_size;
    uint32_t sgl_len = ld32(sqe + 32);
    uint8_t sgl_id = sqe[39];
    if (n > l->max_io_size || slba > ns->num_blocks || nlb > ns->num_blocks - slba
        || sgl_len != n)
        return 0;
    c->off = slba * ns->block_size;
    c->nbytes = (uint32_t)n;
    if (opc == OPC_READ) {
        if (c->data_len || sgl_id != SGL_ID_TRANSPORT)
            return 0;
        return c2h_bytes(l, n) + (l->c2h_success ? 0 : resp_len(l));
    }
    if (opc == OPC_WRITE) {
        if (!c->data_len || sgl_id != SGL_ID_INCAPSULE || ld64(sqe + 24) != 0
            || sgl_len != c->data_len || c->data_len > l->icd_limit)
            return 0;
        return resp_len(l);
    }
    return 0;
}

/* ---- execution (the backends that complete at once) ---- */

static unsigned char *exec_read(struct bt_lane *l, const struct cmd *c, unsigned char *o,
                                uint16_t cid)
{
    struct bt_ns *ns = c->ns;
    const unsigned char *src = ns->backend == BT_BE_MEM ? ns->mem + c->off : NULL;
    uint32_t left = c->nbytes, datao = 0;
    while (left) {
        uint32_t n = left < l->c2h_chunk ? left : l->c2h_chunk;
        o = put_c2h(l, o, cid, datao, src ? src + datao : NULL, n, n == left);
        datao += n;
        left -= n;
    }
    if (!l->c2h_success)
        o = put_resp(l, o, cid);
    ns->reads++;
    ns->read_bytes += c->nbytes;
    l->read_cmds++;
    l->read_bytes += c->nbytes;
    return o;
}

static unsigned char *exec_write(struct bt_lane *l, const struct cmd *c, unsigned char *o,
                                 uint16_t cid)
{
    struct bt_ns *ns = c->ns;
    if (ns->backend == BT_BE_MEM)
        memcpy(ns->mem + c->off, c->data, c->nbytes);
    ns->writes++;
    ns->write_bytes += c->nbytes;
    if ((ld32(c->sqe + 48) & RW_FUA) && ns->write_cache) {
        /* io.write: a FUA write on a bdev with a volatile cache is a write, then a
           flush of its blocks; memory has nothing to flush */
        ns->flushes++;
        ns->flush_bytes += c->nbytes;
    }
    l->write_cmds++;
    l->write_bytes += c->nbytes;
    return put_resp(l, o, cid);
}

static unsigned char *exec_flush(struct bt_lane *l, const struct cmd *c, unsigned char *o,
                                 uint16_t cid)
{
    struct bt_ns *ns = c->ns;
    ns->flushes++;
    ns->flush_bytes += ns->num_blocks * ns->block_size;
    return put_resp(l, o, cid);
}

size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned char *out, size_t *out_len, unsigned *ncmds)
{
    size_t pos = 0, olen = 0;
    size_t hlen = CMD_HLEN + (l->hdgst ? DIGEST : 0);
    uint8_t hflag = l->hdgst ? F_HDGST : 0;
    unsigned n = 0;
    while (n < max_cmds && len - pos >= hlen) {
        const unsigned char *p = in + pos;
        uint32_t plen = ld32(p + 4);
        if (p[0] != PDU_CAPSULE_CMD || p[2] != CMD_HLEN || plen < hlen || plen > len - pos)
            break;
        /* flags: HDGSTF exactly as negotiated; DDGSTF exactly when data is digested */
        uint8_t want = hflag | (plen > hlen && l->ddgst ? F_DDGST : 0);
        if (p[1] != want)
            break;
        struct cmd c = {0};
        size_t reply = accept(l, p, plen, &c);
        if (reply == 0 || (n > 0 && olen + reply > max_out))
            break;
        if (out != NULL) {
            uint16_t cid = ld16(c.sqe + 2);
            unsigned char *o = out + olen;
            if (!l->flow_disabled)
                l->sqhd = (uint16_t)((l->sqhd + 1) % ((uint32_t)l->sqsize + 1));
            switch (c.sqe[0]) {
            case OPC_READ:
                exec_read(l, &c, o, cid);
                break;
            case OPC_WRITE:
                exec_write(l, &c, o, cid);
                break;
            default:
                exec_flush(l, &c, o, cid);
                break;
            }
        }
        olen += reply;
        pos += plen;
        n++;
        if (out != NULL)
            l->cmds++;
    }
    *out_len = olen;
    *ncmds = n;
    return pos;
}
