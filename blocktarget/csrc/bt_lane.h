/* blocktarget C data plane: the structures shared by Python (cffi cdef) and C.
 *
 * The part between the two "cdef" marker lines is what _fastpath_build.py hands to
 * cffi's cdef() verbatim, so it must stay plain declarations (no macros, no
 * preprocessor lines, no inline code): Python and C then read one definition.
 */
#ifndef BT_LANE_H
#define BT_LANE_H

#include <stddef.h>
#include <stdint.h>

/* ---- cdef begin ---- */

/* What a namespace's blocks are, as far as the lane is concerned. */
enum bt_backend {
    BT_BE_MEM = 1,   /* plain process memory (malloc; split/passthru over it) */
    BT_BE_NULL = 2,  /* reads return zeroes, writes are discarded */
};

struct bt_ns {
    uint32_t nsid;
    uint32_t block_size;
    uint64_t num_blocks;
    uint32_t backend;       /* enum bt_backend */
    uint8_t write_cache;    /* FUA writes are followed by a flush (counted as one) */
    unsigned char *mem;     /* BT_BE_MEM: the namespace's first byte (offset remap done) */
    /* cumulative, for the bdev channels' statistics */
    uint64_t reads, read_bytes, writes, write_bytes, flushes, flush_bytes;
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
    uint8_t hdgst;          /* header digests negotiated */
    uint8_t ddgst;          /* data digests negotiated */
    uint8_t hpda;           /* the host's PDU data alignment (0's based dwords) */
    /* cumulative, for the controller's SMART counters */
    uint64_t read_cmds, read_bytes, write_cmds, write_bytes;
    uint64_t cmds;          /* every command the lane executed */
};

/* CRC32C (Castagnoli) of n bytes, continuing from crc (0 to start); the NVMe/TCP
   digest is bt_crc32c(0, p, n). */
uint32_t bt_crc32c(uint32_t crc, const void *p, size_t n);
/* which implementation the CPU got: "sse4.2", "armv8-crc" or "table" */
const char *bt_crc32c_impl(void);
/* force the portable table (1) or the CPU's instruction where present (0), for tests */
void bt_crc32c_force_table(int on);

size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned char *out, size_t *out_len, unsigned *ncmds);

/* ---- cdef end ---- */

#endif
