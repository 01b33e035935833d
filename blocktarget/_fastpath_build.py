"""cffi build script (API mode) for `blocktarget._fastpath`: the C lane for plain 4 KiB-class
reads and in-capsule writes on memory namespaces (issue 7, item 4).

Why it exists: after every pure-Python saving (bench/RESULTS.md, "NVMe/TCP hot path vs
SPDK") a 4 KiB read still cost ≈ 7 µs of Python spread flat over ~15 calls (decode,
Request, dispatch, checks, bdev submit/complete, C2HData and response encoding), against
SPDK's 2 µs for the whole I/O. No single function was worth moving; the per-command chain
was. So one C call takes a whole receive buffer of capsules and executes the *successful*
common case of each: READ and in-capsule WRITE against a namespace whose bdev is plain
memory (malloc), writing the C2HData/CapsuleResp bytes of all of them into one output
buffer.

The rule that keeps it honest: the lane only ever does what the Python path would do for
the same bytes, and only when the outcome is success. At the first PDU it does not take
(any other PDU or opcode, any field that would produce an error status or a transport
error, an incomplete PDU, FUA, a namespace it has no memory for) it stops and the Python
path handles the rest of the buffer, which keeps every error and every rare case in one
place. tests/unit/test_fastpath.py feeds the same byte streams to a queue pair with and
without the lane and compares every byte sent and the state left behind.

Two passes over the same bytes: `bt_lane_run(..., out=NULL)` only measures (how many
bytes of input it takes and how many bytes of output they produce, no side effects) so
Python can allocate the output exactly once, uninitialised; the second call with `out`
executes. The output buffer is handed to the socket as is and never reused (uvloop keeps
views of what it could not send at once). `max_out` bounds one output buffer (but never
below one command's reply): 32 reads of 128 KiB in one 4 MiB buffer crossed glibc's mmap
threshold, and the page faults of a fresh mapping per batch doubled their CPU cost.

The extension is optional like the others: without a compiler the install succeeds and
the target runs the pure-Python path (also what `"c_fast_path": false` selects).
"""

from __future__ import annotations

from cffi import FFI

# The structures shared by Python (cdef) and C (source): declared once, used by both.
STRUCTS = r"""
struct bt_ns {
    uint32_t nsid;
    uint32_t block_size;
    uint64_t num_blocks;
    unsigned char *mem;
    /* cumulative, for the bdev channel's statistics */
    uint64_t reads, read_bytes, writes, write_bytes;
};

struct bt_lane {
    struct bt_ns *ns;
    uint32_t nns;
    uint32_t max_io_size;   /* MDTS in bytes */
    uint32_t icd_limit;     /* in-capsule data accepted on this queue */
    uint32_t c2h_chunk;     /* largest C2HData payload per PDU */
    uint16_t sqhd;
    uint16_t sqsize;        /* 0's based, from Connect */
    uint16_t qid;
    uint8_t flow_disabled;  /* SQ flow control disabled: SQHD reported as 0 */
    uint8_t c2h_success;    /* reads end with C2HData SUCCESS instead of a response */
    /* cumulative, for the controller's SMART counters */
    uint64_t read_cmds, read_bytes, write_cmds, write_bytes;
};
"""

CDEF = STRUCTS + r"""
size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned char *out, size_t *out_len, unsigned *ncmds);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the NVMe/TCP fast lane assumes a little-endian host"
#endif
""" + STRUCTS + r"""
/* NVMe/TCP and NVMe facts used below (NVMe/TCP 1.0, NVMe base 2.0) */
#define PDU_CAPSULE_CMD 0x04
#define PDU_CAPSULE_RESP 0x05
#define PDU_C2H_DATA 0x07
#define CMD_HLEN 72
#define RESP_LEN 24
#define C2H_HLEN 24
#define C2H_LAST 0x04
#define C2H_SUCCESS 0x08
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

/* The lane's verdict on one complete capsule PDU `p` of `plen` bytes: the bytes its
   reply takes, or 0 when the Python path must handle it. Mirrors qpair._capsule,
   dispatch and io.read/io.write for the cases that succeed. */
static size_t accept(const struct bt_lane *l, const unsigned char *p, uint32_t plen,
                     struct bt_ns **nsp, uint64_t *off, uint32_t *nbytes)
{
    const unsigned char *sqe = p + 8;
    uint32_t data_len = 0;
    if (plen > CMD_HLEN) {
        if (p[3] != CMD_HLEN)      /* PDO other than right after the header */
            return 0;
        data_len = plen - CMD_HLEN;
    }
    uint8_t opc = sqe[0], flags = sqe[1];
    if ((flags & 0x03) || (flags >> 6) == 0)  /* fused; PRPs */
        return 0;
    struct bt_ns *ns = find_ns(l, ld32(sqe + 4));
    if (ns == NULL)
        return 0;
    uint64_t slba = ld64(sqe + 40);
    uint32_t cdw12 = ld32(sqe + 48);
    uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
    uint64_t n = nlb * ns->block_size;
    uint32_t sgl_len = ld32(sqe + 32);
    uint8_t sgl_id = sqe[39];
    if (n > l->max_io_size || slba > ns->num_blocks || nlb > ns->num_blocks - slba
        || sgl_len != n)
        return 0;
    *nsp = ns;
    *off = slba * ns->block_size;
    *nbytes = (uint32_t)n;
    if (opc == OPC_READ) {
        if (data_len || sgl_id != SGL_ID_TRANSPORT || n > l->c2h_chunk)
            return 0;
        return C2H_HLEN + n + (l->c2h_success ? 0 : RESP_LEN);
    }
    if (opc == OPC_WRITE) {
        if (!data_len || sgl_id != SGL_ID_INCAPSULE || ld64(sqe + 24) != 0
            || sgl_len != data_len || data_len > l->icd_limit || (cdw12 & RW_FUA))
            return 0;
        return RESP_LEN;
    }
    return 0;
}

static unsigned char *put_resp(const struct bt_lane *l, unsigned char *o, uint16_t cid)
{
    memset(o, 0, RESP_LEN);
    o[0] = PDU_CAPSULE_RESP;
    o[2] = RESP_LEN;
    st32(o + 4, RESP_LEN);
    st16(o + 16, l->flow_disabled ? 0 : l->sqhd);
    st16(o + 18, l->qid);
    st16(o + 20, cid);
    return o + RESP_LEN;           /* status (o + 22) 0: success, phase 0 */
}

size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned char *out, size_t *out_len, unsigned *ncmds)
{
    size_t pos = 0, olen = 0;
    unsigned n = 0;
    while (n < max_cmds && len - pos >= CMD_HLEN) {
        const unsigned char *p = in + pos;
        if (p[0] != PDU_CAPSULE_CMD || p[1] != 0 || p[2] != CMD_HLEN)
            break;
        uint32_t plen = ld32(p + 4);
        if (plen < CMD_HLEN || plen > len - pos)
            break;
        struct bt_ns *ns;
        uint64_t off;
        uint32_t nbytes;
        size_t reply = accept(l, p, plen, &ns, &off, &nbytes);
        if (reply == 0 || (n > 0 && olen + reply > max_out))
            break;
        if (out != NULL) {
            const unsigned char *sqe = p + 8;
            uint16_t cid = ld16(sqe + 2);
            unsigned char *o = out + olen;
            if (!l->flow_disabled)
                l->sqhd = (uint16_t)((l->sqhd + 1) % ((uint32_t)l->sqsize + 1));
            if (sqe[0] == OPC_READ) {
                memset(o, 0, C2H_HLEN);
                o[0] = PDU_C2H_DATA;
                o[1] = C2H_LAST | (l->c2h_success ? C2H_SUCCESS : 0);
                o[2] = C2H_HLEN;
                o[3] = C2H_HLEN;
                st32(o + 4, C2H_HLEN + nbytes);
                st16(o + 8, cid);
                st32(o + 16, nbytes);
                memcpy(o + C2H_HLEN, ns->mem + off, nbytes);
                if (!l->c2h_success)
                    put_resp(l, o + C2H_HLEN + nbytes, cid);
                ns->reads++;
                ns->read_bytes += nbytes;
                l->read_cmds++;
                l->read_bytes += nbytes;
            } else {
                memcpy(ns->mem + off, p + CMD_HLEN, nbytes);
                put_resp(l, o, cid);
                ns->writes++;
                ns->write_bytes += nbytes;
                l->write_cmds++;
                l->write_bytes += nbytes;
            }
        }
        olen += reply;
        pos += plen;
        n++;
    }
    *out_len = olen;
    *ncmds = n;
    return pos;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "blocktarget._fastpath",
    SOURCE,
    extra_compile_args=["-O2"],
    # no compiler: the install still succeeds and the target uses the pure-Python path
    optional=True,
)

if __name__ == "__main__":  # `python blocktarget/_fastpath_build.py` builds it in place
    ffibuilder.compile(verbose=True)
