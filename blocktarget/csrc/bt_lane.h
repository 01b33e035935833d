/* blocktarget C data plane: the target's lane, the structures shared by Python (cffi
 * cdef) and C.
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
    BT_BE_NULL = 2   /* reads return zeroes, writes are discarded */
};

/* The bdev statistics the lane keeps, per namespace. */
enum bt_stat { BT_ST_READ = 0, BT_ST_WRITE = 1, BT_ST_FLUSH = 2 };

struct bt_ns {
    uint32_t nsid;
    uint32_t block_size;
    uint64_t num_blocks;
    uint32_t backend;       /* enum bt_backend */
    uint8_t write_cache;    /* FUA writes are followed by a flush (counted as one) */
    unsigned char *mem;     /* BT_BE_MEM: the namespace's first byte (offset remap done) */
    /* cumulative, for the bdev channels' statistics, by enum bt_stat */
    uint64_t ops[3], bytes[3];
};

struct bt_cmd;              /* a command the lane owns (lane.c) */

struct bt_lane {
    struct bt_ns *ns;
    uint32_t nns;
    uint32_t max_io_size;   /* MDTS in bytes */
    uint32_t icd_limit;     /* in-capsule data accepted on this queue */
    uint32_t c2h_chunk;     /* largest C2HData payload per PDU */
    uint32_t maxh2cdata;    /* largest H2CData payload the host may send (ICResp) */
    uint16_t sqhd;
    uint16_t sqsize;        /* 0's based, from Connect */
    uint16_t qid;
    uint8_t flow_disabled;  /* SQ flow control disabled: SQHD reported as 0 */
    uint8_t c2h_success;    /* reads end with C2HData SUCCESS instead of a response */
    uint8_t hdgst;          /* header digests negotiated */
    uint8_t ddgst;          /* data digests negotiated */
    uint8_t hpda;           /* the host's PDU data alignment (0's based dwords) */
    /* The reactor's R2T/in-capsule buffer budget (tcp_limits.DataBudget), copied in
       before a call and back after it: the lane applies DataBudget's rules itself. */
    uint64_t bud_used, bud_limit, bud_held, bud_per_qpair, bud_high;
    /* commands the lane owns now, and of those how many wait for H2CData (and for how
       many bytes in all) */
    uint32_t inflight, r2t_waiting;
    uint64_t r2t_wait_bytes;
    /* cumulative, for the controller's SMART counters */
    uint64_t read_cmds, read_bytes, write_cmds, write_bytes;
    uint64_t cmds;          /* every command the lane executed */
    /* private to lane.c */
    struct bt_cmd *slot;
    uint32_t nslots;
    unsigned char *out;
    size_t out_len, out_cap;
};

/* CRC32C (Castagnoli) of n bytes, continuing from crc (0 to start); the NVMe/TCP
   digest is bt_crc32c(0, p, n). */
uint32_t bt_crc32c(uint32_t crc, const void *p, size_t n);
/* which implementation the CPU got: "sse4.2", "armv8-crc" or "table" */
const char *bt_crc32c_impl(void);
/* force the portable table (1) or the CPU's instruction where present (0), for tests */
void bt_crc32c_force_table(int on);

/* A lane for a queue of sqsize + 1 entries, or NULL (out of memory). */
struct bt_lane *bt_lane_new(uint16_t sqsize);
/* The queue is gone: free the lane (and the data of commands still waiting for it). */
void bt_lane_free(struct bt_lane *l);

/* Take the leading PDUs of in[0:len] that the lane takes (at most max_cmds commands,
   and no new command once max_out bytes of output are pending); returns the input bytes
   taken. Output accumulates in the lane until bt_lane_take_out. */
size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned *ncmds);
/* Hand the pending output over: *buf (free it with bt_free) and its length (0: none). */
size_t bt_lane_take_out(struct bt_lane *l, unsigned char **buf);
void bt_free(void *p);

/* Is cid the id of a command the lane owns? */
int bt_lane_busy(const struct bt_lane *l, uint16_t cid);
/* Place an H2CData PDU the Python decoder assembled: 1 placed (the command may have
   completed: see the output), 0 not the lane's to place (bt_lane_adopt it first). */
int bt_lane_h2c(struct bt_lane *l, uint16_t cccid, uint16_t ttag, uint32_t datao,
                const unsigned char *data, uint32_t n, int last);
/* Give a command waiting for its data back to the Python path: its SQE (64 bytes), the
   data received so far (copied to data, which holds its whole transfer), how much that
   is, its transfer length; returns 0, or -1 when ttag is no such command. Its budget
   stays held: the Python request now holds it. */
int bt_lane_adopt(struct bt_lane *l, uint16_t ttag, unsigned char *sqe, unsigned char *data,
                  uint32_t *received, uint32_t *length);
/* The lane's commands waiting for data: up to max (ttag, cid, use count of the slot);
   returns the count. */
unsigned bt_lane_r2t_list(const struct bt_lane *l, uint16_t *ttags, uint16_t *cids,
                          uint32_t *seqs, unsigned max);
/* The ttag of the command waiting for data with this cid (for Abort), or -1. */
int bt_lane_r2t_of(const struct bt_lane *l, uint16_t cid);

/* ---- cdef end ---- */

#define BT_LANE_TTAG 0x8000u  /* ttags at or above are the lane's (Python's are below) */

#endif
