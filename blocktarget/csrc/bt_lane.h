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
    BT_BE_NULL = 2,  /* reads return zeroes, writes are discarded */
    BT_BE_URING = 3, /* a file or block device through the reactor's io_uring */
    BT_BE_PMEM = 4,  /* a pmem pool's block translation table (be_pmem.c, bt_pmem.h) */
    BT_BE_NVME = 5   /* a PCIe NVMe namespace through the reactor's hardware queue */
};

struct bt_uring;            /* a reactor's io_uring as the lane uses it (be_uring.c) */
struct bt_pmem;             /* a pmem pool's BTT (be_pmem.c) */
struct bt_nvmeq;            /* a reactor's NVMe I/O queue pair as both paths use it
                               (be_nvme.c, bt_nvme.h) */
struct bt_conn;             /* a connection lent to the reactor's C poller (net.c) */
struct bt_lvmap;            /* a logical volume's cluster map (lane_lvol.c, bt_lvol.h) */

/* The bdev statistics the lane keeps, per namespace. */
#define BT_LAT_BUCKETS 16
enum bt_stat { BT_ST_READ = 0, BT_ST_WRITE = 1, BT_ST_FLUSH = 2 };

struct bt_ns {
    uint32_t nsid;
    uint32_t block_size;
    uint64_t num_blocks;
    uint32_t backend;       /* enum bt_backend */
    uint8_t write_cache;    /* FUA writes are followed by a flush (counted as one) */
    uint8_t stale;          /* the subsystem changed: nothing new may start on it */
    unsigned char *mem;     /* BT_BE_MEM: the namespace's first byte (offset remap done) */
    int fd;                 /* BT_BE_URING: the file, */
    uint64_t fd_offset;     /* where the namespace starts in it (BT_BE_PMEM: in the pool's
                               blocks, in bytes), */
    struct bt_uring *ring;  /* and the reactor's ring */
    struct bt_pmem *pmem;   /* BT_BE_PMEM: the pool, */
    uint32_t pmem_lane;     /* and the BTT lane of this reactor */
    struct bt_nvmeq *nvmeq; /* BT_BE_NVME: the reactor's queue pair (fd_offset: where the
                               namespace starts on the device, in bytes), */
    uint32_t hw_nsid;       /* and the namespace's id on the device */
    /* cumulative, for the bdev channels' statistics, by enum bt_stat. Latency: from
       submission to completion for what completed at an asynchronous backend; the
       lane call's time shared out over the call's commands for the rest. */
    uint64_t ops[3], bytes[3], lat_ns[3];
    /* A logical volume over the backend above (NULL: none): commands are sent where its
       map says (bt_lvol.h); reads of unmapped clusters are answered with zeroes and
       counted in lv_zero (an entry whose statistics go to the volume's channel only:
       the Python path does not pass them to the base) */
    struct bt_lvmap *lv;
    struct bt_ns *lv_zero;
    /* The latency histogram (buckets as bdev.LATENCY_BUCKETS_NS, bt_lat_bounds), kept
       here so that Python can fold it whenever it likes (lazily, nvme/fastlane.py) and
       still see each command in its own bucket: counts not yet folded (Python adds and
       clears them), and which buckets those are (bits). */
    uint64_t hist[3][16];   /* (BT_LAT_BUCKETS) */
    uint32_t hist_touched[3];
    /* private to lane.c: ops counted in this call, to be given the call's time */
    uint32_t sync_pend[3];
};

/* The upper bounds (ns) of the histogram's buckets but the last, bisect_left-style:
   set once by Python from bdev.LATENCY_BUCKETS_NS, the one source of them. */
extern uint64_t bt_lat_bounds[15];

struct bt_cmd;              /* a command the lane owns (lane.c) */

/* A piece of the lane's output for the socket: len bytes from start, in memory owned by
   `owner` (freed with bt_free once sent). */
struct bt_chunk {
    void *owner;
    unsigned char *start;
    size_t len;
    uint8_t dma;            /* owner is an NVMe DMA buffer: bt_nvme_buf_put, not bt_free */
};

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
    /* The reactor's R2T/in-capsule buffer budget (tcp_limits.DataBudget) as Python saw
       it before a call: the lane applies DataBudget's rules itself and counts what it
       took and gave back (cumulative), which Python adds to the budget afterwards. */
    uint64_t bud_used, bud_limit, bud_held, bud_per_qpair;
    uint64_t bud_taken, bud_returned;
    /* of taken - returned, the part taken or given back while the lane's socket was
       lent to the C poller (cumulative): the poller already added it to the reactor's
       budget (bt_net.bud_delta), Python adds only the rest */
    int64_t bud_net;
    /* commands the lane owns now; of those, how many wait for H2CData (and for how
       many bytes in all), are at a backend, or await the Python path (redo) */
    uint32_t inflight, r2t_waiting, io_inflight, redo;
    uint64_t r2t_wait_bytes;
    uint64_t submitted;     /* I/Os queued to backends (cumulative) */
    /* An H2CData PDU the lane is receiving across receive buffers: payload and digest
       bytes still to come (while either is non-zero, the next bytes are the lane's). */
    uint32_t rx_left;
    uint8_t rx_dleft;
    uint64_t rx_pdus;       /* such PDUs received whole (cumulative: the stall watch) */
    /* The start of a capsule a receive buffer ended in, kept by the lane (carry_len
       bytes of carry_plen, 0 while unknown) to finish with the next buffer's bytes. */
    uint32_t carry_len, carry_plen;
    void *handle;           /* the Python Lane (a cffi handle), for completions */
    /* cumulative, for the controller's SMART counters */
    uint64_t read_cmds, read_bytes, write_cmds, write_bytes;
    uint64_t cmds;          /* every command the lane executed */
    uint64_t pmem_sent;     /* of its reads, those sent from a pool's blocks (lane.c) */
    /* private to lane.c */
    struct bt_cmd *slot;
    uint32_t nslots;
    unsigned char *out;
    size_t out_len, out_cap;
    struct bt_chunk *chunks;  /* output sealed before `out`, in order */
    uint32_t nchunks, chunks_cap;
    uint8_t closed;         /* the queue is gone (bt_lane_close) */
    uint8_t queued_ready;   /* in a ring's ready list: */
    struct bt_uring *ready_on; /* that ring's */
    struct bt_lane *next_ready;
    struct bt_uring *touched; /* a ring with SQEs queued in this call, to submit */
    struct bt_nvmeq *touched_nvme; /* a queue pair with SQEs written in this call */
    uint8_t nvme_queued;    /* in a queue pair's ready list: */
    struct bt_nvmeq *nvme_ready_on; /* that queue pair's */
    struct bt_lane *nvme_next;
    uint32_t rx_slot;       /* the PDU being received: its slot, */
    uint32_t rx_off;        /* where its next payload byte goes in the slot's buffer, */
    uint32_t rx_n;          /* its payload length, */
    uint32_t rx_crc;        /* the data digest so far, */
    uint8_t rx_last;        /* its LAST flag, */
    unsigned char rx_dgst[4]; /* and the digest bytes received */
    unsigned char *carry;   /* the capsule being finished (carry_len bytes so far) */
    struct bt_conn *conn;   /* while lent to net.c: its output is sent from C */
    void *psend;            /* pmem reads held to be sent from the pool (lane.c) */
    void *pgset;            /* the pmem group's LBAs (lane.c, struct bt_lba_set) */
};

struct bt_uring {
    void *ring;             /* a liburing struct io_uring (blocktarget._uring's) */
    uint32_t inflight;      /* the lanes' I/Os at the kernel */
    uint32_t queued;        /* SQEs queued by lanes, not yet submitted */
    struct bt_lane *ready;  /* lanes with completions Python has not seen */
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
/* The queue is gone: drop what waits for the host (writes waiting for data, commands
   for the Python path, output). I/O at a backend goes on; its completions are counted
   (bdev statistics) and not answered. */
void bt_lane_close(struct bt_lane *l);
/* Free the lane; only once nothing of it is at a backend (io_inflight 0). */
void bt_lane_free(struct bt_lane *l);

/* A command that did not succeed in the lane (an error or a short transfer at the
   backend, a full ring): hand the next one to the Python path, which does it again from
   the start: its SQE, its data for a write (copied to data, room for the largest
   transfer), *length the data's length (0: none); *failed 1 when it must not be done but
   failed (its data came with a bad data digest: Transient Transport Error, as the
   Python path answers); 1 one was handed, 0 none left. */
int bt_lane_redo(struct bt_lane *l, unsigned char *sqe, unsigned char *data, uint32_t *length,
                 int *failed);

/* The rest of an H2CData PDU the lane began receiving (rx_left/rx_dleft): takes what of
   in[0:len] belongs to it and returns how much. */
size_t bt_lane_rx(struct bt_lane *l, const unsigned char *in, size_t len);

/* The rest of the capsule the lane carries (carry_len): takes what of in[0:len] belongs to
   it and returns how much. Once whole, the lane executes it if `run` (the Python path has
   nothing outstanding: the lane may run) and it is the lane's; otherwise (or when the
   bytes turn out not to frame a capsule it could carry) *handed gets the PDU's bytes (or
   what the lane had), for the Python path to handle first, with *nhanded their length
   (free with bt_free). *ncmds: PDUs the lane executed. */
size_t bt_lane_carry(struct bt_lane *l, const unsigned char *in, size_t len, int run,
                     unsigned char **handed, size_t *nhanded, unsigned *ncmds);

/* io_uring (compiled in when liburing was there at build time: bt_uring_available). */
int bt_uring_available(void);
/* The lanes' view of a ring made by blocktarget._uring (its struct io_uring *). */
struct bt_uring *bt_uring_attach(void *ring);
void bt_uring_detach(struct bt_uring *u);
/* Reap up to max completions: the lanes' are finished in C; the others' (user_data,
   res) go to ud/res for Python (the return value says how many). Lanes with new output
   or commands to redo go to ready (their handles; *nready of them, at most max_ready;
   the rest stay for the next call). */
unsigned bt_uring_reap(struct bt_uring *u, uint64_t *ud, int32_t *res, unsigned max,
                       void **ready, unsigned max_ready, unsigned *nready);

/* bt_nvme.h: the NVMe backend's queue pair and its calls. */

/* Take the leading PDUs of in[0:len] that the lane takes (at most max_cmds commands,
   and no new command once max_out bytes of output are pending); returns the input bytes
   taken. Output accumulates in the lane until bt_lane_take_chunks. */
size_t bt_lane_run(struct bt_lane *l, const unsigned char *in, size_t len, unsigned max_cmds,
                   size_t max_out, unsigned *ncmds);
/* Hand the pending output over, in order: up to max pieces into out (each freed with
   bt_free(owner) once sent); returns how many (call again while it returns max). */
unsigned bt_lane_take_chunks(struct bt_lane *l, struct bt_chunk *out, unsigned max);
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
